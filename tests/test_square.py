"""Tests of the Square attack (tscnc_jax.attacks.square): the L2 variant against its definition and
a linear model's closed form, the threat-model contract, and resumable per-example runs."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_mlp

from tscnc_jax import attacks as A
from tscnc_jax.evaluation import check_adversarial

# ``tscnc_jax.attacks.square`` is also the name of the function: import the module itself.
S = importlib.import_module("tscnc_jax.attacks.square")


def _mlp_logits_fn(scale: float = 3.0):
    return toy_mlp.tanh_mlp(scale)


def _clean_correct_batch(logits_fn, n=32, shape=(8, 8, 1), seed=5):
    x = jax.random.uniform(jax.random.key(seed), (n, *shape))
    return x, jnp.argmax(logits_fn(x.reshape(n, 8, 8, 1)), -1)


def _l2(delta):
    return np.linalg.norm(np.asarray(delta, np.float64).reshape(delta.shape[0], -1), axis=1)


# ------------------------------------------------------------------------------------------------
# The L2 pattern and windows (Andriushchenko et al. 2020, Sec. 3.2).
# ------------------------------------------------------------------------------------------------


def _rings_by_accumulation(a, b):
    """The definition, literally: add 1/(k+1)^2 on the centred rectangle of half-size k (clipped
    to the block), for k = 0 .. max(a // 2, b // 2); then normalise."""
    out = np.zeros((a, b))
    for k in range(max(a // 2, b // 2) + 1):
        r0, c0 = a // 2 - k, b // 2 - k
        out[max(r0, 0) : min(r0 + 2 * k + 1, a), max(c0, 0) : min(c0 + 2 * k + 1, b)] += (
            1.0 / (k + 1) ** 2
        )
    return out / np.linalg.norm(out)


@pytest.mark.parametrize(("a", "b"), [(1, 1), (1, 7), (2, 5), (3, 3), (4, 9), (12, 25), (13, 13)])
def test_centred_rings_match_their_definition(a, b):
    np.testing.assert_allclose(S._centred_rings(a, b), _rings_by_accumulation(a, b), rtol=1e-12)


@pytest.mark.parametrize("s", [3, 5, 8, 25])
def test_eta_pattern(s):
    rows = S._eta(s, s, True)
    cols = S._eta(s, s, False)
    np.testing.assert_allclose(np.linalg.norm(rows), 1.0, rtol=1e-12)
    np.testing.assert_allclose(cols, rows.T, rtol=1e-12)  # the other orientation: a transpose
    top, bottom = rows[: s // 2], rows[s // 2 :]
    assert (top > 0).all() and (bottom < 0).all()
    # Each half is the ring bump of its own size, both halves with the same mass.
    np.testing.assert_allclose(top * np.sqrt(2), _rings_by_accumulation(s // 2, s), rtol=1e-12)
    np.testing.assert_allclose(-bottom * np.sqrt(2), _rings_by_accumulation(s - s // 2, s),
                               rtol=1e-12)
    flat = S._eta(1, s, True)  # a one-pixel-high window is split between columns
    assert (flat[0, : s // 2] > 0).all() and (flat[0, s // 2 :] < 0).all()


def test_l2_windows_follow_the_p_schedule():
    h, w = S._l2_windows(5000, 0.8, False, 28, 28)
    p = A.square_p_schedule(5000, 0.8, rescale=False)
    expected = np.maximum(np.round(np.sqrt(p * 28 * 28)), 3)
    expected = np.minimum(expected + (expected % 2 == 0), 28)
    np.testing.assert_array_equal(h, expected)
    np.testing.assert_array_equal(h, w)
    assert (h % 2 == 1).all() and h[0] == 25 and h[-1] == 3
    fh, fw = S._l2_windows(100, 0.8, True, 1, 64)  # flat inputs: runs of features
    assert (fh == 1).all() and (fw % 2 == 1).all() and fw.max() <= 64 and fw.min() >= 3


# ------------------------------------------------------------------------------------------------
# Threat model.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "bounds", "eps"),
    [
        ((8, 8, 1), (0.0, 1.0), 0.7),
        ((8, 8), (0.0, 1.0), 1.5),
        ((64,), (0.0, 1.0), 0.7),
        ((8, 8, 1), (-1.0, 1.0), 3.0),
    ],
    ids=["nhwc", "nhw", "flat", "wide-box"],
)
def test_l2_outputs_in_ball_and_box_under_jit(shape, bounds, eps):
    lo, hi = bounds
    base = _mlp_logits_fn()
    logits_fn = lambda z: base(z.reshape(z.shape[0], 8, 8, 1))
    x = lo + (hi - lo) * jax.random.uniform(jax.random.key(1), (16, *shape))
    x = x.at[:4].set(lo).at[4:8].set(hi)  # examples on the faces of the box
    y = jnp.arange(16, dtype=jnp.int32) % 10
    run = jax.jit(lambda x, y, k: A.square(logits_fn, x, y, key=k, eps=eps, norm="l2",
                                           bounds=bounds, n_queries=60))
    x_adv = run(x, y, jax.random.key(0))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    check_adversarial(x, x_adv, eps=eps, norm="l2", bounds=bounds)
    assert float(jnp.max(jnp.abs(x_adv - x))) > 0  # it moved


def test_l2_start_and_steps_spend_the_whole_budget():
    # Away from the faces of the box nothing is clipped: every point is at L2 distance eps.
    logits_fn = _mlp_logits_fn()
    x = jnp.full((8, 8, 8, 1), 0.5)
    y = jnp.arange(8, dtype=jnp.int32)
    keys = jax.random.split(jax.random.key(0), 8)
    kw = {"keys": keys, "eps": 0.8, "norm": "l2", "bounds": (-10.0, 10.0)}
    state = S.square_init(logits_fn, x, y, **kw)
    np.testing.assert_allclose(_l2(state.x_adv - x), 0.8, rtol=1e-5)
    state = S.square_steps(logits_fn, x, y, state, n_queries=50, **kw)
    np.testing.assert_allclose(_l2(state.x_adv - x), 0.8, rtol=1e-5)
    assert (np.asarray(state.queries) <= 50).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_breaks_nothing(norm):
    logits_fn = _mlp_logits_fn()
    x, y = _clean_correct_batch(logits_fn)
    x_adv = A.square(logits_fn, x, y, key=jax.random.key(0), eps=0.0, norm=norm, n_queries=50)
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eager_and_jit_agree(norm):
    logits_fn = _mlp_logits_fn()
    x, y = _clean_correct_batch(logits_fn, n=16)
    eps = 0.05 if norm == "linf" else 0.5

    def attack(x, y, k):
        return A.square(logits_fn, x, y, key=k, eps=eps, norm=norm, n_queries=80)

    eager = np.asarray(attack(x, y, jax.random.key(0)))
    jitted = np.asarray(jax.jit(attack)(x, y, jax.random.key(0)))
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(logits_fn(eager), -1), np.argmax(logits_fn(jitted), -1))
    other = np.asarray(jax.jit(attack)(x, y, jax.random.key(1)))
    assert not np.array_equal(jitted, other)  # the key matters


# ------------------------------------------------------------------------------------------------
# A linear model: the L2 worst case in closed form.
# ------------------------------------------------------------------------------------------------


def _linear_l2_problem(eps):
    """Label 0 against a single competitor (class 1) on 8x8x1 inputs; the other classes are 50
    below. Example e is placed at L2 distance d_e = m_e / ||w_0 - w_1|| from the boundary, d_e
    spread over [0.2 eps, 1.6 eps]; at eps its best margin is m_e - eps ||w_0 - w_1|| (the box is
    never in the way: the optimal step stays inside [0, 1])."""
    d, k, b = 64, 10, 48
    rng = np.random.default_rng(0)
    w_dxk = rng.normal(size=(d, k)).astype(np.float64)
    bias = np.full(k, -50.0)
    bias[0] = 0.0
    dw = w_dxk[:, 0] - w_dxk[:, 1]
    unit = dw / np.linalg.norm(dw)
    x = rng.uniform(0.4, 0.6, size=(b, d))
    centre = np.median(x @ unit)
    distance = np.linspace(0.2 * eps, 1.6 * eps, b)
    x += (centre + distance - x @ unit)[:, None] * unit  # now x @ unit = centre + distance
    bias[1] = centre * np.linalg.norm(dw)
    optimum = x - eps * unit  # the closed-form minimiser of the margin in the ball
    assert optimum.min() > 0 and optimum.max() < 1 and x.min() > 0 and x.max() < 1
    w_dxk, bias = w_dxk.astype(np.float32), bias.astype(np.float32)
    x = x.astype(np.float32).reshape(b, 8, 8, 1)

    def logits_fn(z):
        return z.reshape(z.shape[0], -1) @ w_dxk + bias

    margin0 = x.reshape(b, -1) @ (w_dxk[:, 0] - w_dxk[:, 1]) - bias[1]
    return logits_fn, jnp.asarray(x), jnp.zeros(b, jnp.int32), margin0, float(np.linalg.norm(dw))


def test_l2_square_on_linear_model_reaches_the_closed_form():
    eps = 0.5
    logits_fn, x, y, margin0, dw_norm = _linear_l2_problem(eps)
    distance = margin0 / dw_norm
    x_adv = jax.jit(lambda x, y: A.square(logits_fn, x, y, key=jax.random.key(0), eps=eps,
                                          norm="l2", n_queries=1000))(x, y)
    check_adversarial(x, x_adv, eps=eps, norm="l2")
    broken = np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)
    # Never a point the closed form says is out of reach; every point well within reach.
    robust = distance > eps
    assert robust.sum() >= 10 and not broken[robust].any()
    assert broken[distance < 0.7 * eps].all() and (distance < 0.7 * eps).sum() >= 10
    # On the points it cannot break, Square keeps lowering the margin towards the optimum
    # m - eps ||w_0 - w_1||, never beyond it (random search: about 0.7-0.8 of the way here).
    margin = -np.asarray(A.margin_loss(logits_fn(x_adv), y))
    best = margin0 - eps * dw_norm
    assert (margin[robust] >= best[robust] - 1e-4).all()
    gained = (margin0 - margin)[robust] / (eps * dw_norm)
    assert gained.min() > 0.6, gained


def test_l2_square_without_gradients_beats_blind_gradient_attacks():
    eps = 0.5
    logits_fn, x, y, margin0, dw_norm = _linear_l2_problem(eps)
    no_grad_fn = lambda z: logits_fn(jax.lax.stop_gradient(z))
    x_sq = A.square(no_grad_fn, x, y, key=jax.random.key(0), eps=eps, norm="l2", n_queries=300)
    x_pgd = A.pgd(no_grad_fn, x, y, key=jax.random.key(0), eps=eps, norm="l2", steps=10,
                  init="none")
    easy = margin0 / dw_norm < 0.6 * eps
    assert easy.sum() >= 10
    assert (np.asarray(jnp.argmax(logits_fn(x_sq), -1) != y)[easy]).all()
    assert int(jnp.sum(jnp.argmax(logits_fn(x_pgd), -1) != y)) == 0


# ------------------------------------------------------------------------------------------------
# Per-example runs: segments, re-batching.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_segments_rebatched_equal_one_run(norm):
    """square_init + square_steps stopped early, with the examples that are done dropped and the
    others shuffled into smaller batches, give exactly square()'s output."""
    logits_fn = _mlp_logits_fn()
    x, y = _clean_correct_batch(logits_fn, n=32)
    eps, n_queries, key = (0.12 if norm == "linf" else 1.0), 150, jax.random.key(7)
    kw = {"eps": eps, "norm": norm, "bounds": (0.0, 1.0)}
    expected = np.asarray(A.square(logits_fn, x, y, key=key, n_queries=n_queries, **kw))

    # square() gives example b the key fold_in(key, b), folded with the restart (0).
    keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(key, b), 0))(jnp.arange(32))
    state = S.square_init(logits_fn, x, y, keys=keys, **kw)
    xs, ms, qs = (np.array(a) for a in state)
    steps = jax.jit(lambda x, y, st, k, stop: S.square_steps(
        logits_fn, x, y, st, keys=k, n_queries=n_queries, stop_at_active=stop, **kw))
    rng = np.random.default_rng(0)
    n_segments = 0
    while True:
        active = np.flatnonzero((ms > 0) & (qs < n_queries))
        if not len(active):
            break
        rng.shuffle(active)
        size = len(active)
        st = S.SquareState(jnp.asarray(xs[active]), jnp.asarray(ms[active]),
                           jnp.asarray(qs[active]))
        out = steps(x[active], y[active], st, keys[active], 3 * size // 4)
        xs[active], ms[active], qs[active] = (np.asarray(a) for a in out)
        n_segments += 1
    assert n_segments >= 3  # it did stop and resume
    np.testing.assert_array_equal(xs, expected)


def test_square_steps_stops_at_active_count():
    logits_fn = _mlp_logits_fn()
    x, y = _clean_correct_batch(logits_fn, n=32)
    keys = jax.random.split(jax.random.key(0), 32)
    kw = {"keys": keys, "eps": 0.08}
    state = S.square_steps(logits_fn, x, y, S.square_init(logits_fn, x, y, **kw),
                           n_queries=400, stop_at_active=16, **kw)
    active = (np.asarray(state.margin) > 0) & (np.asarray(state.queries) < 400)
    assert active.sum() <= 16 and np.asarray(state.queries).max() < 400
    # Queries are counted per example: the ones done stopped counting.
    assert len(np.unique(np.asarray(state.queries))) > 1


def test_bad_arguments():
    logits_fn = _mlp_logits_fn()
    x, y = _clean_correct_batch(logits_fn, n=4)
    keys = jax.random.split(jax.random.key(0), 4)
    with pytest.raises(ValueError, match="keys"):
        S.square_init(logits_fn, x, y, keys=keys[:3], eps=0.1)
    with pytest.raises(ValueError, match="norm"):
        A.square(logits_fn, x, y, key=jax.random.key(0), eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="p_init"):
        A.square(logits_fn, x, y, key=jax.random.key(0), eps=0.1, norm="l2", p_init=1.5)
    with pytest.raises(ValueError, match="n_queries"):
        S.square_steps(logits_fn, x, y, S.square_init(logits_fn, x, y, keys=keys, eps=0.1),
                       keys=keys, eps=0.1, n_queries=0)
    with pytest.raises(ValueError, match="shape"):
        A.square(lambda z: logits_fn(z.reshape(-1, 8, 8, 1)), x.reshape(4, 2, 4, 8, 1), y,
                 key=jax.random.key(0), eps=0.1, norm="l2")
