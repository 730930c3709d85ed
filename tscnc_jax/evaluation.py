"""Robustness evaluation driver: clean accuracy, robust accuracy per attack and for the ensemble.

:func:`evaluate_robustness` runs a list of attacks (by default AutoAttack's standard version) over a
data set, re-batching the examples that are still robust between attacks, and refuses to return a
number it cannot vouch for:

* Soundness checks raise :class:`AttackSoundnessError`: every adversarial input must be finite, of
  the input's shape, inside ``bounds`` and within ``eps`` of its clean input (up to float rounding,
  see :func:`check_adversarial`); robust accuracies must not exceed the clean accuracy; the ensemble
  must not exceed any member.
* The robust flags are recomputed by one clean forward pass over the final adversarial inputs, so a
  point counts as broken only if the stored ``x_adv`` really is misclassified.
* Gradient-masking diagnostics add warnings (also issued as :class:`GradientMaskingWarning`): the
  black-box Square attack breaking points that the white-box attacks did not; the PGD loss not
  increasing with the steps; accuracy not reaching 0 at a very large ``eps`` (Carlini et al. 2019,
  "On evaluating adversarial robustness"; Croce and Hein 2020).

This module is a driver: it jits internally (once per attack and batch shape; the last batch is
padded) and moves data between host and device.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax import _validation
from tscnc_jax import attacks as _attacks
from tscnc_jax._progress import progress_bar

LogitsFn = Callable[[jax.Array], jax.Array]

# Members treated as black-box (score-based) by the gradient-masking check.
_BLACK_BOX_PREFIXES = ("square",)


class AttackSoundnessError(RuntimeError):
    """An attack or the evaluation produced an impossible result (outside the threat model, or
    robust accuracy above clean accuracy, or an ensemble weaker than a member)."""


class GradientMaskingWarning(UserWarning):
    """A diagnostic suggests the white-box attacks are unreliable on this model."""


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
        on the stored adversarial inputs.
      seconds: wall time per phase ("clean", each attack, "checks", "total"), compilation included.
      warnings: gradient-masking and other diagnostics (empty when all is well).
      clean_correct: bool per example.
      broken_by: int per example: index in ``attacks`` of the first attack (in order) that broke
        it; -1 if none did (robust, or misclassified clean: see ``clean_correct``).
      x_adv: the adversarial inputs (``x`` where unbroken), if ``return_adversarial`` was set.
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

    def to_markdown(self) -> str:
        """A small markdown table of the results."""
        what = "after" if self.cascade else "alone"
        lines = [
            f"{self.norm} eps = {self.eps:g}, {self.n_examples} examples",
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


def _resolve_attacks(attacks: Any, n_classes: int, norm: str) -> list[tuple[str, Callable]]:
    if isinstance(attacks, str | _attacks.AutoAttackConfig):
        if isinstance(attacks, str) and attacks not in _attacks.AUTOATTACK_VERSIONS:
            members = [(attacks, _attacks.get_attack(attacks))]
        else:
            members = _attacks.autoattack_members(attacks, n_classes=n_classes, norm=norm)
    elif isinstance(attacks, Mapping):
        members = list(attacks.items())
    elif isinstance(attacks, Sequence):
        members = []
        for a in attacks:
            if isinstance(a, str):
                members.append((a, _attacks.get_attack(a)))
            elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str):
                members.append(a)
            else:
                raise ValueError(
                    f"`attacks` entries must be names or (name, attack) pairs; got {a!r}."
                )
    else:
        raise ValueError(
            "`attacks` must be 'standard', 'fast', an AutoAttackConfig, a sequence of names or "
            f"(name, attack) pairs, or a mapping name -> attack; got {attacks!r}."
        )
    if not members:
        raise ValueError("`attacks` is empty.")
    names = [m[0] for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must be unique; got {names}.")
    for name, fn in members:
        if not callable(fn):
            raise ValueError(f"attack {name!r} is not callable.")
    return members


def _collect(dataset_batches: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    xs, ys = [], []
    for i, batch in enumerate(dataset_batches):
        if isinstance(batch, Mapping):
            xb = batch["image"] if "image" in batch else batch["x"]
            yb = batch["label"] if "label" in batch else batch["y"]
        elif isinstance(batch, Sequence) and len(batch) == 2:
            xb, yb = batch
        else:
            raise ValueError(
                f"batch {i}: expected (x, y) or a dict with 'image'/'label'; got {type(batch)}."
            )
        xb, yb = np.asarray(xb), np.asarray(yb)
        if xb.ndim < 2 or yb.shape != (xb.shape[0],):
            raise ValueError(f"batch {i}: x has shape {xb.shape} and y {yb.shape}.")
        if xs and xb.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"batch {i}: example shape {xb.shape[1:]} != {xs[0].shape[1:]}.")
        xs.append(xb)
        ys.append(yb)
    if not xs or sum(len(y) for y in ys) == 0:
        raise ValueError("`dataset_batches` yielded no examples.")
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"inputs must be floating point; got dtype {x.dtype}.")
    # The dtype JAX computes in (float64 inputs become float32 unless x64 is enabled), so that
    # the attacks' outputs and the clean inputs are compared in the same dtype.
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {y.dtype}.")
    return x, y.astype(np.int32), max(len(b) for b in xs)


def _chunks(idx: np.ndarray, batch_size: int):
    """Yields ``(padded_indices, n_valid)``; the padding repeats the first index."""
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        n = len(part)
        if n < batch_size:
            part = np.concatenate([part, np.full(batch_size - n, part[0], part.dtype)])
        yield part, n


def evaluate_robustness(
    logits_fn: LogitsFn,
    dataset_batches: Iterable[Any],
    *,
    eps: float,
    attacks: Any = "standard",
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    key: jax.Array | None = None,
    cascade: bool = True,
    batch_size: int | None = None,
    sanity_checks: bool = True,
    progress: bool = False,
    return_adversarial: bool = False,
) -> RobustnessReport:
    """Evaluates clean and robust accuracy of ``logits_fn`` on a data set.

    Args:
      logits_fn: maps a batch to logits ``B x K`` (deterministic, examples independent).
      dataset_batches: iterable of ``(x, y)`` pairs or dicts with ``"image"`` and ``"label"``; the
        whole data set is held in host memory.
      eps: radius of the threat model.
      attacks: ``"standard"`` or ``"fast"`` (AutoAttack members, see
        :data:`tscnc_jax.attacks.AUTOATTACK_VERSIONS`), an ``AutoAttackConfig``, a sequence of names
        from :data:`tscnc_jax.attacks.ATTACKS` and/or ``(name, attack)`` pairs, or a mapping
        ``name -> attack`` with ``attack(logits_fn, x, y, *, key, eps, norm, bounds) -> x_adv``.
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs; inputs outside raise ``ValueError``.
      key: PRNG key; default ``jax.random.key(0)``. Attack ``i`` on chunk ``j`` uses
        ``fold_in(fold_in(key, i), j)``.
      cascade: run each attack only on the examples still robust (AutoAttack's protocol, much
        cheaper); ``False`` runs every attack on every clean-correct example, which also gives each
        attack's own robust accuracy.
      batch_size: examples per attack call (default: the largest input batch). Every call has this
        size (the last chunk is padded), so each attack compiles once.
      sanity_checks: run the gradient-masking diagnostics (two extra PGD-20 runs on one batch).
      progress: show a progress bar per attack (tqdm).
      return_adversarial: keep the adversarial inputs in the report.

    Returns:
      A :class:`RobustnessReport`.

    Raises:
      ValueError: bad arguments or data (labels out of range, inputs outside ``bounds``).
      AttackSoundnessError: an attack left the threat model or the numbers are inconsistent.
    """
    t_start = time.perf_counter()
    norm = _validation.check_choice("norm", norm, _attacks.NORMS)
    lo, hi = _attacks.check_bounds(bounds)
    _attacks.check_eps(eps)
    eps = float(eps)
    key = jax.random.key(0) if key is None else key
    x_all, y_all, default_bs = _collect(dataset_batches)
    if batch_size is not None:
        batch_size = _validation.check_int("batch_size", batch_size)
    batch_size = default_bs if batch_size is None else batch_size
    n = len(y_all)
    n_classes = _check_data(logits_fn, x_all, y_all, batch_size, (lo, hi))
    members = _resolve_attacks(attacks, n_classes, norm)
    names = tuple(m[0] for m in members)
    seconds: dict[str, float] = {}
    predict = jax.jit(lambda xb: jnp.argmax(logits_fn(xb), axis=-1))

    t0 = time.perf_counter()
    clean_correct = _predict_all(predict, x_all, batch_size) == y_all
    seconds["clean"] = time.perf_counter() - t0
    n_clean = int(clean_correct.sum())

    x_adv = x_all.copy()
    broken_by = np.full(n, -1, np.int32)
    robust = clean_correct.copy()
    robust_acc: dict[str, float] = {}
    n_broken: dict[str, int] = {}
    member_robust: dict[str, np.ndarray] = {}
    for i, (name, attack) in enumerate(members):
        t0 = time.perf_counter()
        todo = np.flatnonzero(robust if cascade else clean_correct)
        this_robust = _run_member(
            name, i, attack, logits_fn, x_all, y_all, todo, clean_correct, broken_by, x_adv,
            key=jax.random.fold_in(key, i), eps=eps, norm=norm, bounds=(lo, hi),
            batch_size=batch_size, progress=progress)
        newly = robust & ~this_robust
        n_broken[name] = (
            int((this_robust != clean_correct).sum()) if not cascade else int(newly.sum())
        )
        robust &= this_robust
        member_robust[name] = this_robust
        robust_acc[name] = float((robust if cascade else this_robust).sum() / n)
        seconds[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    final_robust, notes, not_reproduced = _verify_ensemble(
        predict, x_all, y_all, x_adv, broken_by, clean_correct, robust, eps=eps, norm=norm,
        bounds=(lo, hi), batch_size=batch_size)
    n_robust = int(final_robust.sum())
    _check_consistency(names, robust_acc, n_clean / n, n_robust / n, not_reproduced / n, cascade)
    if sanity_checks:
        notes += _masking_diagnostics(
            logits_fn, x_all, y_all, clean_correct, member_robust, n_broken, names, cascade,
            eps=eps, norm=norm, bounds=(lo, hi), key=jax.random.fold_in(key, len(members)),
            batch_size=batch_size)
    for note in notes:
        warnings.warn(note, GradientMaskingWarning, stacklevel=2)
    seconds["checks"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return RobustnessReport(
        eps=eps,
        norm=norm,
        bounds=(lo, hi),
        attacks=names,
        cascade=cascade,
        n_examples=n,
        n_clean_correct=n_clean,
        clean_accuracy=n_clean / n,
        robust_accuracy=robust_acc,
        n_broken=n_broken,
        ensemble_robust_accuracy=n_robust / n,
        n_robust=n_robust,
        seconds=seconds,
        warnings=tuple(notes),
        clean_correct=clean_correct,
        broken_by=broken_by,
        x_adv=x_adv if return_adversarial else None,
    )


def _check_data(logits_fn, x_all, y_all, batch_size, bounds) -> int:
    """Checks the inputs against ``bounds`` and the labels against the logits; returns the
    number of classes."""
    lo, hi = bounds
    if not np.all(np.isfinite(x_all)):
        raise ValueError("inputs contain NaN or inf.")
    if x_all.min() < lo or x_all.max() > hi:
        raise ValueError(
            f"inputs must lie inside bounds [{lo}, {hi}]; got values in "
            f"[{x_all.min()}, {x_all.max()}]. Pass matching `bounds=`."
        )
    out = jax.eval_shape(
        logits_fn, jax.ShapeDtypeStruct((batch_size,) + x_all.shape[1:], x_all.dtype)
    )
    if len(out.shape) != 2 or out.shape[0] != batch_size:
        raise ValueError(f"`logits_fn` must return logits of shape (B, K); got {out.shape}.")
    n_classes = int(out.shape[1])
    if y_all.min() < 0 or y_all.max() >= n_classes:
        raise ValueError(
            f"labels must be in [0, {n_classes}); got values in [{y_all.min()}, {y_all.max()}]."
        )
    return n_classes


def _predict_all(predict, x_np: np.ndarray, batch_size: int) -> np.ndarray:
    """The predicted class of every example, in padded batches of ``batch_size``."""
    pred = np.empty(len(x_np), np.int32)
    for part, m in _chunks(np.arange(len(x_np)), batch_size):
        pred[part[:m]] = np.asarray(predict(jnp.asarray(x_np[part])))[:m]
    return pred


def _run_member(name, i, attack, logits_fn, x_all, y_all, todo, clean_correct, broken_by, x_adv,
                *, key, eps, norm, bounds, batch_size, progress) -> np.ndarray:
    """Attack ``i`` on the examples ``todo``; returns which clean-correct examples it left
    robust, and records in ``broken_by`` / ``x_adv`` the examples it is the first to break."""
    run = jax.jit(
        lambda xb, yb, k: _run_and_predict(attack, logits_fn, xb, yb, k, eps, norm, bounds)
    )
    this_robust = clean_correct.copy()
    bar = progress_bar(-(-len(todo) // batch_size), desc=name, unit="batch", enabled=progress,
                       leave=False)
    for j, (part, m) in enumerate(_chunks(todo, batch_size)):
        xa, pred = run(
            jnp.asarray(x_all[part]), jnp.asarray(y_all[part]), jax.random.fold_in(key, j)
        )
        xa, pred = np.asarray(xa)[:m], np.asarray(pred)[:m]
        idx = part[:m]
        check_adversarial(
            x_all[idx], xa, eps=eps, norm=norm, bounds=bounds, name=f"attack {name!r}"
        )
        fooled = pred != y_all[idx]
        this_robust[idx[fooled]] = False
        first = fooled & (broken_by[idx] < 0)
        broken_by[idx[first]] = i
        x_adv[idx[first]] = xa[first]
        bar.update()
    bar.close()
    return this_robust


def _verify_ensemble(predict, x_all, y_all, x_adv, broken_by, clean_correct, robust, *, eps,
                     norm, bounds, batch_size):
    """One forward pass on the stored adversarial inputs: returns the examples robust to all
    attacks, notes, and how many reported breaks did not reproduce (counted robust)."""
    notes = []
    check_adversarial(x_all, x_adv, eps=eps, norm=norm, bounds=bounds, name="ensemble")
    final_robust = clean_correct & (_predict_all(predict, x_adv, batch_size) == y_all)
    not_reproduced = int((final_robust & ~robust).sum())
    if not_reproduced:
        notes.append(
            f"{not_reproduced} example(s) reported broken were classified correctly when their "
            "adversarial input was re-evaluated (numerical ties); they are counted as robust."
        )
        x_adv[final_robust & ~robust] = x_all[final_robust & ~robust]
        broken_by[final_robust & ~robust] = -1
    if int((~final_robust & robust).sum()):
        raise AttackSoundnessError(
            "ensemble: examples that no attack broke (x_adv = x) are now misclassified: "
            "logits_fn is not deterministic."
        )
    return final_robust, notes, not_reproduced


def _check_consistency(names, robust_acc, clean_acc, ensemble_acc, not_reproduced_frac,
                       cascade) -> None:
    for name in names:
        if robust_acc[name] > clean_acc:
            raise AttackSoundnessError(
                f"robust accuracy of {name!r} ({robust_acc[name]:.4f}) exceeds the clean accuracy "
                f"({clean_acc:.4f})."
            )
        # Examples whose break did not reproduce are counted robust in the ensemble only.
        if ensemble_acc > robust_acc[name] + not_reproduced_frac:
            raise AttackSoundnessError(
                f"ensemble robust accuracy ({ensemble_acc:.4f}) exceeds that of {name!r} "
                f"({robust_acc[name]:.4f})."
            )
    if cascade and any(
        robust_acc[a] < robust_acc[b] for a, b in zip(names, names[1:], strict=False)
    ):
        raise AttackSoundnessError(f"cumulative robust accuracy increased: {robust_acc}.")


def _run_and_predict(attack, logits_fn, x, y, key, eps, norm, bounds):
    x_adv = attack(logits_fn, x, y, key=key, eps=eps, norm=norm, bounds=bounds)
    return x_adv, jnp.argmax(logits_fn(x_adv), axis=-1)


def _masking_diagnostics(
    logits_fn,
    x_all,
    y_all,
    clean_correct,
    member_robust,
    n_broken,
    names,
    cascade,
    *,
    eps,
    norm,
    bounds,
    key,
    batch_size,
) -> list[str]:
    notes = []
    # 1. A black-box attack breaking points that the white-box attacks before it did not.
    is_bb = [any(nm.startswith(p) for p in _BLACK_BOX_PREFIXES) for nm in names]
    white = [nm for nm, bb in zip(names, is_bb, strict=True) if not bb]
    for nm, bb in zip(names, is_bb, strict=True):
        if not bb or not white:
            continue
        if cascade:
            pos = names.index(nm)
            if not any(not b for b in is_bb[:pos]):
                continue
            extra = n_broken[nm]
        else:
            white_robust = np.logical_and.reduce([member_robust[w] for w in white])
            extra = int((white_robust & ~member_robust[nm]).sum())
        if extra > 0:
            notes.append(
                f"possible gradient masking: black-box {nm!r} broke {extra} example(s) that the "
                f"white-box attacks ({', '.join(white)}) did not."
            )

    idx = np.flatnonzero(clean_correct)[:batch_size]
    if len(idx) == 0:
        return notes
    part, n_valid = next(_chunks(idx, batch_size))
    xb, yb = jnp.asarray(x_all[part]), jnp.asarray(y_all[part])
    k_curve, k_big = jax.random.split(key)

    # 2. The PGD-CE loss should grow with the steps.
    steps = 20
    curve = jax.jit(
        lambda xb, yb, k: _attacks.pgd_loss_curve(
            logits_fn, xb, yb, key=k, eps=eps, norm=norm, bounds=bounds, steps=steps
        )[1]
    )
    trace = np.asarray(curve(xb, yb, k_curve))[:, :n_valid].mean(axis=1)
    if eps > 0 and not trace[-1] > trace[0] + 1e-6 * max(1.0, abs(trace[0])):
        notes.append(
            f"possible gradient masking: the mean PGD-{steps} cross-entropy did not increase "
            f"({trace[0]:.4g} at the start, {trace[-1]:.4g} after {steps} steps)."
        )

    # 3. Accuracy should reach 0 when the ball covers the whole box.
    n_features = math.prod(x_all.shape[1:])
    big = (bounds[1] - bounds[0]) * (1.0 if norm == "linf" else math.sqrt(n_features))
    attack_big = jax.jit(
        lambda xb, yb, k: jnp.argmax(
            logits_fn(
                _attacks.pgd(logits_fn, xb, yb, key=k, eps=big, norm=norm, bounds=bounds, steps=20)
            ),
            axis=-1,
        )
    )
    pred = np.asarray(attack_big(xb, yb, k_big))[:n_valid]
    acc_big = float(np.mean(pred == y_all[idx]))
    if acc_big > 0:
        notes.append(
            f"possible gradient masking: PGD-20 leaves {acc_big:.1%} of {n_valid} examples "
            f"correctly classified at eps = {big:.4g}, where the ball covers the whole input box."
        )
    return notes
