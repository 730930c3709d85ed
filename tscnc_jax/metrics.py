"""Metrics of a trained model beyond accuracy: the empirical local Lipschitz constant.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tscnc_jax._validation import check_choice, check_int, is_tracer
from tscnc_jax.attacks._common import (
    NORMS,
    TINY,
    LogitsFn,
    as_float,
    ascent_direction,
    check_bounds,
    check_eps,
    project,
    random_start,
)

# ----------------------------------------------------------------------------------------------
# Empirical local Lipschitz constant.
# ----------------------------------------------------------------------------------------------


def local_lipschitz(logits_fn: LogitsFn, x: jax.Array, *, key: jax.Array, eps: Any,
                    norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), steps: int = 20,
                    step_size: Any = None) -> jax.Array:
    """Per-example empirical local Lipschitz constant of ``logits_fn`` around ``x``.

    ``L_b = max ||f(x'_b) - f(x_b)||_2 / ||x'_b - x_b||_2`` over the iterates of a projected
    gradient ascent on ``log`` of that ratio, with ``x'`` in the ``eps``-ball (``norm``) around
    ``x`` and in ``bounds``, started uniformly in the ball (the search of Yang et al. 2020, "A
    closer look at accuracy vs. robustness", with L2 norms on both sides so that it is directly
    comparable with the product of the layers' spectral norms). Every evaluated ``x'`` is a
    witness, so ``L_b`` is a lower bound of the Lipschitz constant of ``f`` on the ball: for a
    network of Dense layers and 1-Lipschitz activations it never exceeds the product of the
    kernels' ``sigma_max``, and for a linear map it approaches ``sigma_max`` when the top right
    singular direction fits in the ball.

    Args:
      logits_fn: maps a batch ``x_Bx...`` to outputs ``B x K``; examples must be independent.
      x: clean inputs inside ``bounds``.
      key: PRNG key of the random starts.
      eps: radius of the search ball (> 0; may be traced).
      norm: ball of the search, ``"linf"`` or ``"l2"``; the ratio always uses L2 norms.
      bounds: ``(lo, hi)`` box of valid inputs.
      steps: ascent steps (static); ``steps + 1`` points are evaluated.
      step_size: default ``eps / 4`` (sign steps for L-inf, unit-L2 steps for L2).

    Returns:
      ``L_B``, one estimate per example, in the outputs' float dtype (at least float32).
    """
    norm = check_choice("norm", norm, NORMS)
    bounds = check_bounds(bounds)
    check_eps(eps)
    if not is_tracer(eps) and float(eps) <= 0:
        raise ValueError(f"`eps` must be > 0 for a Lipschitz estimate; got {eps!r}.")
    steps = check_int("steps", steps)
    if not hasattr(x, "shape") or jnp.ndim(x) < 2:
        raise ValueError(f"`x` must be a batch of shape (B, ...); got {getattr(x, 'shape', x)}.")
    if step_size is None:
        step_size = eps / 4
    else:
        check_eps(step_size, "step_size")
    fx = jax.lax.stop_gradient(as_float(logits_fn(x)))

    def log_ratio(x_new):
        num = jnp.sum(jnp.square(as_float(logits_fn(x_new)) - fx), axis=1)
        den = jnp.sum(jnp.square(jnp.reshape(x_new - x, (x.shape[0], -1))), axis=1)
        den = den.astype(num.dtype)
        # 0.5 log(num / den), guarded where x' = x (a start clipped onto x by the box).
        return 0.5 * (jnp.log(num + TINY**2) - jnp.log(jnp.maximum(den, TINY**2)))

    vg = jax.value_and_grad(lambda z: jnp.sum(log_ratio(z)))

    def step(carry, _):
        x_cur, best = carry
        best = jnp.maximum(best, log_ratio(x_cur))
        _, g = vg(x_cur)
        x_next = project(x_cur + step_size * ascent_direction(g, norm), x, eps, norm, bounds)
        return (x_next, best), None

    x0 = random_start(key, x, eps, norm, bounds, "uniform")
    init = jnp.full((x.shape[0],), -jnp.inf, fx.dtype)
    (x_last, best), _ = jax.lax.scan(step, (x0, init), None, length=steps)
    best = jnp.maximum(best, log_ratio(x_last))
    return jnp.exp(best)
