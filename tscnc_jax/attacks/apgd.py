"""APGD (Croce and Hein 2020, arXiv 2003.01690): step-size-free PGD with momentum, CE and DLR
losses, targeted (APGD-T) over the top classes.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax._validation import check_choice, check_int
from tscnc_jax.attacks._common import (
    APGD_LOSSES,
    Best,
    LogitsFn,
    apgd_start,
    ascent_direction,
    bcast,
    check_common,
    check_loss_classes,
    check_x_init,
    empty_best,
    first_start,
    make_eot_value_and_grad,
    project,
    run_restarts,
    target_class_count,
    update_best,
)

# ----------------------------------------------------------------------------------------------
# APGD (Croce and Hein 2020).
# ----------------------------------------------------------------------------------------------


def apgd_checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """APGD's checkpoints for ``steps`` iterations.

    Checkpoints are ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce and Hein 2020, Sec. 3.2); as in the
    authors' implementation the interval lengths are ``int(0.22 n)``, decreasing by ``int(0.03 n)``
    down to ``int(0.06 n)`` (each at least 1).

    Returns:
      ``(is_checkpoint, window)``: boolean array of length ``steps`` marking the iterations that end
      an interval, and the length of the interval they end (0 elsewhere).
    """
    steps = check_int("steps", steps)
    k = max(int(0.22 * steps), 1)
    k_min = max(int(0.06 * steps), 1)
    k_decr = max(int(0.03 * steps), 1)
    is_ckpt = np.zeros(steps, np.bool_)
    window = np.zeros(steps, np.int32)
    i = k - 1
    while i < steps:
        is_ckpt[i] = True
        window[i] = k
        k = max(k - k_decr, k_min)
        i += k
    return is_ckpt, window


class _APGDState(NamedTuple):
    x_cur: jax.Array
    x_prev: jax.Array
    grad: jax.Array
    step: jax.Array  # B
    x_best: jax.Array  # highest-loss point of this run (restart point after halving)
    grad_best: jax.Array
    loss_best: jax.Array
    loss_prev: jax.Array
    n_increase: jax.Array  # B, successful increases since the last checkpoint
    loss_best_ckpt: jax.Array  # best loss at the last checkpoint
    reduced_ckpt: jax.Array  # bool B, step halved at the last checkpoint
    out: Best


def _apgd_run(vg, x, y, x0, eps, norm, bounds, steps, rho, target, k_model=None):
    """One APGD run from ``x0`` (Algorithm 1 of Croce and Hein 2020). ``vg(x, target, key)``
    returns ``(loss, misclassified, grad)``; a stochastic model's passes at iterate ``i`` (0: the
    start) use keys derived from ``fold_in(k_model, i)``."""
    is_ckpt_np, window_np = apgd_checkpoints(steps)
    is_ckpt = jnp.asarray(is_ckpt_np)
    window = jnp.asarray(window_np)

    def model_key(i):
        return None if k_model is None else jax.random.fold_in(k_model, i)

    loss0, adv0, g0 = vg(x0, target, model_key(0))
    loss0 = loss0.astype(jnp.float32)
    b = x.shape[0]
    state = _APGDState(
        x_cur=x0,
        x_prev=x0,
        grad=g0,
        step=jnp.full((b,), 2.0, jnp.float32) * eps,  # eta^(0) = 2 eps
        x_best=x0,
        grad_best=g0,
        loss_best=loss0,
        loss_prev=loss0,
        n_increase=jnp.zeros((b,), jnp.int32),
        loss_best_ckpt=loss0,
        reduced_ckpt=jnp.ones((b,), jnp.bool_),
        out=update_best(empty_best(x), x0, adv0, loss0),
    )

    def body(i, s: _APGDState) -> _APGDState:
        alpha = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)  # momentum; none on the first step
        step = bcast(s.step, x).astype(x.dtype)
        z = project(s.x_cur + step * ascent_direction(s.grad, norm), x, eps, norm, bounds)
        x_new = project(
            s.x_cur + alpha * (z - s.x_cur) + (1 - alpha) * (s.x_cur - s.x_prev),
            x,
            eps,
            norm,
            bounds,
        )
        loss, adv, g = vg(x_new, target, model_key(i + 1))
        loss = loss.astype(jnp.float32)
        out = update_best(s.out, x_new, adv, loss)
        n_increase = s.n_increase + (loss > s.loss_prev).astype(jnp.int32)
        improved = loss > s.loss_best
        imp_x = bcast(improved, x)
        x_best = jnp.where(imp_x, x_new, s.x_best)
        grad_best = jnp.where(imp_x, g, s.grad_best)
        loss_best = jnp.where(improved, loss, s.loss_best)

        # Checkpoint: halve the step and restart from the best point if (1) the loss increased in
        # at most a fraction rho of the steps since the last checkpoint (non-strict, as in the
        # authors' code), or (2) the step was not halved at the last checkpoint and the best loss
        # has not improved since.
        ckpt = is_ckpt[i]
        cond1 = n_increase.astype(jnp.float32) <= rho * window[i].astype(jnp.float32)
        cond2 = ~s.reduced_ckpt & (s.loss_best_ckpt >= loss_best)
        reduce = ckpt & (cond1 | cond2)
        red_x = bcast(reduce, x)
        return _APGDState(
            x_cur=jnp.where(red_x, x_best, x_new),
            x_prev=s.x_cur,
            grad=jnp.where(red_x, grad_best, g),
            step=jnp.where(reduce, s.step / 2, s.step),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            loss_prev=loss,
            n_increase=jnp.where(ckpt, 0, n_increase),
            loss_best_ckpt=jnp.where(ckpt, loss_best, s.loss_best_ckpt),
            reduced_ckpt=jnp.where(ckpt, reduce, s.reduced_ckpt),
            out=out,
        )

    # Once every example is misclassified the run's outcome is settled: stop (a robust example
    # keeps the loop going for the full budget, so robust accuracy is unaffected).
    _, state = jax.lax.while_loop(
        lambda c: (c[0] < steps) & ~jnp.all(c[1].out.adv),
        lambda c: (c[0] + 1, body(c[0], c[1])),
        (jnp.int32(0), state),
    )
    return state.out


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: Any,
         norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), steps: int = 100,
         restarts: int = 1, loss: str = "ce", n_target_classes: int | None = None,
         rho: float = 0.75, x_init: jax.Array | None = None, eot_iter: int = 1,
         stochastic: bool = False) -> jax.Array:
    """Auto-PGD (Croce and Hein 2020, arXiv 2003.01690), untargeted or targeted (APGD-T).

    Each run starts on the sphere of the ball, takes a first step of length ``eta = 2 eps`` and then
    momentum steps ``z = P(x_k + eta d(grad)); x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k -
    x_{k-1}))``. At the checkpoints of :func:`apgd_checkpoints` the step is halved, and the iterate
    reset to the best point of the run, where the loss increased in at most ``rho`` of the steps
    since the last checkpoint, or where the step was not halved at the last checkpoint and the best
    loss has not improved since. A run stops early once every example of the batch is
    misclassified.

    With ``loss="dlr-targeted"`` (APGD-T) the attack runs once per target class (``restarts`` runs
    each): the 2nd, 3rd, ... ``(n_target_classes + 1)``-th highest clean logits.

    A randomised model is attacked with ``stochastic=True``: ``logits_fn(x, key)`` takes the key
    of its randomness, and every forward pass gets a fresh one. Each iterate's gradient is then
    the mean over ``eot_iter`` passes (Expectation over Transformation, Athalye et al. 2018;
    AutoAttack's "rand" version uses 20); see
    :func:`tscnc_jax.attacks._common.make_eot_value_and_grad` for how the loss and the
    misclassification of an iterate are scored. The starting points do not depend on
    ``stochastic``: the runs use the keys ``fold_in(key, r)``, the model's draws keys derived from
    ``fold_in(key, n_runs)``: run ``r``, iterate ``i`` (0: the start), pass ``j`` uses
    ``fold_in(fold_in(fold_in(k, r), i), j)`` with ``k`` the second half of
    ``split(fold_in(key, n_runs))``; APGD-T's clean logits average ``eot_iter`` draws keyed from
    the first half. With ``stochastic=False`` (the default) ``eot_iter`` has no effect: every pass
    of a deterministic model would be the same, and one is made.

    Args:
      logits_fn, x, y, eps, norm, bounds: the attacks' shared arguments (:mod:`tscnc_jax.attacks`);
        with ``stochastic=True``, ``logits_fn(x, key)``.
      key: PRNG key for the starting points.
      steps: iterations per run (static).
      restarts: runs (per target for APGD-T), skipped once every example is broken.
      loss: ``"ce"`` (APGD-CE), ``"dlr"``, ``"cw"`` or ``"dlr-targeted"`` (APGD-T).
      n_target_classes: targets of APGD-T; default ``min(9, K - 1)`` (AutoAttack uses 9).
      rho: threshold of condition 1 (0.75).
      x_init: optional starting point of the first run (projected onto the ball and bounds);
        the other runs start at random on the sphere.
      eot_iter: forward/backward passes averaged per gradient of a stochastic model (static).
      stochastic: ``logits_fn`` is a randomised model ``logits_fn(x, key)``.

    Returns:
      Adversarial inputs, shape and dtype of ``x``: per example the first-found misclassified point
      of highest loss, else the highest-loss point of all runs.
    """
    stochastic = bool(stochastic)
    shape_fn = (lambda z: logits_fn(z, key)) if stochastic else logits_fn
    norm, lo, hi, n_classes = check_common(shape_fn, x, y, eps, norm, bounds)
    steps = check_int("steps", steps)
    restarts = check_int("restarts", restarts)
    eot_iter = check_int("eot_iter", eot_iter)
    loss = check_choice("loss", loss, APGD_LOSSES)
    check_loss_classes(loss, n_classes)
    rho = float(rho)
    if not 0.0 < rho < 1.0:
        raise ValueError(f"`rho` must be in (0, 1); got {rho}.")
    bounds = (lo, hi)
    check_x_init(x_init, x)
    vg = make_eot_value_and_grad(logits_fn, loss, y, eot_iter, stochastic)

    n_runs = restarts
    if loss == "dlr-targeted":
        n_target_classes = target_class_count(n_target_classes, n_classes)
        n_runs = n_target_classes * restarts
    # The model's draws: keys apart from the runs' fold_in(key, r), r < n_runs.
    k_clean, k_model = (
        jax.random.split(jax.random.fold_in(key, n_runs)) if stochastic else (None, None)
    )

    if loss == "dlr-targeted":
        if stochastic:
            clean_logits = jax.lax.map(
                lambda j: logits_fn(x, jax.random.fold_in(k_clean, j)), jnp.arange(eot_iter)
            ).mean(axis=0)
        else:
            clean_logits = logits_fn(x)
        clean_logits = jax.lax.stop_gradient(clean_logits)
        # Targets: the 2nd, 3rd, ... highest clean logits.
        targets = jax.lax.top_k(clean_logits, n_target_classes + 1)[1][:, 1:].astype(y.dtype)
    else:
        targets = None

    def run(k, r):
        target = None if targets is None else jnp.take(targets, r // restarts, axis=1)
        x0 = first_start(x_init, apgd_start(k, x, eps, norm, bounds), r, x, eps, norm, bounds)
        k_run = None if k_model is None else jax.random.fold_in(k_model, r)
        return _apgd_run(vg, x, y, x0, eps, norm, bounds, steps, rho, target, k_run)

    return run_restarts(n_runs, key, empty_best(x), run).x


apgd_ce = functools.partial(apgd, loss="ce")
apgd_ce.__doc__ = "APGD on the cross-entropy loss: ``apgd(..., loss='ce')``."
apgd_t = functools.partial(apgd, loss="dlr-targeted")
apgd_t.__doc__ = "APGD-T, targeted DLR over the top classes: ``apgd(..., loss='dlr-targeted')``."
