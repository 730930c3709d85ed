"""Adversarial attacks as pure functions over a ``logits_fn(x) -> logits``.

Every attack has the signature ``attack(logits_fn, x, y, *, key, eps, norm, bounds, ...)`` and
returns adversarial inputs of the shape and dtype of ``x``. Those arguments, documented here once
(an attack's docstring adds what is particular to it):

* ``logits_fn``: maps a batch ``x_Bx...`` to logits ``B x K``.
* ``x``: clean inputs inside ``bounds``; ``y``: integer labels ``B``.
* ``key``: PRNG key of the attack's random draws.
* ``eps``: radius of the threat model.
* ``norm``: ``"linf"`` or ``"l2"``; ``bounds``: ``(lo, hi)`` box of valid inputs (``(0, 1)`` by
  default).

Hyperparameters that change the shape of the computation (steps, restarts, targets, queries, the
loss and the norm) are static Python values; ``eps`` may be a traced scalar. Nothing is jitted
here: callers jit, e.g.::

    attack = jax.jit(lambda x, y, key: apgd(logits_fn, x, y, key=key, eps=8 / 255))
    x_adv = attack(x_BxHxWxC, y_B, jax.random.key(0))

Conventions shared by all attacks:

* Threat models: ``norm="linf"`` (``||x_adv - x||_inf <= eps``) and ``norm="l2"``
  (``||x_adv - x||_2 <= eps``, per example), always intersected with the box
  ``bounds = (lo, hi)``.
* Iterations run in ``lax.scan`` / ``lax.fori_loop`` / ``lax.while_loop``; bookkeeping is per
  example with ``jnp.where``. Each attack returns, per example, the best point it evaluated: a
  misclassified point if it found one (the one of highest loss), otherwise the point of highest
  loss. FAB, a minimum-norm attack, ranks by norm instead: the misclassified point of smallest
  norm inside the ball, otherwise ``x`` itself. Restarts only matter for points no restart has
  broken yet, and are skipped once the whole batch is broken; an APGD, FAB or Square run also stops
  as soon as every example of the batch is broken (nothing it could still find changes the robust
  accuracy).
* ``logits_fn`` must treat examples independently (no batch statistics): gradients are taken of the
  sum of per-example losses.
* Randomised models (randomised defences, test-time dropout, input noise) make their randomness
  explicit: a :data:`StochasticLogitsFn` ``logits_fn(x, key)``, given a fresh key for every fresh
  draw. APGD attacks one with ``stochastic=True`` and averages each gradient over ``eot_iter``
  draws (Expectation over Transformation); :data:`AUTOATTACK_RAND` (``version="rand"``) is
  AutoAttack's version for them. The other attacks take deterministic models only.
* Argument checks: static arguments are checked eagerly (``ValueError`` naming the argument). The
  data checks (``x`` inside ``bounds``, labels in ``[0, n_classes)``, ``eps >= 0``) run when the
  values are concrete and are skipped under tracing;
  :func:`tscnc_jax.evaluation.evaluate_robustness` checks its data eagerly before jitting.

Losses (all maximised by the attacker, per example; ``z`` are the logits, ``y`` the label):

* ``"ce"``: cross-entropy ``logsumexp(z) - z_y``.
* ``"cw"``: Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (Carlini and Wagner 2017).
* ``"dlr"``: difference of logits ratio ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``,
  with ``z_pi1 >= z_pi2 >= ...`` the sorted logits (Croce and Hein 2020).
* ``"dlr-targeted"``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` for a target ``t``.
* ``"kl"``: ``KL(softmax(z_clean) || softmax(z))`` to the clean prediction, the inner loss of TRADES
  (Zhang et al. 2019).

References:

* Goodfellow, Shlens, Szegedy 2015, "Explaining and harnessing adversarial examples" (FGSM).
* Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks" (PGD).
* Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", arXiv 2003.01690 (APGD, DLR loss, AutoAttack, FAB-T).
* Croce and Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
  attack", arXiv 1907.02044 (FAB).
* Andriushchenko, Croce, Flammarion, Hein 2020, "Square Attack: a query-efficient black-box
  adversarial attack via random search", arXiv 1912.00049.
"""

from tscnc_jax.attacks._common import (
    APGD_LOSSES,
    INITS,
    NORMS,
    PGD_LOSSES,
    AttackFn,
    LogitsFn,
    StochasticLogitsFn,
    check_bounds,
    check_eps,
    cross_entropy_loss,
    dlr_loss,
    kl_loss,
    margin_loss,
    perturbation_norm,
    predict_under_draws,
    project,
)
from tscnc_jax.attacks.apgd import apgd, apgd_ce, apgd_checkpoints, apgd_t
from tscnc_jax.attacks.autoattack import (
    ATTACKS,
    AUTOATTACK_ALL_ATTACKS,
    AUTOATTACK_ATTACKS,
    AUTOATTACK_FAST,
    AUTOATTACK_RAND,
    AUTOATTACK_STANDARD,
    AUTOATTACK_VERSIONS,
    AutoAttackConfig,
    AutoAttackResult,
    auto_attack,
    autoattack_members,
    get_attack,
)
from tscnc_jax.attacks.fab import fab, fab_min_norm
from tscnc_jax.attacks.pgd import fgsm, pgd, pgd_loss_curve
from tscnc_jax.attacks.square import (
    SquareState,
    square,
    square_init,
    square_p_schedule,
    square_steps,
)

__all__ = [
    "APGD_LOSSES",
    "ATTACKS",
    "AUTOATTACK_ALL_ATTACKS",
    "AUTOATTACK_ATTACKS",
    "AUTOATTACK_FAST",
    "AUTOATTACK_RAND",
    "AUTOATTACK_STANDARD",
    "AUTOATTACK_VERSIONS",
    "INITS",
    "NORMS",
    "PGD_LOSSES",
    "AttackFn",
    "AutoAttackConfig",
    "AutoAttackResult",
    "LogitsFn",
    "StochasticLogitsFn",
    "apgd",
    "apgd_ce",
    "apgd_checkpoints",
    "apgd_t",
    "auto_attack",
    "autoattack_members",
    "check_bounds",
    "check_eps",
    "cross_entropy_loss",
    "dlr_loss",
    "fab",
    "fab_min_norm",
    "fgsm",
    "get_attack",
    "kl_loss",
    "margin_loss",
    "perturbation_norm",
    "pgd",
    "pgd_loss_curve",
    "predict_under_draws",
    "project",
    "SquareState",
    "square",
    "square_init",
    "square_p_schedule",
    "square_steps",
]
