"""The Square attack (Andriushchenko et al. 2020, arXiv 1912.00049): score-based random search,
L-inf and L2.

Every example draws its randomness from its own key (folded with its own iteration count) and
counts its own queries, so an example's run does not depend on the other rows of its batch.
:func:`square_init` and :func:`square_steps` expose a run as a per-example state
(:class:`SquareState`) that can be advanced in segments; a driver may drop the examples that are
done between segments and re-batch the others, with the same result for every example as one
uninterrupted :func:`square` call (:func:`tscnc_jax.evaluation.evaluate_robustness` does this).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax._validation import check_choice, check_int, check_positive_float
from tscnc_jax.attacks._common import (
    NORMS,
    TINY,
    Best,
    LogitsFn,
    bcast,
    check_bounds,
    check_common,
    check_eps,
    empty_best,
    margin_loss,
    misclassified,
    perturbation_norm,
    project,
    run_restarts,
)

# ----------------------------------------------------------------------------------------------
# Schedules and windows.
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
    """L-inf window height and width per iteration: squares of side ``round(sqrt(p * H * W))`` for
    images (at least 1, at most the image), segments of ``round(p * D)`` features for flat
    inputs."""
    p = square_p_schedule(n_queries, p_init, rescale)
    del c  # the side is sqrt(p * n_features / C): the window spans all channels
    if h == 1:  # flat inputs: a window is a contiguous run of p * D features
        side_w = np.clip(np.round(p * w), 1, w).astype(np.int32)
        return np.ones_like(side_w), side_w
    side = np.clip(np.round(np.sqrt(p * h * w)), 1, min(h, w)).astype(np.int32)
    return side, side


def _l2_windows(n_queries, p_init, rescale, h, w) -> tuple[np.ndarray, np.ndarray]:
    """L2 window height and width per iteration: squares of side ``max(round(sqrt(p * H * W)),
    3)``, made odd so that the pattern has a centre pixel, at most the image; flat inputs use runs
    of ``max(round(p * D), 3)`` features, likewise odd."""
    p = square_p_schedule(n_queries, p_init, rescale)
    if h == 1:
        side_w = np.maximum(np.round(p * w), 3).astype(np.int32)
        side_w = np.minimum(side_w + (side_w % 2 == 0), w).astype(np.int32)
        return np.ones_like(side_w), side_w
    side = np.maximum(np.round(np.sqrt(p * h * w)), 3).astype(np.int32)
    side = np.minimum(side + (side % 2 == 0), min(h, w)).astype(np.int32)
    return side, side


def _centred_rings(a: int, b: int) -> np.ndarray:
    """An ``a x b`` bump of unit L2 norm: the sum of ``1 / (k + 1)^2`` over the centred rectangles
    ``k = 0, 1, ...`` (half-sizes ``k`` around pixel ``(a // 2, b // 2)``) that contain the pixel,
    i.e. ``sum_{k = d}^{K - 1} (k + 1)^-2`` with ``d`` the Chebyshev distance to the centre and
    ``K = max(a // 2, b // 2) + 1`` rectangles (Andriushchenko et al. 2020, Sec. 3.2)."""
    n_rect = max(a // 2, b // 2) + 1
    tail = np.cumsum(1.0 / np.arange(n_rect, 0, -1) ** 2)[::-1]  # tail[d] = sum_{k >= d}
    d = np.maximum(np.abs(np.arange(a)[:, None] - a // 2), np.abs(np.arange(b)[None, :] - b // 2))
    bump = tail[d]
    return bump / np.linalg.norm(bump)


def _eta(sh: int, sw: int, split_rows: bool) -> np.ndarray:
    """The L2 update pattern on an ``sh x sw`` window, unit L2 norm: a centred-ring bump on each
    half of the window, the two of opposite signs (the window is split between rows, or between
    columns; a one-pixel-high window is always split between columns). For a square window the
    column split is the transpose of the row split."""
    out = np.zeros((sh, sw))
    if sh >= 2 and (split_rows or sw < 2):
        t = sh // 2
        out[:t] = _centred_rings(t, sw)
        out[t:] = -_centred_rings(sh - t, sw)
    elif sw >= 2:
        t = sw // 2
        out[:, :t] = _centred_rings(sh, t)
        out[:, t:] = -_centred_rings(sh, sw - t)
    else:
        out[:] = 1.0
    return out / np.linalg.norm(out)


def _l2_tables(n_queries, p_init, rescale, h, w):
    """Per iteration: window height and width, and the index of its shape in a table of patterns
    ``(n_shapes, 2, max_h, max_w)`` (row split, column split; zero beyond the shape)."""
    win_h, win_w = _l2_windows(n_queries, p_init, rescale, h, w)
    shapes = sorted(set(zip(win_h.tolist(), win_w.tolist(), strict=True)))
    index = {s: k for k, s in enumerate(shapes)}
    table = np.zeros((len(shapes), 2, int(win_h.max()), int(win_w.max())))
    for k, (a, b) in enumerate(shapes):
        table[k, 0, :a, :b] = _eta(a, b, True)
        table[k, 1, :a, :b] = _eta(a, b, False)
    shape_idx = np.array([index[s] for s in zip(win_h.tolist(), win_w.tolist(), strict=True)],
                         np.int32)
    return win_h, win_w, shape_idx, table


def _l2_start_maps(h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The L2 start's layout: the image tiled, centred, with blocks of side
    ``max(min(H, W) // 5, 1)`` (flat inputs: runs of ``max(D // 5, 1)`` features). Returns the block
    of every pixel (-1 outside every block), the pattern of every pixel for row-split and
    column-split blocks (``2 x H x W``), and the number of blocks."""
    bh, bw = (1, max(w // 5, 1)) if h == 1 else (max(min(h, w) // 5, 1),) * 2
    nh, nw = h // bh, w // bw
    oh, ow = (h - nh * bh) // 2, (w - nw * bw) // 2
    block = np.full((h, w), -1, np.int32)
    patterns = np.zeros((2, h, w))
    split = (_eta(bh, bw, True), _eta(bh, bw, False))
    for i in range(nh):
        for j in range(nw):
            r, c = oh + i * bh, ow + j * bw
            block[r : r + bh, c : c + bw] = i * nw + j
            for s in range(2):
                patterns[s, r : r + bh, c : c + bw] = split[s]
    return block, patterns, nh * nw


def _window_mask(top, left, sh, sw, h: int, w: int) -> jax.Array:
    """``B x H x W x 1`` bool: rows ``[top, top + sh)`` and columns ``[left, left + sw)``."""
    rows, cols = jnp.arange(h), jnp.arange(w)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + sh)[:, None])
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + sw)[:, None])
    return in_rows[:, :, None, None] & in_cols[:, None, :, None]


# ----------------------------------------------------------------------------------------------
# One run, per example.
# ----------------------------------------------------------------------------------------------


class SquareState(NamedTuple):
    """Per-example state of one Square run; rows are independent and may be re-batched.

    Attributes:
      x_adv: the run's current point, its best so far (shape and dtype of ``x``).
      margin: float ``B``: ``z_y - max_{j != y} z_j`` at ``x_adv``; once ``<= 0`` (broken) the
        example is no longer updated.
      queries: int32 ``B``: iterations done after the initial query; at ``n_queries`` the budget
        is spent and the example is no longer updated.
    """

    x_adv: jax.Array
    margin: jax.Array
    queries: jax.Array


def _split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each example's key split into its start key and its loop key."""
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def _margin_fn(logits_fn, x, y):
    return lambda x_img: -margin_loss(logits_fn(jnp.reshape(x_img, x.shape)), y)


def _start(logits_fn, x, y, keys, eps, norm, bounds) -> SquareState:
    h, w, c = _as_image(x)
    b = x.shape[0]
    x_img = jnp.reshape(x, (b, h, w, c))
    k_start = _split_keys(keys)[0]
    if norm == "linf":  # vertical stripes x +/- eps, one sign per column and channel
        stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, w, c), x.dtype))(k_start)
        x0 = project(x_img + eps * stripes, x_img, eps, "linf", bounds)
    else:  # a grid of the L2 pattern, one sign per block and channel, rescaled to norm eps
        block_np, patterns_np, n_blocks = _l2_start_maps(h, w)
        block = jnp.asarray(np.maximum(block_np, 0))
        inside = jnp.asarray(block_np >= 0)[None, :, :, None]
        patterns = jnp.asarray(patterns_np, x.dtype)

        def draws(k):
            k_flip, k_sign = jax.random.split(k)
            return (jax.random.bernoulli(k_flip, 0.5, (n_blocks,)),
                    jax.random.rademacher(k_sign, (n_blocks, c), x.dtype))

        flips, signs = jax.vmap(draws)(k_start)
        pattern = jnp.where(flips[:, block], patterns[1], patterns[0])  # B x H x W
        delta = jnp.where(inside, pattern[..., None] * signs[:, block, :], 0.0)
        scale = eps / jnp.maximum(perturbation_norm(delta, "l2"), TINY)
        x0 = project(x_img + delta * bcast(scale, delta).astype(x.dtype), x_img, eps, "l2", bounds)
    return SquareState(jnp.reshape(x0, x.shape), _margin_fn(logits_fn, x, y)(x0),
                       jnp.zeros((b,), jnp.int32))


def _linf_proposal(k_it, it, xb, x_img, eps, bounds, windows):
    """Sets a random square window to ``x +/- eps`` (one sign per channel)."""
    win_h, win_w = windows
    _, h, w, c = xb.shape
    sh, sw = win_h[it], win_w[it]

    def draws(k, sh, sw):
        k_top, k_left, k_sign = jax.random.split(k, 3)
        return (jax.random.randint(k_top, (), 0, h - sh + 1),
                jax.random.randint(k_left, (), 0, w - sw + 1),
                jax.random.rademacher(k_sign, (c,), xb.dtype))

    top, left, signs = jax.vmap(draws)(k_it, sh, sw)
    window = _window_mask(top, left, sh, sw, h, w)
    x_new = jnp.where(window, xb + 2 * eps * signs[:, None, None, :], xb)
    return project(x_new, x_img, eps, "linf", bounds)


def _l2_proposal(k_it, it, xb, x_img, eps, bounds, tables):
    """Moves the perturbation's mass on two random windows W1, W2 (same size) into W1.

    Per channel, W1 gets the direction ``eta * s + delta_W1 / ||delta_W1||`` (``eta`` the pattern
    of :func:`_eta`, ``s`` a random sign) with the norm ``sqrt(||delta_{W1 u W2}||^2 + (eps^2 -
    ||delta||^2)_+ / C)``, and W2 outside W1 is zeroed: the total norm becomes
    ``max(||delta||, eps)``, i.e. eps, up to rounding, which a final rescaling to eps removes.
    """
    win_h, win_w, shape_idx, table = tables
    _, h, w, c = xb.shape
    sh, sw = win_h[it], win_w[it]

    def draws(k, sh, sw):
        ks = jax.random.split(k, 6)
        return (jax.random.randint(ks[0], (), 0, h - sh + 1),
                jax.random.randint(ks[1], (), 0, w - sw + 1),
                jax.random.randint(ks[2], (), 0, h - sh + 1),
                jax.random.randint(ks[3], (), 0, w - sw + 1),
                jax.random.bernoulli(ks[4], 0.5),
                jax.random.rademacher(ks[5], (c,), xb.dtype))

    top1, left1, top2, left2, flip, signs = jax.vmap(draws)(k_it, sh, sw)
    w1 = _window_mask(top1, left1, sh, sw, h, w)
    w2 = _window_mask(top2, left2, sh, sw, h, w)
    pattern = table[shape_idx[it], flip.astype(jnp.int32)]  # B x max_h x max_w
    local_r = jnp.clip(jnp.arange(h)[None] - top1[:, None], 0, table.shape[2] - 1)
    local_c = jnp.clip(jnp.arange(w)[None] - left1[:, None], 0, table.shape[3] - 1)
    eta = jax.vmap(lambda p, r, q: p[r][:, q])(pattern, local_r, local_c)  # B x H x W
    eta = jnp.where(w1, eta[..., None] * signs[:, None, None, :], 0.0)

    delta = xb - x_img
    sq = delta * delta
    norm_w1 = jnp.sqrt(jnp.sum(jnp.where(w1, sq, 0.0), axis=(1, 2), keepdims=True))
    mass_both = jnp.sum(jnp.where(w1 | w2, sq, 0.0), axis=(1, 2), keepdims=True)
    spare = jnp.maximum(eps**2 - jnp.sum(sq, axis=(1, 2, 3)), 0.0)
    new_w1 = eta + jnp.where(w1, delta, 0.0) / (norm_w1 + TINY)
    norm_new = jnp.sqrt(jnp.sum(new_w1 * new_w1, axis=(1, 2), keepdims=True))
    new_w1 = new_w1 / (norm_new + TINY) * jnp.sqrt(mass_both + bcast(spare, xb) / c)
    delta = jnp.where(w1, new_w1, jnp.where(w2, 0.0, delta))
    scale = eps / jnp.maximum(perturbation_norm(delta, "l2"), TINY)
    return project(x_img + delta * bcast(scale, delta).astype(xb.dtype), x_img, eps, "l2", bounds)


def _steps(logits_fn, x, y, state, keys, eps, norm, bounds, n_queries, p_init, rescale,
           stop_at_active) -> SquareState:
    h, w, c = _as_image(x)
    b = x.shape[0]
    img_shape = (b, h, w, c)
    x_img = jnp.reshape(x, img_shape)
    k_loop = _split_keys(keys)[1]
    if norm == "linf":
        windows = tuple(map(jnp.asarray, _square_windows(n_queries, p_init, rescale, h, w, c)))

        def proposal(k_it, it, xb):
            return _linf_proposal(k_it, it, xb, x_img, eps, bounds, windows)
    else:
        win_h, win_w, shape_idx, table = _l2_tables(n_queries, p_init, rescale, h, w)
        tables = (jnp.asarray(win_h), jnp.asarray(win_w), jnp.asarray(shape_idx),
                  jnp.asarray(table, x.dtype))

        def proposal(k_it, it, xb):
            return _l2_proposal(k_it, it, xb, x_img, eps, bounds, tables)

    margin = _margin_fn(logits_fn, x, y)

    def active(m, q):
        return (m > 0) & (q < n_queries)

    def cond(s):
        is_active = active(s[1], s[2])
        return jnp.any(is_active) & (jnp.sum(is_active) > stop_at_active)

    def body(s):
        xb, m, q = s
        is_active = active(m, q)
        it = jnp.minimum(q, n_queries - 1)
        x_new = proposal(jax.vmap(jax.random.fold_in)(k_loop, it), it, xb)
        m_new = margin(x_new)
        accept = is_active & ((m_new < m) | (m_new <= 0))
        return (jnp.where(bcast(accept, xb), x_new, xb), jnp.where(accept, m_new, m),
                q + is_active.astype(q.dtype))

    init = (jnp.reshape(state.x_adv, img_shape), state.margin, state.queries)
    xb, m, q = jax.lax.while_loop(cond, body, init)
    return SquareState(jnp.reshape(xb, x.shape), m, q)


def _check_run_args(norm, bounds, n_queries, p_init) -> tuple[str, tuple[float, float], int, float]:
    norm = check_choice("norm", norm, NORMS)
    bounds = check_bounds(bounds)
    n_queries = check_int("n_queries", n_queries)
    p_init = check_positive_float("p_init", p_init)
    if p_init > 1:
        raise ValueError(f"`p_init` must be in (0, 1]; got {p_init}.")
    return norm, bounds, n_queries, p_init


def _check_keys(keys, x) -> None:
    if jnp.shape(keys)[:1] != (x.shape[0],):
        raise ValueError(
            f"`keys` must hold one PRNG key per example ({x.shape[0]}); got shape "
            f"{jnp.shape(keys)}."
        )


def square_init(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, keys: jax.Array, eps: Any,
                norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0)) -> SquareState:
    """The starting point of a Square run, per example (one query).

    L-inf: vertical stripes ``x + eps * s`` with a random sign per column and channel. L2: the
    image tiled with square blocks of side ``min(H, W) // 5``, each holding the pattern of
    :func:`square_steps` (two centred bumps of opposite signs) with a random orientation and a
    random sign per channel, the whole rescaled to L2 norm ``eps`` (Andriushchenko et al. 2020).
    Both are clipped into ``bounds``.

    Args:
      logits_fn, x, y, eps, norm, bounds: as for :func:`square`.
      keys: one PRNG key per example (shape ``B``); the same key must be passed to
        :func:`square_steps` for the rest of the run.

    Returns:
      A :class:`SquareState` with ``queries = 0``.
    """
    norm, bounds, _, _ = _check_run_args(norm, bounds, 1, 1.0)
    check_eps(eps)
    _as_image(x)
    _check_keys(keys, x)
    return _start(logits_fn, x, y, keys, eps, norm, bounds)


def square_steps(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, state: SquareState, *,
                 keys: jax.Array, eps: Any, norm: str = "linf",
                 bounds: tuple[float, float] = (0.0, 1.0), n_queries: int = 5000,
                 p_init: float = 0.8, rescale_schedule: bool = True,
                 stop_at_active: Any = 0) -> SquareState:
    """Advances a Square run (see :func:`square`) until every example is done, or until at most
    ``stop_at_active`` examples are still active.

    An example is active while its margin is positive and ``queries < n_queries``; each iteration
    is one forward pass of the whole batch and updates the active examples only. An example's
    window size follows its own ``queries`` and its draws come from ``fold_in(key, queries)``, so
    stopping, dropping the examples that are done and resuming the others in another batch gives
    each example the result of an uninterrupted run.

    Args:
      logits_fn, x, y, eps, norm, bounds, n_queries, p_init, rescale_schedule: as for
        :func:`square`.
      state: from :func:`square_init` or a previous call (rows in the order of ``x``).
      keys: the keys given to :func:`square_init`.
      stop_at_active: return as soon as at most this many examples are active (may be traced);
        0 runs to the end.

    Returns:
      The advanced :class:`SquareState`.
    """
    norm, bounds, n_queries, p_init = _check_run_args(norm, bounds, n_queries, p_init)
    check_eps(eps)
    _as_image(x)
    _check_keys(keys, x)
    return _steps(logits_fn, x, y, state, keys, eps, norm, bounds, n_queries, p_init,
                  bool(rescale_schedule), stop_at_active)


# ----------------------------------------------------------------------------------------------
# Square attack (Andriushchenko et al. 2020).
# ----------------------------------------------------------------------------------------------


def square(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: Any,
           norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), n_queries: int = 5000,
           p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = True) -> jax.Array:
    """Square attack (Andriushchenko et al. 2020, arXiv 1912.00049), score-based, L-inf or L2.

    Uses only forward passes of ``logits_fn`` (no gradients) and minimises the margin ``z_y -
    max_{j != y} z_j`` by random search: a proposal is kept when it lowers the margin, and an
    example stops being updated once misclassified (margin ``<= 0``) or out of queries. The window
    side follows :func:`square_p_schedule`: ``sqrt(p * H * W)`` pixels, all channels.

    * L-inf: start from vertical stripes ``x + eps * s`` (a random sign per column and channel);
      a proposal sets one random window to ``x +/- eps`` (one random sign per channel).
    * L2: start from a grid of centred bumps of the L2 budget (:func:`square_init`); a proposal
      takes two random windows W1 and W2 (odd side, at least 3), puts into W1 a new pattern of two
      centred bumps of opposite signs (random orientation, random sign per channel) added to W1's
      current direction, with all the mass of W1 and W2 plus the unused budget, and empties W2;
      the perturbation keeps L2 norm ``eps`` before clipping into ``bounds``.

    Every example uses its own key ``fold_in(key, b)`` (``b`` its row; restart ``r`` folds in
    ``r`` too), so its result does not depend on the rest of the batch; the loop exits early once
    every example is done. The run is :func:`square_init` followed by :func:`square_steps`.

    Args:
      logits_fn, x, y, key, eps, norm, bounds: the attacks' shared arguments
        (:mod:`tscnc_jax.attacks`); ``x`` is ``B x H x W x C`` (NHWC), ``B x H x W`` or ``B x D``.
      n_queries: iterations (one forward pass each) per restart, after the initial query.
      p_init: initial fraction of pixels changed (0.8 in AutoAttack's standard version).
      restarts: independent runs, skipped once every example is broken.
      rescale_schedule: map the 10000-query p-schedule onto ``n_queries``.

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    norm, lo, hi, _ = check_common(logits_fn, x, y, eps, norm, bounds)
    norm, bounds, n_queries, p_init = _check_run_args(norm, (lo, hi), n_queries, p_init)
    restarts = check_int("restarts", restarts)
    _as_image(x)
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(x.shape[0]))

    def run(k, r):
        del k  # the examples' own keys, folded with the restart
        keys = jax.vmap(jax.random.fold_in, (0, None))(example_keys, r)
        state = _start(logits_fn, x, y, keys, eps, norm, bounds)
        state = _steps(logits_fn, x, y, state, keys, eps, norm, bounds, n_queries, p_init,
                       bool(rescale_schedule), 0)
        # ``margin <= 0`` may be a tie; the returned flag uses argmax like every other attack.
        adv = misclassified(logits_fn(state.x_adv), y)
        return Best(state.x_adv, adv, -state.margin.astype(jnp.float32))

    return run_restarts(restarts, key, empty_best(x), run).x
