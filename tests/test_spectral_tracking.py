"""Tracked condition-number penalty: NumPy float64 references, a training trajectory, contracts."""

import functools
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import stall
from conftest import penalty_steps, random_mask, random_with_spectrum

import tscnc_jax as tj
from tscnc_jax import parallel
from tscnc_jax import spectral_tracking as st

TAU, DELTA = 0.1, 1e-3


def _np_matrix(w):
    w = np.asarray(w, np.float64)
    return w.reshape(-1, w.shape[-1])


def _svd(w):
    return np.linalg.svd(_np_matrix(w), compute_uv=False)


def _with_spectrum(rng, shape, s):
    m, n = int(np.prod(shape[:-1])), shape[-1]
    return random_with_spectrum(rng, m, n, s).reshape(shape)


def _cold_start(vectors, seed):
    """Random orthonormal blocks of the same shapes (no information about the spectrum)."""
    rng = np.random.default_rng(seed)

    def one(x):
        if x.shape[1] == 0:
            return x
        q, _ = np.linalg.qr(rng.standard_normal(x.shape))
        return jnp.asarray(q, x.dtype)

    return {name: st.TrackedSingularVectors(*(one(x) for x in vec))
            for name, vec in vectors.items()}


def _union_surrogate(s, idx, tau=TAU, delta=DELTA):
    ls = np.log(s[idx] + delta)
    return tau * np.log(np.sum(np.exp(ls / tau))) + tau * np.log(np.sum(np.exp(-ls / tau)))


def _cosine(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@functools.partial(jax.jit, static_argnames="k")
def _tracked_and_exact(params, k):
    """Exactly seeded vectors, (value, grad) of the tracked and of the exact penalty."""
    vectors = st.init_tracked_vectors(params, k=k)
    tracked = jax.value_and_grad(lambda p: st.tracked_condition_number_penalty(
        p, vectors, temperature=TAU, delta=DELTA))(params)
    exact = jax.value_and_grad(lambda p: tj.condition_number_penalty(
        p, temperature=TAU, delta=DELTA))(params)
    return vectors, tracked, exact


def _by_path(tree):
    return {tj.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------------------------
# (a) Convergence to the exact extreme singular values.
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
class TestConvergence:
    def test_prescribed_spectra_from_cold_start(self):
        """Rectangular both ways, square, conv-shaped; kappa 10 to 1e4; k = 2, 300 iterations."""
        rng = np.random.default_rng(0)
        cases = {"tall": ((96, 24), 1.0), "wide": ((24, 96), 4.0), "conv": ((3, 3, 8, 24), 4.0),
                 "conv_wide": ((3, 3, 2, 48), 1.0), "square": ((40, 40), 3.0)}
        params, spectra = {}, {}
        for name, (shape, log10_kappa) in cases.items():
            spectra[name] = np.logspace(0, -log10_kappa, min(int(np.prod(shape[:-1])), shape[-1]))
            params[name] = _with_spectrum(rng, shape, spectra[name])
        vectors = _cold_start(st.init_tracked_vectors(params, k=2), seed=1)
        vectors = jax.jit(lambda p, v: st.refine_tracked_vectors(p, v, iterations=300))(
            params, vectors)
        sigmas = st.tracked_singular_values(params, vectors)
        log_kappas = st.tracked_log_condition_numbers(params, vectors)
        for name, (_, log10_kappa) in cases.items():
            s_ref, (top, bottom) = spectra[name], sigmas[name]
            np.testing.assert_allclose(top, s_ref[:2], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(bottom, s_ref[::-1][:2], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(float(log_kappas[name]), log10_kappa * np.log(10),
                                       rtol=1e-5, err_msg=name)
            # Orthonormal singular pairs: M v = sigma u.
            m, vec = _np_matrix(params[name]), vectors[name]
            np.testing.assert_allclose(m @ vec.v_top, vec.u_top * s_ref[:2], atol=1e-6)
            np.testing.assert_allclose(m @ vec.v_bottom, vec.u_bottom * s_ref[::-1][:2],
                                       atol=1e-6)
            np.testing.assert_allclose(vec.v_bottom.T @ vec.v_bottom, np.eye(2), atol=1e-8)

    @pytest.mark.parametrize("sparsity", [0.9, 0.99])
    def test_masked_random_kernels(self, sparsity):
        rng = np.random.default_rng(3)
        shapes = {"tall": (256, 48), "wide": (48, 256), "conv": (3, 3, 16, 32)}
        params = {n: rng.standard_normal(shape) for n, shape in shapes.items()}
        masks = {n: random_mask(rng, shape, sparsity) for n, shape in shapes.items()}
        for live in (True, False):
            vectors = _cold_start(st.init_tracked_vectors(params, k=3, masks=masks, live=live),
                                  seed=2)
            vectors = jax.jit(lambda p, v, live=live: st.refine_tracked_vectors(
                p, v, iterations=400, masks=masks, live=live))(params, vectors)
            sigmas = st.tracked_singular_values(params, vectors, masks=masks)
            for name in shapes:
                m = np.asarray(params[name] * masks[name]).reshape(-1, shapes[name][-1])
                if live:  # the live block: all-zero rows and columns dropped
                    m = m[np.any(m != 0, axis=1)][:, np.any(m != 0, axis=0)]
                s_ref = _svd(m)
                top, bottom = sigmas[name]
                np.testing.assert_allclose(top[0], s_ref[0], rtol=1e-5, err_msg=name)
                # The full spectrum at 99 % is rank deficient (sigma_min = 0): absolute tolerance.
                np.testing.assert_allclose(bottom[0], s_ref[-1], rtol=1e-5,
                                           atol=1e-10 * s_ref[0], err_msg=(name, live))
        assert (sparsity < 0.95) == all(_svd(params[n] * masks[n])[-1] > 1e-6 for n in shapes)

    def test_float32_accuracy_and_lower_bound(self):
        """Float32: accurate up to kappa ~ 1e3; beyond, sigma_min is an upper bound."""
        rng = np.random.default_rng(4)
        for log10_kappa, rtol in ((1.0, 1e-5), (2.0, 1e-5), (3.0, 1e-3), (5.0, None)):
            s_ref = np.logspace(0, -log10_kappa, 64)
            params = {"w": jnp.asarray(_with_spectrum(rng, (576, 64), s_ref), jnp.float32)}
            vectors = _cold_start(st.init_tracked_vectors(params, k=2), seed=3)
            vectors = jax.jit(lambda p, v: st.refine_tracked_vectors(p, v, iterations=300))(
                params, vectors)
            assert vectors["w"].u_top.dtype == jnp.float32
            top, bottom = (np.asarray(x, np.float64)
                           for x in st.tracked_singular_values(params, vectors)["w"])
            np.testing.assert_allclose(top[0], 1.0, rtol=1e-5)
            if rtol is not None:
                np.testing.assert_allclose(bottom[0], s_ref[-1], rtol=rtol)
            else:  # below the float32 resolution: an over-estimate, never an under-estimate
                assert s_ref[-1] < bottom[0] < 1e-3
            log_kappa = float(st.tracked_log_condition_numbers(params, vectors)["w"])
            assert log_kappa <= log10_kappa * np.log(10) * (1 + 1e-6)


# ----------------------------------------------------------------------------------------------
# The truncated surrogate: value bounds and gradient, against float64 references.
# ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
class TestTruncatedSurrogate:
    @pytest.mark.parametrize("k", [1, 2, 4])
    @pytest.mark.parametrize("spectrum", ["logspace", "gaussian", "cluster"])
    def test_value_bounds(self, k, spectrum):
        rng = np.random.default_rng(k)
        if spectrum == "logspace":
            w = _with_spectrum(rng, (60, 20), np.logspace(0, -2, 20))
        elif spectrum == "gaussian":
            w = rng.standard_normal((60, 20)) / np.sqrt(60)
        else:  # near-degenerate extremes
            w = _with_spectrum(rng, (60, 20), np.r_[[1.0, 0.99, 0.98], np.linspace(0.5, 0.3, 14),
                                                    [0.0202, 0.0201, 0.02]])
        s = _svd(w)
        r = s.size
        _, (value, _), (exact, _) = _tracked_and_exact({"w": w}, k=k)
        value, exact = float(value), float(exact)
        idx = np.r_[0:k, r - k:r]
        np.testing.assert_allclose(value, _union_surrogate(s, idx), rtol=1e-10)
        gap = exact - value
        assert -1e-12 <= gap <= st.truncation_bound(s, k=k, temperature=TAU, delta=DELTA) + 1e-12
        log_kappa_delta = np.log((s[0] + DELTA) / (s[-1] + DELTA))
        assert log_kappa_delta - 1e-12 <= value <= log_kappa_delta + 2 * TAU * np.log(2 * k)

    def test_gradient_is_sum_of_tracked_singular_derivatives(self):
        rng = np.random.default_rng(6)
        w = rng.standard_normal((30, 12))
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        k = 2
        _, (_, grad), (_, exact) = _tracked_and_exact({"w": w}, k=k)
        grad, exact = grad["w"], exact["w"]
        idx = np.r_[0:k, 12 - k:12]
        ls = np.log(s[idx] + DELTA)
        p_max = np.exp(ls / TAU) / np.sum(np.exp(ls / TAU))
        p_min = np.exp(-ls / TAU) / np.sum(np.exp(-ls / TAU))
        coef = (p_max - p_min) / (s[idx] + DELTA)
        np.testing.assert_allclose(grad, (u[:, idx] * coef) @ vt[idx], rtol=1e-8, atol=1e-12)
        # Its cosine with the exact surrogate's gradient is the spectral formula.
        np.testing.assert_allclose(
            _cosine(grad, exact),
            st.converged_gradient_cosine(s, k=k, temperature=TAU, delta=DELTA), rtol=1e-8)

    def test_small_kernels_are_exact(self):
        """2k >= r: the whole spectrum is tracked and the penalty is the exact one."""
        rng = np.random.default_rng(7)
        params = {"a": {"kernel": rng.standard_normal((3, 3, 2, 6))},
                  "b": {"kernel": rng.standard_normal((7, 40))}}
        vectors, (value, grad), (exact, exact_grad) = _tracked_and_exact(params, k=4)
        assert vectors["a/kernel"].u_top.shape == (18, 6)
        assert vectors["a/kernel"].u_bottom.shape == (18, 0)
        np.testing.assert_allclose(float(value), float(exact), rtol=1e-10)
        chex.assert_trees_all_close(grad, exact_grad, rtol=1e-8, atol=1e-12)
        assert st.converged_gradient_cosine(_svd(params["b"]["kernel"]), k=4, temperature=TAU,
                                            delta=DELTA) == 1.0

    def test_minimal_k(self):
        rng = np.random.default_rng(8)
        separated = _with_spectrum(rng, (80, 16), np.logspace(0, -3, 16))
        flat = rng.standard_normal((800, 32)) / np.sqrt(800)  # Marchenko-Pastur: packed edges
        ks = st.minimal_k({"separated": separated, "flat": flat}, cosine=0.99)
        assert ks["separated"] == 1
        assert ks["flat"] > 4
        for name, k in ks.items():
            s = _svd({"separated": separated, "flat": flat}[name])
            assert st.converged_gradient_cosine(s, k=k, temperature=TAU, delta=DELTA) >= 0.99
            assert k == 1 or st.converged_gradient_cosine(
                s, k=k - 1, temperature=TAU, delta=DELTA) < 0.99


# ----------------------------------------------------------------------------------------------
# (b) Validation along a training trajectory (float32, iterations=2, resync_every=100).
# ----------------------------------------------------------------------------------------------


def test_training_trajectory_tracks_exact_penalty():
    """SmallCNN (width 8) trained by SGD (lr 0.05) on synthetic data with the tracked CNC.

    Every kernel's gradient cosine with the exact surrogate must stay >= 0.99: the 784x32 Dense
    kernel has a flat (Marchenko-Pastur) spectrum and needs ``k = 13`` of its 32 singular values
    at each end (worst cosine 0.9925; 0.9883 with ``k = 12``); ``k = 14`` (0.9955) is used for
    margin, the other kernels are then small enough to be tracked whole. Measured along this run:
    log-kappa within 6e-5 relative. A shadow tracker with ``k = 4`` follows the same parameters:
    its log-kappa is within 0.15 %, and its gradient cosine (down to 0.86) equals the converged
    spectral formula within 0.012, i.e. the gap to 1 is truncation, not tracking error. Both
    log-kappas are lower bounds of the exact ones at every checked step.
    """
    model = tj.create_model("small_cnn", width=8)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=16)
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]  # one compilation
    weight, k_main, k_shadow = 0.1, 14, 4
    cnc = {k: st.add_tracked_condition_number_penalty(
        weight, temperature=TAU, delta=DELTA, k=k, iterations=2, resync_every=100)
        for k in (k_main, k_shadow)}
    sgd = optax.sgd(0.05)
    names = [n for n, _, _ in tj.named_leaves(params)]
    assert st.block_sizes((784, 32), k_main) == (k_main, k_main)  # Dense_0 is really tracked

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, state, shadow):
        zeros = jax.tree.map(jnp.zeros_like, params)
        # optax.chain(cnc[k_main], sgd).update, written out to also return what the CNC adds.
        added_main, cnc_state = cnc[k_main].update(zeros, state[0], params)
        grads = jax.tree.map(jnp.add, jax.grad(loss)(params), added_main)
        updates, sgd_state = sgd.update(grads, state[1], params)
        added_shadow, shadow = cnc[k_shadow].update(zeros, shadow, params)
        log_kappa = {k_main: st.tracked_log_condition_numbers(params, cnc_state.vectors),
                     k_shadow: st.tracked_log_condition_numbers(params, shadow.vectors)}
        exact = jax.grad(lambda p: tj.condition_number_penalty(p, temperature=TAU,
                                                               delta=DELTA))(params)
        added = {k_main: added_main, k_shadow: added_shadow}
        return (optax.apply_updates(params, updates), (cnc_state, sgd_state), shadow,
                (added, log_kappa, exact))

    state, shadow = jax.jit(lambda p: ((cnc[k_main].init(p), sgd.init(p)), cnc[k_shadow].init(p)))(
        params)
    worst = {"lk_main": 0.0, "lk_shadow": 0.0, "cos_main": 1.0, "cos_gap_shadow": 0.0}
    checks = 0
    for t in range(200):
        checked = params
        params, state, shadow, (added, log_kappa, exact) = step(params, state, shadow)
        if t % 5 and t not in (99, 101):
            continue
        checks += 1
        spectra = tj.spectral.tree_singular_values(checked)
        exact = _by_path(exact)
        for n in names:
            s = spectra[n][0]
            lk_ref = np.log(s[0] / s[-1])
            e = weight * np.asarray(exact[n], np.float64)
            for k in (k_main, k_shadow):
                lk = float(log_kappa[k][n])
                assert lk <= lk_ref * (1 + 1e-5) + 1e-6, (t, n, k, lk, lk_ref)  # lower bound
                cos = _cosine(_by_path(added[k])[n], e)
                tag = "main" if k == k_main else "shadow"
                worst[f"lk_{tag}"] = max(worst[f"lk_{tag}"], abs(lk - lk_ref) / lk_ref)
                if k == k_main:
                    worst["cos_main"] = min(worst["cos_main"], cos)
                else:
                    predicted = st.converged_gradient_cosine(s, k=k, temperature=TAU, delta=DELTA)
                    worst["cos_gap_shadow"] = max(worst["cos_gap_shadow"], abs(cos - predicted))
    assert checks == 42 and int(state[0].count) == 200
    assert worst["lk_main"] < 0.01, worst
    assert worst["cos_main"] >= 0.99, worst
    assert worst["lk_shadow"] < 0.01, worst
    assert worst["cos_gap_shadow"] < 0.03, worst


# ----------------------------------------------------------------------------------------------
# (c) Compile once, (d) degenerate kernels, (e) composition, (f) arguments.
# ----------------------------------------------------------------------------------------------


def _params(seed=0):
    # NumPy-generated (no per-shape compilation of random ops), float32 like a flax model.
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {"kernel": rng.standard_normal((3, 3, 4, 16)).astype(np.float32),
                   "bias": np.zeros(16, np.float32)},
        "Dense_0": {"kernel": (0.1 * rng.standard_normal((16, 40))).astype(np.float32)},
    }


def _zeros(params):
    return jax.tree.map(np.zeros_like, params)


def test_compiles_once_across_resyncs():
    params = _params()
    tx = optax.chain(
        st.add_tracked_condition_number_penalty(optax.linear_schedule(0.1, 0.0, 10), k=2,
                                                resync_every=3),
        optax.sgd(0.01, momentum=0.9))
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    struct0 = jax.tree.structure(state)
    dtypes0 = [x.dtype for x in jax.tree.leaves(state)]
    for _ in range(7):  # resynchronisations at counts 0, 3 and 6, tracked steps in between
        params, state = step(params, state)
    assert len(traces) == 1
    assert jax.tree.structure(state) == struct0
    assert [x.dtype for x in jax.tree.leaves(state)] == dtypes0
    assert int(state[0].count) == 7


def test_first_update_is_exact_seeding_and_value_is_logged():
    params = _params()
    tx = st.add_tracked_condition_number_penalty(1.0, k=2, resync_every=5)
    state = tx.init(params)
    assert float(state.value) == 0.0
    zeros = _zeros(params)
    updates, state = jax.jit(tx.update)(zeros, state, params)
    # Vectors from the exact SVD; the value is the union surrogate of the exact spectrum.
    values = []
    for _, (s, _) in tj.spectral.tree_singular_values(params).items():
        k_top, k_bottom = st.block_sizes((s.size, s.size), 2)
        values.append(_union_surrogate(s, np.r_[0:k_top, s.size - k_bottom:s.size]))
    np.testing.assert_allclose(float(state.value), np.mean(values), rtol=1e-5)
    assert float(state.value) <= float(tj.condition_number_penalty(params)) + 1e-6
    for name, kernel, _ in tj.named_leaves(params):
        u, s, vt = np.linalg.svd(_np_matrix(kernel), full_matrices=False)
        vec = state.vectors[name]
        coef = np.zeros_like(s)
        idx = np.r_[0:2, s.size - 2:s.size]
        ls = np.log(s[idx] + DELTA)
        coef[idx] = (np.exp(ls / TAU) / np.exp(ls / TAU).sum()
                     - np.exp(-ls / TAU) / np.exp(-ls / TAU).sum()) / (s[idx] + DELTA) / 2
        expected = (u * coef) @ vt
        got = _by_path(updates)[name]
        np.testing.assert_allclose(np.asarray(got).reshape(expected.shape), expected,
                                   rtol=1e-3, atol=1e-5 * np.abs(expected).max())
        np.testing.assert_allclose(np.abs(np.sum(vec.v_top * vt[:2].T, 0)), 1.0, atol=1e-5)


def test_degenerate_kernels_give_finite_values_and_gradients():
    rng = np.random.default_rng(0)
    dead = rng.standard_normal((48, 12)).astype(np.float32)
    dead[:, 3] = 0.0  # a dead unit: an exact zero singular value
    params = {
        "zero": np.zeros((32, 8), np.float32),
        "identity": np.eye(24, dtype=np.float32),  # all singular values equal
        "rank1": np.outer(np.arange(1.0, 21.0), np.arange(1.0, 7.0)).astype(np.float32),
        "dead_unit": dead,
        "conv99": rng.standard_normal((3, 3, 32, 64)).astype(np.float32),
    }
    masks = jax.tree.map(lambda _: None, params)
    masks["conv99"] = random_mask(rng, (3, 3, 32, 64), 0.99)
    k1 = ("zero", "rank1")  # tracked with k = 1, the others with k = 2
    tx = optax.chain(
        st.add_tracked_condition_number_penalty(
            1.0, k=1, resync_every=3, masks=masks, filter_fn=lambda p, w: p in k1),
        st.add_tracked_condition_number_penalty(
            1.0, k=2, resync_every=3, masks=masks, filter_fn=lambda p, w: p not in k1))
    state = tx.init(params)
    update = jax.jit(tx.update)
    zeros = _zeros(params)
    for _ in range(4):  # exact seeding, two tracked steps, a resync
        updates, state = update(zeros, state, params)
        for sub in state:
            assert np.isfinite(float(sub.value))
            for name, vec in sub.vectors.items():
                assert all(np.all(np.isfinite(np.asarray(x))) for x in vec), name
        for name, g in updates.items():
            assert np.all(np.isfinite(np.asarray(g))), name
    assert np.all(np.asarray(updates["conv99"])[masks["conv99"] == 0] == 0)
    np.testing.assert_allclose(updates["identity"], 0.0, atol=1e-5)  # a minimiser
    np.testing.assert_allclose(updates["zero"], 0.0, atol=1e-5)  # equal (zero) extremes
    lk = {**st.tracked_log_condition_numbers(params, state[0].vectors, masks=masks,
                                             filter_fn=lambda p, w: p in k1),
          **st.tracked_log_condition_numbers(params, state[1].vectors, masks=masks,
                                             filter_fn=lambda p, w: p not in k1)}
    assert float(lk["rank1"]) > np.log(1e4)  # numerically singular
    assert float(lk["identity"]) == pytest.approx(0.0, abs=1e-5)
    # The dead unit is a structural zero: the live kappa is that of the other 11 columns, the
    # full-spectrum one (live=False) sees the zero.
    s_live = _svd(np.delete(dead, 3, axis=1))
    assert float(lk["dead_unit"]) == pytest.approx(np.log(s_live[0] / s_live[-1]), rel=1e-4)
    only_dead = {"w": params["dead_unit"]}
    full = st.tracked_log_condition_numbers(
        only_dead, st.init_tracked_vectors(only_dead, k=2, live=False), live=False)
    assert float(full["w"]) > np.log(1e4)


def test_chain_and_sparsify_composition():
    params = _params(1)
    # Keep the largest 10 % of each kernel (NumPy: no per-op compilation of the mask makers).
    masks = {"Conv_0": {"kernel": None, "bias": None}, "Dense_0": {"kernel": None}}
    for layer in masks:
        w = np.abs(params[layer]["kernel"])
        masks[layer]["kernel"] = w >= np.quantile(w, 0.9)
    inner = optax.chain(st.add_tracked_condition_number_penalty(0.5, k=2), optax.sgd(0.05))
    tx = tj.sparsify(inner, masks=masks)
    zeros = _zeros(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(zeros, state, params)
        return optax.apply_updates(params, updates), state, updates

    p, state = params, tx.init(params)
    for t in range(4):
        before = p
        p, state, updates = step(p, state)
        if t == 0:
            first = updates
    for _, w, m in tj.named_leaves(p, masks):
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0)
    # The logged value is the tracked penalty of the pruned kernels at the last update.
    cnc_state = state.inner_state[0]
    assert isinstance(cnc_state, tj.ConditionNumberPenaltyState)  # one CNC state type
    np.testing.assert_allclose(
        float(cnc_state.value),
        float(st.tracked_condition_number_penalty(tj.apply_masks(before, masks),
                                                  cnc_state.vectors)), rtol=1e-5)
    # Same as giving the masks to the transformation itself (first update, exact seeding).
    direct = optax.chain(st.add_tracked_condition_number_penalty(0.5, k=2, masks=masks),
                         optax.sgd(0.05))
    u_direct, _ = jax.jit(direct.update)(zeros, direct.init(params), params)
    chex.assert_trees_all_close(tj.apply_masks(first, masks), u_direct, rtol=1e-3, atol=1e-6)


def test_inject_hyperparams_and_masked():
    params = _params(2)
    factory = optax.inject_hyperparams(
        st.add_tracked_condition_number_penalty,
        static_args=("k", "iterations", "resync_every", "filter_fn"))
    tx = factory(weight=2.0, temperature=TAU, delta=DELTA, k=2)
    zeros = _zeros(params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    _, (_, expected), _ = _tracked_and_exact(params, k=2)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: 2.0 * g, expected), rtol=1e-4,
                                atol=1e-6)

    only_dense = jax.tree_util.tree_map_with_path(
        lambda path, _: tj.path_to_str(path).startswith("Dense"), params)
    tx = optax.masked(st.add_tracked_condition_number_penalty(1.0, k=2), only_dense)
    updates, state = jax.jit(tx.update)(zeros, tx.init(params), params)
    chex.assert_trees_all_equal(updates["Conv_0"], zeros["Conv_0"])
    assert list(state.inner_state.vectors) == ["Dense_0/kernel"]


def test_toy_run_drives_kappa_below_two_with_k1():
    """The k=1 tracked penalty alone: kappa of a random 64x64 matrix 118 -> < 2 in 200 steps."""
    params = {"w": jax.random.normal(jax.random.key(0), (64, 64)) / 8.0}
    assert tj.tree_condition_numbers(params)["w"] > 100
    tx = optax.chain(st.add_tracked_condition_number_penalty(1.0, k=1), optax.sgd(0.1))
    params = penalty_steps(tx, params, 200)
    assert tj.tree_condition_numbers(params)["w"] < 2.0


_MULTI_DEVICE_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, optax
from jax import lax
from tscnc_jax import parallel
from tscnc_jax import spectral_tracking as st

params = {"w": jax.random.normal(jax.random.key(0), (48, 16)) / 4.0}
x = jax.random.normal(jax.random.key(1), (8, 48))
tx = optax.chain(st.add_tracked_condition_number_penalty(0.3, k=2, resync_every=2),
                 optax.sgd(0.05))

def make_step(axis):
    def step(carry, batch):
        p, s = carry
        g = jax.grad(lambda p: jnp.mean(jnp.tanh(batch["x"] @ p["w"]) ** 2))(p)
        if axis is not None:
            g = lax.pmean(g, axis)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), s[0].value
    return step

ref = (params, tx.init(params))
single = jax.jit(make_step(None))
for _ in range(3):  # exact seeding, a tracked step, a resync
    ref, value_ref = single(ref, {"x": x})
out = {"devices": jax.device_count()}
for backend in ("shard_map",):
    step = parallel.data_parallel(make_step(parallel.BATCH_AXIS))
    carry = (params, tx.init(params))
    for _ in range(3):
        carry, value = step(carry, {"x": x})
    diff = float(jnp.max(jnp.abs(carry[0]["w"] - ref[0]["w"])))
    out[backend] = {"max_abs_diff": diff, "value_diff": abs(float(value) - float(value_ref))}
print(json.dumps(out))
"""


def test_data_parallel_matches_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = parallel.cpu_multi_device_flags(2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = stall.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    for backend in ("shard_map",):
        assert out[backend]["max_abs_diff"] < 1e-5, out
        assert out[backend]["value_diff"] < 1e-5, out


def test_half_precision_kernels_are_tracked_in_float32():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((32, 12)), jnp.bfloat16)}
    tx = st.add_tracked_condition_number_penalty(1.0, k=2, resync_every=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):  # exact seeding, a tracked step, a resync
        updates, state = update(_zeros(params), state, params)
    assert state.vectors["w"].u_top.dtype == jnp.float32
    assert updates["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))
    s = _svd(np.asarray(params["w"], np.float64))
    np.testing.assert_allclose(float(st.tracked_log_condition_numbers(params, state.vectors)["w"]),
                               np.log(s[0] / s[-1]), rtol=1e-5)


def test_bad_arguments():
    add = st.add_tracked_condition_number_penalty
    with pytest.raises(ValueError, match="weight"):
        add(-0.1)
    with pytest.raises(ValueError, match="temperature"):
        add(0.1, temperature=0.0)
    with pytest.raises(ValueError, match="delta"):
        add(0.1, delta=-1e-3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="`k`"):
            add(0.1, k=bad)
    with pytest.raises(ValueError, match="iterations"):
        add(0.1, iterations=0)
    with pytest.raises(ValueError, match="resync_every"):
        add(0.1, resync_every=0)
    with pytest.raises(ValueError, match="reduce"):
        add(0.1, reduce="median")
    params = _params()
    tx = add(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
    vectors = st.init_tracked_vectors(params, k=2)
    with pytest.raises(ValueError, match="one entry per selected kernel"):
        st.tracked_condition_number_penalty({"Dense_0": params["Dense_0"]}, vectors)
    wrong = dict(vectors)
    wrong["Dense_0/kernel"] = wrong["Dense_0/kernel"]._replace(u_top=jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="do not fit"):
        st.refine_tracked_vectors(params, wrong)
    with pytest.raises(ValueError, match="iterations"):
        st.refine_tracked_vectors(params, vectors, iterations=0)
    with pytest.raises(ValueError, match="temperature"):
        st.tracked_condition_number_penalty(params, vectors, temperature=-1.0)
    with pytest.raises(ValueError, match="cosine"):
        st.minimal_k(params, cosine=1.5)
    with pytest.raises(ValueError, match="kernel.*floating"):
        st.init_tracked_vectors({"w": jnp.ones((4, 3), jnp.int32)}, filter_fn=lambda p, w: True)


def test_per_kernel_k_equals_one_transformation_per_kernel():
    """``k={path: k}`` tracks each kernel as the int-``k`` transformation restricted to it does."""
    params = _params(3)
    ks = {"Conv_0/kernel": 2, "Dense_0/kernel": 8}  # 36x16 tracked in blocks of 2; 16x40 whole
    mapped = st.add_tracked_condition_number_penalty(0.5, k=ks, reduce="sum", resync_every=3)
    single = {
        name: st.add_tracked_condition_number_penalty(
            0.5, k=k, reduce="sum", resync_every=3,
            filter_fn=lambda path, leaf, name=name: path == name)
        for name, k in ks.items()
    }
    states = {"mapped": mapped.init(params), **{n: tx.init(params) for n, tx in single.items()}}
    assert [x.shape for x in states["mapped"].vectors["Conv_0/kernel"]] == [
        (36, 2), (16, 2), (36, 2), (16, 2)]
    assert [x.shape for x in states["mapped"].vectors["Dense_0/kernel"]] == [
        (16, 16), (40, 16), (16, 0), (40, 0)]
    rng = np.random.default_rng(4)
    for _ in range(4):  # exact seeding, two tracked steps, a resync
        got, states["mapped"] = jax.jit(mapped.update)(_zeros(params), states["mapped"], params)
        want = _zeros(params)
        for name, tx in single.items():
            added, states[name] = jax.jit(tx.update)(_zeros(params), states[name], params)
            want = jax.tree.map(np.add, want, added)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
        params = jax.tree.map(
            lambda w: (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32), params)


def test_minimal_k_output_is_a_valid_k():
    params = _params(5)
    ks = st.minimal_k(params, cosine=0.99, temperature=TAU, delta=DELTA)
    assert sorted(ks) == ["Conv_0/kernel", "Dense_0/kernel"]
    vectors = st.init_tracked_vectors(params, k=ks)
    for name, k in ks.items():
        shape = (vectors[name].u_top.shape[0], vectors[name].v_top.shape[0])
        assert (vectors[name].u_top.shape[1], vectors[name].u_bottom.shape[1]) == st.block_sizes(
            shape, k)
    tx = st.add_tracked_condition_number_penalty(0.1, k=ks)
    updates, _ = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_per_kernel_k_errors_name_the_problem():
    params = _params()
    add = st.add_tracked_condition_number_penalty
    with pytest.raises(ValueError, match="empty mapping"):
        add(0.1, k={})
    with pytest.raises(ValueError, match=r"k\['Dense_0/kernel'\]"):
        add(0.1, k={"Conv_0/kernel": 2, "Dense_0/kernel": 0})
    tx = add(0.1, k={"Conv_0/kernel": 2})
    with pytest.raises(ValueError, match=r"missing \['Dense_0/kernel'\]"):
        tx.init(params)
    with pytest.raises(ValueError, match=r"unknown \['Dense_1/kernel'\]"):
        st.init_tracked_vectors(params, k={"Conv_0/kernel": 2, "Dense_0/kernel": 2,
                                           "Dense_1/kernel": 2})
