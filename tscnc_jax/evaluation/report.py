"""What an evaluation reports and refuses: :class:`RobustnessReport`, :func:`check_adversarial`
(an adversarial input inside the threat model), :class:`AttackSoundnessError` and the warnings
of the diagnostics (:class:`GradientMaskingWarning`, :class:`AutoAttackCheckWarning`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from tscnc_jax import _validation
from tscnc_jax import attacks as _attacks


class AttackSoundnessError(RuntimeError):
    """An attack or the evaluation produced an impossible result (outside the threat model, or
    robust accuracy above clean accuracy, or an ensemble weaker than a member)."""


class GradientMaskingWarning(UserWarning):
    """A diagnostic suggests the white-box attacks are unreliable on this model."""


class AutoAttackCheckWarning(GradientMaskingWarning):
    """One of AutoAttack's checks for common evaluation mistakes flagged the model (Croce and Hein
    2020; ``fra31/auto-attack``, ``autoattack/checks.py`` and ``flags_doc.md``): randomised
    outputs, probabilities instead of logits, zero input gradients, a forward pass that
    differentiates (a dynamic defence), or too few classes for the version's members (see
    :func:`autoattack_checks`).

    A subclass of :class:`GradientMaskingWarning`: every one of these is a reason the reported
    robust accuracy may overestimate the model's robustness, so a filter on
    :class:`GradientMaskingWarning` sees them too, and this class singles them out."""


def _tolerance(x: np.ndarray, eps: float, norm: str, bounds, rtol: float, atol: float | None):
    if atol is None:
        # Rounding of x + delta in the input dtype: half an ulp of the largest magnitude per
        # coordinate (x4 for slack), summed in quadrature over the coordinates for L2.
        scale = max(abs(bounds[0]), abs(bounds[1]), 1.0)
        ulp = float(np.finfo(x.dtype).eps) * scale
        n_features = math.prod(x.shape[1:])
        atol = 4 * ulp * (math.sqrt(n_features) if norm == "l2" else 1.0)
    return atol + rtol * eps


def check_adversarial(
    x: Any,
    x_adv: Any,
    *,
    eps: float,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    rtol: float = 1e-5,
    atol: float | None = None,
    name: str = "attack",
) -> None:
    """Raises :class:`AttackSoundnessError` unless ``x_adv`` is a valid perturbation of ``x``.

    Checks: same shape and dtype, finite, inside ``bounds`` (exactly), and per example
    ``||x_adv - x|| <= eps + atol + rtol * eps``. The default ``atol`` allows the rounding of
    ``x + delta`` in ``x``'s dtype (a few ulps of ``max(|lo|, |hi|, 1)``, times ``sqrt(D)`` for L2).
    """
    norm = _validation.check_choice("norm", norm, _attacks.NORMS)
    lo, hi = _attacks.check_bounds(bounds)
    x = np.asarray(x)
    x_adv = np.asarray(x_adv)
    if x_adv.shape != x.shape or x_adv.dtype != x.dtype:
        raise AttackSoundnessError(
            f"{name}: output has shape {x_adv.shape} / dtype {x_adv.dtype}, expected "
            f"{x.shape} / {x.dtype}."
        )
    if x.size == 0:
        return
    if not np.all(np.isfinite(x_adv)):
        raise AttackSoundnessError(f"{name}: output contains NaN or inf.")
    if x_adv.min() < lo or x_adv.max() > hi:
        raise AttackSoundnessError(
            f"{name}: output leaves bounds [{lo}, {hi}]: values in [{x_adv.min()}, {x_adv.max()}]."
        )
    delta = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(x.shape[0], -1)
    dist = np.max(np.abs(delta), axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    tol = _tolerance(x, eps, norm, (lo, hi), rtol, atol)
    worst = int(np.argmax(dist))
    if dist[worst] > eps + tol:
        raise AttackSoundnessError(
            f"{name}: perturbation of example {worst} has {norm} norm {dist[worst]:.9g} > "
            f"eps = {eps:.9g} (tolerance {tol:.3g})."
        )


@dataclasses.dataclass(frozen=True)
class RobustnessReport:
    """Result of :func:`evaluate_robustness`.

    Attributes:
      eps, norm, bounds: the threat model.
      attacks: attack names, in the order they ran.
      cascade: whether each attack ran only on the examples all earlier attacks failed to break
        (AutoAttack's protocol), or on every clean-correct example.
      n_examples, n_clean_correct, clean_accuracy: clean results.
      robust_accuracy: per attack; with ``cascade`` the accuracy *after* that attack (cumulative,
        as AutoAttack prints it), otherwise the attack's own robust accuracy.
      n_broken: per attack, the examples it broke (with ``cascade``: that no earlier attack broke).
      ensemble_robust_accuracy, n_robust: worst case over all attacks, verified by a forward pass
        on the stored adversarial inputs (a stochastic model: by fresh draws, so that these, not
        the per-attack numbers above, which come from the draws that selected the attacks'
        outputs, are the measured robustness; package docstring).
      seconds: wall time per phase ("clean", each attack, "checks", "total"), compilation included.
      warnings: gradient-masking and other diagnostics (empty when all is well).
      clean_correct: bool per example.
      broken_by: int per example: index in ``attacks`` of the first attack (in order) that broke
        it; -1 if none did (robust, or misclassified clean: see ``clean_correct``).
      x_adv: the adversarial inputs (``x`` where unbroken), if ``return_adversarial`` was set.
        For a stochastic model, every attacked example's final input (the output of the attack
        that broke it, else of the last attack that ran on it); ``broken_by`` then names the
        attack whose output the final draws misclassify.
      stochastic_draws: for a stochastic model (``stochastic=True``), the draws of its randomness
        behind every correctness decision (an example counts as correctly classified on an input
        only if every draw classifies it correctly); ``None`` for a deterministic model.
    """

    eps: float
    norm: str
    bounds: tuple[float, float]
    attacks: tuple[str, ...]
    cascade: bool
    n_examples: int
    n_clean_correct: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    n_broken: dict[str, int]
    ensemble_robust_accuracy: float
    n_robust: int
    seconds: dict[str, float]
    warnings: tuple[str, ...]
    clean_correct: np.ndarray = dataclasses.field(repr=False)
    broken_by: np.ndarray = dataclasses.field(repr=False)
    x_adv: np.ndarray | None = dataclasses.field(default=None, repr=False)
    stochastic_draws: int | None = None

    def to_markdown(self) -> str:
        """A small markdown table of the results."""
        what = "after" if self.cascade else "alone"
        draws = (
            "" if self.stochastic_draws is None
            else f", stochastic model: correct = correct in all {self.stochastic_draws} draws"
        )
        lines = [
            f"{self.norm} eps = {self.eps:g}, {self.n_examples} examples{draws}",
            "",
            f"| attack | robust acc. ({what}) | broken | seconds |",
            "|---|---|---|---|",
            f"| clean | {self.clean_accuracy:.2%} | - | {self.seconds.get('clean', 0.0):.1f} |",
        ]
        for name in self.attacks:
            lines.append(
                f"| {name} | {self.robust_accuracy[name]:.2%} | {self.n_broken[name]} | "
                f"{self.seconds.get(name, 0.0):.1f} |"
            )
        lines.append(
            f"| **ensemble** | **{self.ensemble_robust_accuracy:.2%}** | "
            f"{self.n_clean_correct - self.n_robust} | {self.seconds.get('total', 0.0):.1f} |"
        )
        lines += [f"\nWARNING: {w}" for w in self.warnings]
        return "\n".join(lines)
