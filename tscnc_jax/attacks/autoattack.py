"""The AutoAttack-style ensemble (Croce and Hein 2020): its versions, members and cascade, and the
registry of named attacks the evaluation driver uses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tscnc_jax._validation import check_choice, check_int
from tscnc_jax.attacks._common import NORMS, AttackFn, LogitsFn, bcast, check_common, misclassified
from tscnc_jax.attacks.apgd import apgd
from tscnc_jax.attacks.pgd import fgsm, pgd
from tscnc_jax.attacks.square import square

# ----------------------------------------------------------------------------------------------
# AutoAttack-style ensemble.
# ----------------------------------------------------------------------------------------------

# Indices of ``AutoAttackResult.broken_by`` (fixed, whatever the version runs).
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-t", "square")


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """Budgets of the AutoAttack ensemble (Croce and Hein 2020).

    ``AutoAttackConfig()`` is the reference "standard" version: APGD-CE (100 iterations, 1 restart),
    APGD-T (100 iterations, 9 target classes, 1 restart each), Square (5000 queries, ``p_init =
    0.8``, schedule not rescaled). FAB-T is not implemented. Square is L-inf only and is skipped for
    L2, where the ensemble is APGD-CE + APGD-T.
    """

    apgd_ce_steps: int = 100
    apgd_ce_restarts: int = 1
    apgd_t_steps: int = 100
    apgd_t_targets: int = 9
    apgd_t_restarts: int = 1
    square_queries: int = 5000
    square_p_init: float = 0.8
    square_restarts: int = 1
    square_rescale_schedule: bool = False
    rho: float = 0.75

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                check_int(f.name, v)


AUTOATTACK_STANDARD = AutoAttackConfig()
# For CI and per-checkpoint monitoring: ~8x cheaper than standard on points that survive.
AUTOATTACK_FAST = AutoAttackConfig(
    apgd_ce_steps=25,
    apgd_t_steps=25,
    apgd_t_targets=3,
    square_queries=250,
    square_rescale_schedule=True,
)
AUTOATTACK_VERSIONS = {"standard": AUTOATTACK_STANDARD, "fast": AUTOATTACK_FAST}


def _autoattack_config(version: str | AutoAttackConfig) -> AutoAttackConfig:
    if isinstance(version, AutoAttackConfig):
        return version
    return AUTOATTACK_VERSIONS[check_choice("version", version, tuple(AUTOATTACK_VERSIONS))]


def autoattack_members(
    version: str | AutoAttackConfig = "standard", *, n_classes: int, norm: str = "linf"
) -> list[tuple[str, AttackFn]]:
    """The attacks of an AutoAttack version, in order, as ``(name, attack)`` pairs.

    Each ``attack(logits_fn, x, y, *, key, eps, norm, bounds)`` returns adversarial inputs. APGD-T
    uses ``min(apgd_t_targets, n_classes - 1)`` targets and is left out below 4 classes (the
    targeted DLR loss needs 4); Square is left out for L2.
    """
    cfg = _autoattack_config(version)
    norm = check_choice("norm", norm, NORMS)
    n_classes = check_int("n_classes", n_classes, 2)
    members: list[tuple[str, AttackFn]] = [
        (
            "apgd-ce",
            functools.partial(
                apgd, loss="ce", steps=cfg.apgd_ce_steps, restarts=cfg.apgd_ce_restarts, rho=cfg.rho
            ),
        )
    ]
    if n_classes >= 4:
        members.append(
            (
                "apgd-t",
                functools.partial(
                    apgd,
                    loss="dlr-targeted",
                    steps=cfg.apgd_t_steps,
                    restarts=cfg.apgd_t_restarts,
                    n_target_classes=min(cfg.apgd_t_targets, n_classes - 1),
                    rho=cfg.rho,
                ),
            )
        )
    if norm == "linf":
        members.append(
            (
                "square",
                functools.partial(
                    square,
                    n_queries=cfg.square_queries,
                    p_init=cfg.square_p_init,
                    restarts=cfg.square_restarts,
                    rescale_schedule=cfg.square_rescale_schedule,
                ),
            )
        )
    return members


class AutoAttackResult(NamedTuple):
    """Output of :func:`auto_attack`.

    Attributes:
      x_adv: adversarial inputs (``x`` itself where nothing broke the example).
      robust: bool ``B``: correctly classified on ``x`` and on every attack's output.
      clean_correct: bool ``B``: correctly classified on ``x``.
      broken_by: int32 ``B``: index in ``AUTOATTACK_ATTACKS`` of the first attack whose output is
        misclassified; ``-1`` if no attack broke the example, i.e. it is robust or was already
        misclassified on ``x`` (tell the two apart with ``clean_correct``).
    """

    x_adv: jax.Array
    robust: jax.Array
    clean_correct: jax.Array
    broken_by: jax.Array


def auto_attack(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    version: str | AutoAttackConfig = "standard",
) -> AutoAttackResult:
    """AutoAttack-style worst case over APGD-CE, APGD-T and Square (Croce and Hein 2020).

    The attacks run in that order; an example counts as broken by the first attack whose output is
    misclassified (checked here with ``argmax logits_fn(x_adv) != y``), and later attacks only
    matter for the examples still robust. Shapes are fixed, so each attack processes the whole
    batch; an attack is skipped (``lax.cond``) when no example is left. For cost-efficient
    evaluation of a data set, :func:`tscnc_jax.evaluation.evaluate_robustness` instead re-batches
    the surviving examples between attacks.

    Args:
      logits_fn: maps a batch to logits ``B x K``.
      x: clean inputs inside ``bounds``.
      y: integer labels ``B``.
      key: PRNG key (attack ``i`` uses ``fold_in(key, i)``).
      eps: radius of the threat model.
      norm: ``"linf"`` or ``"l2"`` (L2: no Square).
      bounds: ``(lo, hi)`` box of valid inputs.
      version: ``"standard"``, ``"fast"`` or an :class:`AutoAttackConfig`.

    Returns:
      An :class:`AutoAttackResult`.
    """
    norm, lo, hi, n_classes = check_common(logits_fn, x, y, eps, norm, bounds)
    members = autoattack_members(version, n_classes=n_classes, norm=norm)
    clean_correct = ~misclassified(logits_fn(x), y)
    state = (x, clean_correct, jnp.full(y.shape, -1, jnp.int32))
    for name, attack in members:
        idx = AUTOATTACK_ATTACKS.index(name)

        def run(s, attack=attack, idx=idx):
            x_adv, robust, broken_by = s
            x_m = attack(
                logits_fn,
                x,
                y,
                key=jax.random.fold_in(key, idx),
                eps=eps,
                norm=norm,
                bounds=(lo, hi),
            )
            newly = robust & misclassified(logits_fn(x_m), y)
            return (
                jnp.where(bcast(newly, x), x_m, x_adv),
                robust & ~newly,
                jnp.where(newly, idx, broken_by),
            )

        state = jax.lax.cond(jnp.any(state[1]), run, lambda s: s, state)
    x_adv, robust, broken_by = state
    return AutoAttackResult(x_adv, robust, clean_correct, broken_by)


# ----------------------------------------------------------------------------------------------
# Registry used by the evaluation driver.
# ----------------------------------------------------------------------------------------------

ATTACKS: dict[str, AttackFn] = {
    "fgsm": fgsm,
    "pgd": functools.partial(pgd, steps=20),
    "pgd-cw": functools.partial(pgd, steps=20, loss="cw"),
    "apgd-ce": functools.partial(apgd, loss="ce", steps=100),
    "apgd-dlr": functools.partial(apgd, loss="dlr", steps=100),
    "apgd-t": functools.partial(apgd, loss="dlr-targeted", steps=100),
    "square": functools.partial(square, n_queries=5000, rescale_schedule=False),
}
"""Named attacks with reference budgets: ``"pgd"`` is PGD-20 (CE), ``"apgd-*"`` 100 iterations,
``"apgd-t"`` ``min(9, K - 1)`` targets, ``"square"`` 5000 queries."""


def get_attack(name: str) -> AttackFn:
    """Returns the attack registered under ``name`` in :data:`ATTACKS` (``ValueError`` if none)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}.")
    return ATTACKS[name]
