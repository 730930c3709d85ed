"""The Square attack (Andriushchenko et al. 2020, arXiv 1912.00049): score-based random search.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax._validation import check_int, check_positive_float
from tscnc_jax.attacks._common import (
    Best,
    LogitsFn,
    check_common,
    empty_best,
    margin_loss,
    misclassified,
    project,
    run_restarts,
)

# ----------------------------------------------------------------------------------------------
# Square attack (Andriushchenko et al. 2020).
# ----------------------------------------------------------------------------------------------


def square_p_schedule(n_queries: int, p_init: float = 0.8, rescale: bool = True) -> np.ndarray:
    """Fraction ``p`` of pixels changed at each iteration of the Square attack.

    ``p`` starts at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 (Andriushchenko et al. 2020, schedule designed for 10000 queries). With ``rescale`` the
    iteration index is first mapped to ``int(i / n_queries * 10000)`` so that the whole schedule is
    used within ``n_queries``; AutoAttack's standard version does not rescale (5000 queries).
    """
    n_queries = check_int("n_queries", n_queries)
    thresholds = np.array([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000])
    it = np.arange(n_queries)
    if rescale:
        it = (it / n_queries * 10000).astype(np.int64)
    n_halvings = np.sum(it[:, None] > thresholds[None, :], axis=1)
    return p_init / 2.0**n_halvings


def _as_image(x: jax.Array) -> tuple[int, int, int]:
    """``(H, W, C)`` seen by Square: NHWC as is, ``B x H x W`` one channel, ``B x D`` one row."""
    if x.ndim == 4:
        return x.shape[1], x.shape[2], x.shape[3]
    if x.ndim == 3:
        return x.shape[1], x.shape[2], 1
    if x.ndim == 2:
        return 1, x.shape[1], 1
    raise ValueError(
        f"square needs inputs of shape (B, H, W, C), (B, H, W) or (B, D); got {x.shape}"
    )


def _square_windows(n_queries, p_init, rescale, h, w, c) -> tuple[np.ndarray, np.ndarray]:
    """Window height and width per iteration: squares of side ``round(sqrt(p * H * W))`` for images
    (at least 1, at most the image), segments of ``round(p * D)`` features for flat inputs."""
    p = square_p_schedule(n_queries, p_init, rescale)
    del c  # the side is sqrt(p * n_features / C): the window spans all channels
    if h == 1:  # flat inputs: a window is a contiguous run of p * D features
        side_w = np.clip(np.round(p * w), 1, w).astype(np.int32)
        return np.ones_like(side_w), side_w
    side = np.clip(np.round(np.sqrt(p * h * w)), 1, min(h, w)).astype(np.int32)
    return side, side


def square(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    n_queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    rescale_schedule: bool = True,
) -> jax.Array:
    """Square attack (Andriushchenko et al. 2020, arXiv 1912.00049), score-based, L-inf only.

    Uses only forward passes of ``logits_fn`` (no gradients). It starts from vertical stripes
    ``x + eps * s`` with a random sign per column and channel, then repeats: pick a random square
    window (side from :func:`square_p_schedule`), set it to ``x +/- eps`` with one random sign per
    channel, and keep the proposal when it lowers the margin ``z_y - max_{j != y} z_j``. An example
    stops being updated once misclassified; the loop exits early when the whole batch is.
    Windows and signs are drawn independently per example.

    Args:
      logits_fn: maps a batch to logits ``B x K``.
      x: clean inputs inside ``bounds``; ``B x H x W x C`` (NHWC), ``B x H x W`` or ``B x D``.
      y: integer labels ``B``.
      key: PRNG key.
      eps: L-inf radius (may be traced).
      norm: must be ``"linf"`` (the L2 variant is not implemented).
      bounds: ``(lo, hi)`` box of valid inputs.
      n_queries: iterations (one forward pass each) per restart, after the initial query.
      p_init: initial fraction of pixels changed (0.8 in AutoAttack's standard version).
      restarts: independent runs, skipped once every example is broken.
      rescale_schedule: map the 10000-query p-schedule onto ``n_queries``.

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    norm, lo, hi, _ = check_common(logits_fn, x, y, eps, norm, bounds)
    if norm != "linf":
        raise ValueError("square: only norm='linf' is implemented; use apgd/pgd for L2.")
    n_queries = check_int("n_queries", n_queries)
    restarts = check_int("restarts", restarts)
    p_init = check_positive_float("p_init", p_init)
    if p_init > 1:
        raise ValueError(f"`p_init` must be in (0, 1]; got {p_init}.")
    bounds = (lo, hi)
    h, w, c = _as_image(x)
    b = x.shape[0]
    img_shape = (b, h, w, c)
    win_h_np, win_w_np = _square_windows(n_queries, p_init, rescale_schedule, h, w, c)
    win_h = jnp.asarray(win_h_np)
    win_w = jnp.asarray(win_w_np)
    x_img = jnp.reshape(x, img_shape)
    rows = jnp.arange(h)
    cols = jnp.arange(w)

    def margin(x_img_adv):
        return -margin_loss(logits_fn(jnp.reshape(x_img_adv, x.shape)), y)

    def proj(v):
        return project(v, x_img, eps, "linf", bounds)

    def run(k, r):
        del r
        k_init, k_loop = jax.random.split(k)
        stripes = jax.random.rademacher(k_init, (b, 1, w, c), x.dtype)
        x_best = proj(x_img + eps * stripes)
        m_best = margin(x_best)

        def cond(state):
            i, _, m = state
            return (i < n_queries) & jnp.any(m > 0)

        def body(state):
            i, xb, m = state
            k_h, k_w, k_s = jax.random.split(jax.random.fold_in(k_loop, i), 3)
            sh, sw = win_h[i], win_w[i]
            top = jax.random.randint(k_h, (b,), 0, h - sh + 1)
            left = jax.random.randint(k_w, (b,), 0, w - sw + 1)
            in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + sh)[:, None])
            in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + sw)[:, None])
            window = in_rows[:, :, None, None] & in_cols[:, None, :, None]
            signs = jax.random.rademacher(k_s, (b, 1, 1, c), x.dtype)
            x_new = proj(jnp.where(window, xb + 2 * eps * signs, xb))
            m_new = margin(x_new)
            accept = (m > 0) & ((m_new < m) | (m_new <= 0))
            xb = jnp.where(accept[:, None, None, None], x_new, xb)
            return i + 1, xb, jnp.where(accept, m_new, m)

        _, x_best, m_best = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, m_best))
        # ``margin <= 0`` may be a tie; the returned flag uses argmax like every other attack.
        adv = misclassified(logits_fn(jnp.reshape(x_best, x.shape)), y)
        return Best(jnp.reshape(x_best, x.shape), adv, -m_best.astype(jnp.float32))

    return run_restarts(restarts, key, empty_best(x), run).x
