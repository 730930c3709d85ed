"""FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018), with restarts and per-example best.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tscnc_jax._validation import check_choice, check_int
from tscnc_jax.attacks._common import (
    INITS,
    PGD_LOSSES,
    LogitsFn,
    ascent_direction,
    check_common,
    check_eps,
    check_loss_classes,
    check_x_init,
    empty_best,
    first_start,
    loss_value,
    make_value_and_grad,
    misclassified,
    project,
    random_start,
    run_restarts,
    update_best,
)

# ----------------------------------------------------------------------------------------------
# FGSM and PGD.
# ----------------------------------------------------------------------------------------------


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array | None = None, eps: Any,
         norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0),
         loss: str = "ce") -> jax.Array:
    """Fast gradient (sign) method (Goodfellow et al. 2015): one step of length ``eps``.

    ``x_adv = clip(x + eps * sign(grad_x L(x, y)))`` for L-inf, ``x + eps * g / ||g||_2`` for L2.

    Args:
      logits_fn, x, y, eps, norm, bounds: the attacks' shared arguments (:mod:`tscnc_jax.attacks`).
      key: unused (FGSM is deterministic); accepted for a uniform attack signature.
      loss: one of ``PGD_LOSSES`` (``"kl"`` has zero gradient at ``x``; avoid it here).

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    del key
    norm, lo, hi, n_classes = check_common(logits_fn, x, y, eps, norm, bounds)
    loss = check_choice("loss", loss, PGD_LOSSES)
    check_loss_classes(loss, n_classes)
    clean = jax.lax.stop_gradient(logits_fn(x)) if loss == "kl" else None
    vg = make_value_and_grad(logits_fn, loss, y, clean)
    _, _, g = vg(x)
    return project(x + eps * ascent_direction(g, norm), x, eps, norm, (lo, hi))


def _pgd_run(vg, fwd, x, y, x0, eps, norm, bounds, steps, step_size):
    """One PGD run from ``x0``; returns (best, loss trace ``(steps + 1) x B`` of the iterates)."""

    def step(carry, _):
        x_cur, best = carry
        loss, logits, g = vg(x_cur)
        best = update_best(best, x_cur, misclassified(logits, y), loss)
        x_next = project(x_cur + step_size * ascent_direction(g, norm), x, eps, norm, bounds)
        return (x_next, best), loss.astype(jnp.float32)

    (x_last, best), trace = jax.lax.scan(step, (x0, empty_best(x)), None, length=steps)
    loss, logits = fwd(x_last)
    best = update_best(best, x_last, misclassified(logits, y), loss)
    return best, jnp.concatenate([trace, loss.astype(jnp.float32)[None]], axis=0)


def _pgd_setup(logits_fn, x, y, eps, norm, bounds, steps, restarts, step_size, loss, init):
    norm, lo, hi, n_classes = check_common(logits_fn, x, y, eps, norm, bounds)
    steps = check_int("steps", steps)
    restarts = check_int("restarts", restarts)
    loss = check_choice("loss", loss, PGD_LOSSES)
    init = check_choice("init", init, INITS)
    check_loss_classes(loss, n_classes)
    if step_size is None:
        # Madry et al.'s rule of thumb: steps * step_size = 2.5 * eps, so that the iterate can
        # cross the ball from a random start and still move along its boundary.
        step_size = 2.5 * eps / steps
    else:
        check_eps(step_size, "step_size")
    clean = jax.lax.stop_gradient(logits_fn(x)) if loss == "kl" else None
    vg = make_value_and_grad(logits_fn, loss, y, clean)

    def fwd(x_adv):
        logits = logits_fn(x_adv)
        return loss_value(loss, logits, y, None, clean), logits

    return norm, (lo, hi), steps, restarts, step_size, init, vg, fwd


def pgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: Any,
        norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), steps: int = 10,
        restarts: int = 1, step_size: Any = None, loss: str = "ce", init: str = "uniform",
        x_init: jax.Array | None = None) -> jax.Array:
    """Projected gradient ascent (Madry et al. 2018) with random restarts.

    ``x_{t+1} = P(x_t + step_size * d(grad L(x_t)))`` with ``d = sign`` (L-inf) or the unit-L2
    gradient (L2) and ``P`` the projection onto the ``eps``-ball and ``bounds``. Every iterate
    (including the last) is scored; each example returns its best one: a misclassified iterate if
    any (the one of highest loss), otherwise the iterate of highest loss, over all restarts.

    Args:
      logits_fn, x, y, eps, norm, bounds: the attacks' shared arguments (:mod:`tscnc_jax.attacks`).
      key: PRNG key for the random starts.
      steps: gradient steps per restart (static).
      restarts: independent runs (static); later runs are skipped once all examples are broken.
      step_size: step length; default ``2.5 * eps / steps``.
      loss: ``"ce"``, ``"cw"`` (margin), ``"dlr"`` or ``"kl"`` (to the clean prediction, TRADES).
      init: ``"uniform"`` (in the ball), ``"normal"`` (``x + 0.001 N(0, I)``, TRADES) or ``"none"``.
      x_init: optional starting point of the first restart (projected onto the ball and bounds),
        e.g. per-example random starts drawn by the caller; later restarts use ``init``.

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    norm, bounds, steps, restarts, step_size, init, vg, fwd = _pgd_setup(
        logits_fn, x, y, eps, norm, bounds, steps, restarts, step_size, loss, init
    )
    check_x_init(x_init, x)

    def run(k, r):
        x0 = random_start(k, x, eps, norm, bounds, init)
        x0 = first_start(x_init, x0, r, x, eps, norm, bounds)
        return _pgd_run(vg, fwd, x, y, x0, eps, norm, bounds, steps, step_size)[0]

    return run_restarts(restarts, key, empty_best(x), run).x


def pgd_loss_curve(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: Any,
                   norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), steps: int = 10,
                   step_size: Any = None, loss: str = "ce", init: str = "uniform",
                   x_init: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One PGD run (as :func:`pgd`, one restart) that also returns the loss of every iterate.

    Returns:
      ``(x_adv, losses)`` with ``losses`` of shape ``(steps + 1) x B``: the loss at the start and
      after each step. A loss that does not grow with the steps is a sign of gradient masking.
    """
    norm, bounds, steps, _, step_size, init, vg, fwd = _pgd_setup(
        logits_fn, x, y, eps, norm, bounds, steps, 1, step_size, loss, init
    )
    check_x_init(x_init, x)
    x0 = first_start(
        x_init, random_start(key, x, eps, norm, bounds, init), 0, x, eps, norm, bounds
    )
    best, trace = _pgd_run(vg, fwd, x, y, x0, eps, norm, bounds, steps, step_size)
    return best.x, trace
