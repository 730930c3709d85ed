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
from tscnc_jax.attacks._common import (
    NORMS,
    AttackFn,
    LogitsFn,
    StochasticLogitsFn,
    bcast,
    check_common,
    misclassified,
    predict_under_draws,
)
from tscnc_jax.attacks.apgd import apgd
from tscnc_jax.attacks.fab import fab
from tscnc_jax.attacks.pgd import fgsm, pgd
from tscnc_jax.attacks.square import square

# ----------------------------------------------------------------------------------------------
# AutoAttack-style ensemble.
# ----------------------------------------------------------------------------------------------

# The members of the "standard" version, in its order.
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
# Every member a version can run: the indices of ``AutoAttackResult.broken_by`` (fixed, whatever
# the version runs; APGD-DLR, a member of "rand" only, comes last so that the indices of the
# standard members do not depend on it).
AUTOATTACK_ALL_ATTACKS = AUTOATTACK_ATTACKS + ("apgd-dlr",)


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """Budgets of the AutoAttack ensemble (Croce and Hein 2020).

    ``AutoAttackConfig()`` is the reference "standard" version, in AutoAttack's order: APGD-CE (100
    iterations, 1 restart), APGD-T (100 iterations, 9 target classes, 1 restart each), FAB-T (100
    iterations, 9 target classes, 1 restart each; ``alpha_max = 0.1``, ``eta = 1.05``, ``beta =
    0.9``), Square (5000 queries, ``p_init = 0.8``, schedule not rescaled). ``fab_t_targets = 0``
    leaves FAB-T out, ``apgd_t_targets = 0`` APGD-T and ``square_queries = 0`` Square. The same
    members and budgets serve both threat models (L-inf and L2).

    APGD-DLR (untargeted DLR loss, ``apgd_dlr_steps`` iterations, ``apgd_dlr_restarts`` restarts;
    0 restarts, the default, leaves it out) runs right after APGD-CE. ``eot_iter`` is the number of
    forward/backward passes each APGD gradient averages on a stochastic model (Expectation over
    Transformation; 1: none). :data:`AUTOATTACK_RAND` is the reference "rand" version built from
    these fields.
    """

    apgd_ce_steps: int = 100
    apgd_ce_restarts: int = 1
    apgd_t_steps: int = 100
    apgd_t_targets: int = 9
    apgd_t_restarts: int = 1
    fab_t_steps: int = 100
    fab_t_targets: int = 9  # 0: no FAB-T
    fab_t_restarts: int = 1
    square_queries: int = 5000
    square_p_init: float = 0.8
    square_restarts: int = 1
    square_rescale_schedule: bool = False
    rho: float = 0.75
    apgd_dlr_steps: int = 100
    apgd_dlr_restarts: int = 0  # 0: no APGD-DLR
    eot_iter: int = 1

    def __post_init__(self):
        may_be_zero = ("fab_t_targets", "apgd_t_targets", "square_queries", "apgd_dlr_restarts")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                check_int(f.name, v, 0 if f.name in may_be_zero else 1)


AUTOATTACK_STANDARD = AutoAttackConfig()
# For CI and per-checkpoint monitoring: the members of standard at small budgets, without FAB-T.
# FAB-T attacks the same targets as APGD-T, at a higher cost per iteration (a forward +
# input-gradient pass and a forward pass, against APGD-T's one pass): at 25 iterations and 3
# targets it would raise the cost of this monitor, whose numbers are compared across checkpoints,
# by about half, for a second opinion on the targets APGD-T already attacked. The final "standard"
# evaluation runs it.
AUTOATTACK_FAST = AutoAttackConfig(
    apgd_ce_steps=25,
    apgd_t_steps=25,
    apgd_t_targets=3,
    fab_t_targets=0,
    square_queries=250,
    square_rescale_schedule=True,
)
# AutoAttack's version for randomised defences (fra31/auto-attack, ``autoattack.py``,
# ``set_version('rand')``; README "Randomized defenses"): APGD-CE and APGD-DLR, 100 iterations and
# 1 run each, every gradient averaged over 20 draws of the model's randomness (EoT). Its model is
# a stochastic ``logits_fn(x, key)`` (``stochastic=True`` in :func:`auto_attack` and
# :func:`tscnc_jax.evaluation.evaluate_robustness`).
AUTOATTACK_RAND = AutoAttackConfig(
    apgd_ce_steps=100,
    apgd_ce_restarts=1,
    apgd_dlr_steps=100,
    apgd_dlr_restarts=1,
    apgd_t_targets=0,
    fab_t_targets=0,
    square_queries=0,
    eot_iter=20,
)
AUTOATTACK_VERSIONS = {
    "standard": AUTOATTACK_STANDARD,
    "fast": AUTOATTACK_FAST,
    "rand": AUTOATTACK_RAND,
}


def _autoattack_config(version: str | AutoAttackConfig) -> AutoAttackConfig:
    if isinstance(version, AutoAttackConfig):
        return version
    return AUTOATTACK_VERSIONS[check_choice("version", version, tuple(AUTOATTACK_VERSIONS))]


def autoattack_members(
    version: str | AutoAttackConfig = "standard",
    *,
    n_classes: int,
    norm: str = "linf",
    stochastic: bool = False,
) -> list[tuple[str, AttackFn]]:
    """The attacks of an AutoAttack version, in order, as ``(name, attack)`` pairs.

    Each ``attack(logits_fn, x, y, *, key, eps, norm, bounds)`` returns adversarial inputs. The
    order is APGD-CE, APGD-DLR, APGD-T, FAB-T, Square, each where the version has it. APGD-DLR is
    left out below 3 classes (the DLR loss needs 3); APGD-T uses ``min(apgd_t_targets, n_classes -
    1)`` targets and is left out below 4 classes (the targeted DLR loss needs 4); FAB-T uses
    ``min(fab_t_targets, n_classes - 1)`` targets (any ``n_classes >= 2``, both norms); Square runs
    for both norms.

    With ``stochastic=True`` the members attack a randomised ``logits_fn(x, key)``: the APGD members
    are bound with ``stochastic=True, eot_iter=cfg.eot_iter``; FAB-T and Square do not support it
    (``ValueError``: use ``"rand"``). A version with ``eot_iter > 1`` (``"rand"``) is for
    randomised models only and needs ``stochastic=True`` (``ValueError`` otherwise: a randomised
    model must take its randomness as a key, see :data:`AUTOATTACK_RAND`).
    """
    cfg = _autoattack_config(version)
    norm = check_choice("norm", norm, NORMS)
    n_classes = check_int("n_classes", n_classes, 2)
    if not stochastic and cfg.eot_iter > 1:
        raise ValueError(
            f"this version averages gradients over {cfg.eot_iter} draws of a randomised model "
            "(eot_iter > 1): pass `stochastic=True` and a `logits_fn(x, key)` that takes the key "
            "of its randomness."
        )
    if stochastic and (cfg.fab_t_targets > 0 or cfg.square_queries > 0):
        raise ValueError(
            "FAB-T and Square do not support stochastic models (`stochastic=True`); use "
            "version='rand' or a config with fab_t_targets=0 and square_queries=0."
        )
    eot = {"eot_iter": cfg.eot_iter, "stochastic": True} if stochastic else {}

    def apgd_member(loss, steps, restarts, **extra):
        return functools.partial(
            apgd, loss=loss, steps=steps, restarts=restarts, rho=cfg.rho, **extra, **eot
        )

    # (name, whether the version runs it for n_classes, the attack), in the cascade's order.
    candidates: list[tuple[str, bool, AttackFn]] = [
        ("apgd-ce", True, apgd_member("ce", cfg.apgd_ce_steps, cfg.apgd_ce_restarts)),
        (
            "apgd-dlr",
            cfg.apgd_dlr_restarts > 0 and n_classes >= 3,
            apgd_member("dlr", cfg.apgd_dlr_steps, cfg.apgd_dlr_restarts),
        ),
        (
            "apgd-t",
            cfg.apgd_t_targets > 0 and n_classes >= 4,
            apgd_member(
                "dlr-targeted",
                cfg.apgd_t_steps,
                cfg.apgd_t_restarts,
                n_target_classes=min(cfg.apgd_t_targets, n_classes - 1),
            ),
        ),
        (
            "fab-t",
            cfg.fab_t_targets > 0,
            functools.partial(
                fab,
                targeted=True,
                steps=cfg.fab_t_steps,
                restarts=cfg.fab_t_restarts,
                n_target_classes=min(cfg.fab_t_targets, n_classes - 1),
            ),
        ),
        (
            "square",
            cfg.square_queries > 0,
            functools.partial(
                square,
                n_queries=cfg.square_queries,
                p_init=cfg.square_p_init,
                restarts=cfg.square_restarts,
                rescale_schedule=cfg.square_rescale_schedule,
            ),
        ),
    ]
    return [(name, attack) for name, runs, attack in candidates if runs]


class AutoAttackResult(NamedTuple):
    """Output of :func:`auto_attack`.

    Attributes:
      x_adv: adversarial inputs (``x`` itself where nothing broke the example; for a stochastic
        model, every attacked example's final input: see :func:`auto_attack`).
      robust: bool ``B``: correctly classified on ``x`` and on every attack's output (for a
        stochastic model: on ``x`` and on ``x_adv``, by every one of ``n_draws`` draws of its
        randomness).
      clean_correct: bool ``B``: correctly classified on ``x``.
      broken_by: int32 ``B``: index in :data:`AUTOATTACK_ALL_ATTACKS` (whose first four entries are
        :data:`AUTOATTACK_ATTACKS`) of the first attack whose output is misclassified; ``-1`` if no
        attack broke the example, i.e. it is robust or was already misclassified on ``x`` (tell the
        two apart with ``clean_correct``).
    """

    x_adv: jax.Array
    robust: jax.Array
    clean_correct: jax.Array
    broken_by: jax.Array


def auto_attack(logits_fn: LogitsFn | StochasticLogitsFn, x: jax.Array, y: jax.Array, *,
                key: jax.Array, eps: Any, norm: str = "linf",
                bounds: tuple[float, float] = (0.0, 1.0),
                version: str | AutoAttackConfig = "standard", stochastic: bool = False,
                n_draws: int = 5) -> AutoAttackResult:
    """AutoAttack-style worst case over APGD-CE, APGD-T, FAB-T and Square (Croce and Hein 2020).

    The attacks run in that order; an example counts as broken by the first attack whose output is
    misclassified (checked here with ``argmax logits_fn(x_adv) != y``), and later attacks only
    matter for the examples still robust. Shapes are fixed, so each attack processes the whole
    batch; an attack is skipped (``lax.cond``) when no example is left. For cost-efficient
    evaluation of a data set, :func:`tscnc_jax.evaluation.evaluate_robustness` instead re-batches
    the surviving examples between attacks.

    A randomised model (``stochastic=True``, ``logits_fn(x, key)``) is attacked with
    ``version="rand"`` (:data:`AUTOATTACK_RAND`: APGD-CE then APGD-DLR with EoT). Its accuracy is
    a statement about its randomness: here an example counts as correctly classified on an input
    only if each of ``n_draws`` independent draws classifies it correctly. The clean check, and
    the check of each attack's output that decides which examples the next attack faces, use
    such draws; the result is then measured once more on fresh draws: every clean-correct
    example's final input (the output of the attack that broke it, else of the last attack that
    ran on it, which ``x_adv`` holds) is classified by ``n_draws`` draws independent of those
    that guided and selected the attacks, and ``robust`` is that verdict (``broken_by`` follows
    it: ``-1`` where a break did not reproduce, the last attack where the checks missed one).
    The reference, ``fra31/auto-attack``, checks each attack's output with one fresh forward
    pass and reports those checks. Keys: with ``stochastic=True``, ``k_attacks, k_model =
    split(key)``; attack ``i`` uses ``fold_in(k_attacks, i)``, its check ``fold_in(k_model, i)``,
    the clean check ``fold_in(k_model, n)`` and the final one ``fold_in(k_model, n + 1)``, ``n =
    len(AUTOATTACK_ALL_ATTACKS)``.

    Args:
      logits_fn, x, y, eps, norm, bounds: the attacks' shared arguments (:mod:`tscnc_jax.attacks`);
        with ``stochastic=True``, ``logits_fn(x, key)``.
      key: PRNG key (attack ``i`` uses ``fold_in(key, i)``, ``i`` its index in
        :data:`AUTOATTACK_ALL_ATTACKS`).
      version: ``"standard"``, ``"fast"``, ``"rand"`` or an :class:`AutoAttackConfig`.
      stochastic: ``logits_fn`` is a randomised model that takes the key of its randomness.
      n_draws: draws of a stochastic model's randomness per correctness check (ignored otherwise).

    Returns:
      An :class:`AutoAttackResult`.
    """
    stochastic = bool(stochastic)
    n_draws = check_int("n_draws", n_draws)
    if stochastic:
        k_attacks, k_model = jax.random.split(key)

        def shape_fn(z):
            return logits_fn(z, k_model)

        def correct(z, i):
            k = jax.random.fold_in(k_model, i)
            return predict_under_draws(logits_fn, z, y, k, n_draws) == y

        model_fn = logits_fn
    else:
        k_attacks, shape_fn, model_fn = key, logits_fn, logits_fn

        def correct(z, i):
            del i
            return ~misclassified(logits_fn(z), y)

    norm, lo, hi, n_classes = check_common(shape_fn, x, y, eps, norm, bounds)
    members = autoattack_members(version, n_classes=n_classes, norm=norm, stochastic=stochastic)
    n_all = len(AUTOATTACK_ALL_ATTACKS)
    clean_correct = correct(x, n_all)
    minus_one = jnp.full(y.shape, -1, jnp.int32)
    # (x_adv, still robust, broken_by, index of the last attack that ran on the example)
    state = (x, clean_correct, minus_one, minus_one)
    for name, attack in members:
        idx = AUTOATTACK_ALL_ATTACKS.index(name)

        def run(s, attack=attack, idx=idx):
            x_adv, robust, broken_by, last = s
            x_m = attack(
                model_fn,
                x,
                y,
                key=jax.random.fold_in(k_attacks, idx),
                eps=eps,
                norm=norm,
                bounds=(lo, hi),
            )
            newly = robust & ~correct(x_m, idx)
            # A stochastic model's unbroken examples keep the latest output (judged at the end).
            take = robust if stochastic else newly
            return (
                jnp.where(bcast(take, x), x_m, x_adv),
                robust & ~newly,
                jnp.where(newly, idx, broken_by),
                jnp.where(robust, idx, last),
            )

        state = jax.lax.cond(jnp.any(state[1]), run, lambda s: s, state)
    x_adv, robust, broken_by, last = state
    if stochastic:
        robust = clean_correct & correct(x_adv, n_all + 1)
        broken_by = jnp.where(
            robust, -1, jnp.where((broken_by < 0) & clean_correct, last, broken_by)
        )
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
    "fab-t": functools.partial(fab, targeted=True, steps=100, restarts=1),
    "fab": functools.partial(fab, targeted=False, steps=100, restarts=5),
    "square": functools.partial(square, n_queries=5000, rescale_schedule=False),
}
"""Named attacks (for deterministic models) with reference budgets: ``"pgd"`` is PGD-20 (CE),
``"apgd-*"`` 100 iterations, ``"apgd-t"`` and ``"fab-t"`` ``min(9, K - 1)`` targets (``"fab-t"``:
100 iterations, 1 restart each, as in AutoAttack's standard version), ``"fab"`` untargeted FAB with
100 iterations and 5 restarts (AutoAttack's defaults for it), ``"square"`` 5000 queries. For a
stochastic model bind ``stochastic=True`` yourself, e.g. ``functools.partial(apgd, loss="ce",
eot_iter=20, stochastic=True)``, or use the ``"rand"`` version."""


def get_attack(name: str) -> AttackFn:
    """Returns the attack registered under ``name`` in :data:`ATTACKS` (``ValueError`` if none)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}.")
    return ATTACKS[name]
