"""The live-spectrum CNC, the convolution operator's spectrum and the TSC's gradient scale.

References are NumPy float64: the penalty of the extracted live block (the kernel without its
all-zero rows and columns), the dense matrix of a circular convolution built one basis vector at
a time, and the closed-form TL1 derivative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_mask, random_with_spectrum

import tscnc_jax as tj
from tscnc_jax import spectral
from tscnc_jax import spectral_tracking as st

TAU, DELTA = 0.1, 1e-3


def _penalty(m, **kw):
    return spectral.smooth_log_condition_number(m, temperature=TAU, delta=DELTA, **kw)


def _live_block(m):
    rows, cols = np.any(m != 0, axis=1), np.any(m != 0, axis=0)
    return m[rows][:, cols], rows, cols


def _embedded_live_gradient(m):
    """The gradient of the live block's penalty, written back into the kernel's shape."""
    block, rows, cols = _live_block(m)
    g = np.zeros_like(m)
    g[np.ix_(rows, cols)] = np.asarray(jax.grad(_penalty)(jnp.asarray(block)))
    return g


def _kernel_with_dead(rng, shape, dead_rows, dead_cols, log10_kappa=2.0):
    """A matrix with an ill-conditioned live block and the given all-zero rows / columns."""
    m, n = shape
    live_r, live_c = m - len(dead_rows), n - len(dead_cols)
    block = random_with_spectrum(rng, live_r, live_c,
                                 np.logspace(0, -log10_kappa, min(live_r, live_c)))
    out = np.zeros(shape)
    rows = np.setdiff1d(np.arange(m), dead_rows)
    cols = np.setdiff1d(np.arange(n), dead_cols)
    out[np.ix_(rows, cols)] = block
    return out


@pytest.mark.usefixtures("x64")
class TestLiveSpectrumPenalty:
    @pytest.mark.parametrize("dead", ["rows", "cols", "both"])
    def test_gradient_equals_the_live_blocks(self, dead):
        rng = np.random.default_rng({"rows": 0, "cols": 1, "both": 2}[dead])
        dead_rows = [3, 17, 40] if dead in ("rows", "both") else []
        dead_cols = [0, 9, 10, 31] if dead in ("cols", "both") else []
        m = _kernel_with_dead(rng, (48, 32), dead_rows, dead_cols)
        value, grad = jax.value_and_grad(_penalty)(jnp.asarray(m))
        block, _, _ = _live_block(m)
        np.testing.assert_allclose(float(value), float(_penalty(jnp.asarray(block))), rtol=1e-10)
        ref = _embedded_live_gradient(m)
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
        # Under jit, the same numbers (the live count is traced, not a Python branch).
        np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(_penalty))(m)), np.asarray(grad),
                                   rtol=1e-10, atol=1e-12)

    def test_the_full_spectrum_penalty_is_blind_to_sigma_min(self):
        """The defect the live spectrum fixes: dR / dsigma_min(live) of order 1e-10."""
        rng = np.random.default_rng(3)
        m = _kernel_with_dead(rng, (64, 32), [], list(range(24, 32)))
        block, _, _ = _live_block(m)
        u, _, vt = np.linalg.svd(block)
        direction = np.zeros_like(m)
        direction[:, :24] = np.outer(u[:, 23], vt[23])  # d sigma_min(live) / dM
        live = float(np.sum(np.asarray(jax.grad(_penalty)(m)) * direction))
        full = float(np.sum(np.asarray(jax.grad(lambda x: _penalty(x, live=False))(m))
                            * direction))
        assert live < -1.0  # pushes the smallest live singular value up
        assert abs(full) < 1e-6 * abs(live)

    @pytest.mark.parametrize("form", ["mask", "exact_zeros"])
    def test_conv_kernels_masked_and_exact_zeros(self, form):
        rng = np.random.default_rng(4)
        kernel = rng.standard_normal((3, 3, 8, 16))
        mask = np.ones_like(kernel)
        mask[:, :, 2] = 0.0  # a dead input channel: 9 dead rows
        mask[..., [5, 11]] = 0.0  # two dead filters: dead columns
        mask[1, 1, 4] = 0.0  # one more dead row
        mask *= random_mask(rng, kernel.shape, 0.3)  # scattered zeros that kill nothing else
        pruned = kernel * mask
        if form == "mask":
            grad = jax.grad(lambda k: _penalty(k, mask=mask))(kernel)
        else:
            grad = jax.grad(_penalty)(pruned)
        ref = _embedded_live_gradient(pruned.reshape(-1, 16)).reshape(kernel.shape)
        if form == "mask":
            ref = ref * mask
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())

    def test_dense_kernels_are_unchanged(self):
        rng = np.random.default_rng(5)
        for shape in ((20, 10), (3, 3, 4, 6), (7, 30)):
            w = rng.standard_normal(shape)
            s = np.linalg.svd(w.reshape(-1, shape[-1]), compute_uv=False)
            logs = np.log(s + DELTA)
            ref = TAU * (np.log(np.sum(np.exp(logs / TAU))) + np.log(np.sum(np.exp(-logs / TAU))))
            np.testing.assert_allclose(float(_penalty(w)), ref, rtol=1e-12)
            np.testing.assert_allclose(float(_penalty(w)), float(_penalty(w, live=False)),
                                       rtol=0, atol=0)
            full = jax.grad(lambda x: _penalty(x, live=False))(w)
            np.testing.assert_array_equal(np.asarray(jax.grad(_penalty)(w)), np.asarray(full))

    def test_finite_gradients_at_degenerate_kernels(self):
        rng = np.random.default_rng(6)
        big = rng.standard_normal((3, 3, 32, 64))
        cases = {
            "identity": (np.eye(16), None),
            "repeated": (np.diag([2.0, 2.0, 2.0, 1.0, 1.0]), None),
            "rank1": (np.outer(np.arange(1.0, 13.0), np.arange(1.0, 6.0)), None),
            "zero": (np.zeros((6, 4)), None),
            "masked_99_9": (big, random_mask(rng, big.shape, 0.999)),
            "one_weight": (big, (np.arange(big.size) == 77).reshape(big.shape).astype(float)),
        }
        for name, (w, mask) in cases.items():
            value, grad = jax.value_and_grad(lambda k, mask=mask: _penalty(k, mask=mask))(w)
            assert np.isfinite(float(value)), name
            assert np.all(np.isfinite(np.asarray(grad))), name
            if mask is not None:
                assert np.all(np.asarray(grad)[mask == 0] == 0), name
        np.testing.assert_allclose(jax.grad(_penalty)(np.eye(16)), 0.0, atol=1e-12)  # minimiser
        assert float(_penalty(cases["one_weight"][0], mask=cases["one_weight"][1])) == 0.0

    def test_live_count(self):
        m = np.zeros((6, 5))
        m[0, 1] = m[2, 1] = m[4, 3] = 1.0  # live rows 0, 2, 4; live columns 1, 3
        assert int(spectral.live_singular_value_count(m)) == 2
        assert int(jax.jit(spectral.live_singular_value_count)(m.T)) == 2
        assert int(spectral.live_singular_value_count(np.ones((6, 5)), mask=m)) == 2
        assert int(spectral.live_singular_value_count(np.zeros((3, 3)))) == 0

    def test_tree_penalty_and_transform_inside_sparsify(self):
        """The transform sees the masked parameters in ``sparsify``: their exact zeros define the
        live spectrum, and the update equals the live blocks' gradient (masked)."""
        rng = np.random.default_rng(7)
        params = {"a": rng.standard_normal((24, 12)), "b": rng.standard_normal((3, 3, 4, 8))}
        masks = {"a": np.ones((24, 12)), "b": np.ones((3, 3, 4, 8))}
        masks["a"][:, [2, 5]] = 0.0
        masks["a"][7] = 0.0
        masks["b"][:, :, 1] = 0.0
        masks["b"][..., 6] = 0.0
        weight = 0.5
        tx = tj.sparsify(tj.add_condition_number_penalty(weight, temperature=TAU, delta=DELTA),
                         masks=masks)
        state = tx.init(params)
        zeros = jax.tree.map(np.zeros_like, params)
        updates, state = jax.jit(tx.update)(zeros, state, params)
        for name in params:
            pruned = params[name] * masks[name]
            shape = pruned.shape
            ref = _embedded_live_gradient(pruned.reshape(-1, shape[-1])).reshape(shape)
            # reduce="mean" over the two kernels; pruned entries are set to -params (= 0 here).
            expected = weight * ref / 2 * masks[name]
            np.testing.assert_allclose(np.asarray(updates[name]) * masks[name], expected,
                                       rtol=1e-6, atol=1e-9)
        value = tj.condition_number_penalty(params, masks=masks, temperature=TAU, delta=DELTA)
        ref_value = np.mean([float(_penalty(jnp.asarray(_live_block(
            (params[n] * masks[n]).reshape(-1, params[n].shape[-1]))[0]))) for n in params])
        np.testing.assert_allclose(float(value), ref_value, rtol=1e-10)
        np.testing.assert_allclose(float(tj.penalty_values(state)["cnc"]), ref_value, rtol=1e-6)


@pytest.mark.usefixtures("x64")
class TestTrackedLiveSpectrum:
    @pytest.mark.parametrize("shape,live", [((40, 12), (30, 8)), ((40, 12), (6, 10)),
                                            ((12, 40), (10, 6)), ((12, 40), (4, 30))])
    def test_converges_to_the_live_extremes(self, shape, live):
        """Tall and wide kernels whose live block is tall or wide (the row-side iteration)."""
        rng = np.random.default_rng(sum(shape) + sum(live))
        m = np.zeros(shape)
        rows = rng.choice(shape[0], live[0], replace=False)
        cols = rng.choice(shape[1], live[1], replace=False)
        m[np.ix_(rows, cols)] = random_with_spectrum(
            rng, *live, np.logspace(0, -1.5, min(live)))
        params = {"w": m}
        exact = np.linalg.svd(m[np.ix_(rows, cols)], compute_uv=False)
        # Seed at a perturbed kernel, refine at this one: the warm start must move.
        shifted = {"w": m * (1 + 0.05 * rng.standard_normal(shape))}
        vectors = st.init_tracked_vectors(shifted, k=2)
        refine = jax.jit(lambda p, v: st.refine_tracked_vectors(p, v, iterations=2))
        for _ in range(60):
            vectors = refine(params, vectors)
        top, bottom = st.tracked_singular_values(params, vectors)["w"]
        np.testing.assert_allclose(np.asarray(top), exact[:2], rtol=1e-8)
        np.testing.assert_allclose(np.asarray(bottom), exact[::-1][:2], rtol=1e-8)
        np.testing.assert_allclose(float(st.tracked_log_condition_numbers(params, vectors)["w"]),
                                   np.log(exact[0] / exact[-1]), rtol=1e-8)

    def test_penalty_covers_short_live_spectra_once(self):
        """Fewer live singular values than 2 k: each counted once, and the surrogate is the
        exact live one (the whole live spectrum is tracked)."""
        rng = np.random.default_rng(11)
        m = np.zeros((40, 12))
        m[np.ix_([1, 5, 9], [0, 4, 7])] = rng.standard_normal((3, 3))
        params = {"w": m}
        vectors = st.init_tracked_vectors(params, k=2)
        tracked = st.tracked_condition_number_penalty(params, vectors, temperature=TAU,
                                                      delta=DELTA)
        exact = _penalty(m[np.ix_([1, 5, 9], [0, 4, 7])])
        np.testing.assert_allclose(float(tracked), float(exact), rtol=1e-10)
        g_tracked = jax.grad(lambda p: st.tracked_condition_number_penalty(
            p, vectors, temperature=TAU, delta=DELTA))(params)["w"]
        np.testing.assert_allclose(np.asarray(g_tracked), _embedded_live_gradient(m),
                                   rtol=1e-6, atol=1e-10)

    def test_transform_lowers_the_live_condition_number(self):
        rng = np.random.default_rng(12)
        m = _kernel_with_dead(rng, (64, 32), [5, 6], list(range(20, 32)), log10_kappa=1.5)
        params = {"w": m}
        mask = {"w": (m != 0).astype(float)}
        tx = tj.sparsify(optax.chain(st.add_tracked_condition_number_penalty(
            1.0, k=2, temperature=TAU, delta=DELTA), optax.sgd(0.05)), masks=mask)
        state = tx.init(params)
        step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
        before = spectral.tree_live_condition_numbers(params)["w"]["kappa"]
        for _ in range(150):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
        after = spectral.tree_live_condition_numbers(params)["w"]
        assert np.all(np.asarray(params["w"])[mask["w"] == 0] == 0)
        assert after["kappa"] < before / 3
        assert (after["live_rows"], after["live_cols"]) == (62, 20)


@pytest.mark.usefixtures("x64")
class TestConvOperatorSpectrum:
    @staticmethod
    def _dense_operator(k, h, w):
        """The (h w c_out) x (h w c_in) matrix of a stride-1 circular cross-correlation."""
        kh, kw, c_in, c_out = k.shape
        cols = []
        for j in range(h * w * c_in):
            x = np.zeros(h * w * c_in)
            x[j] = 1.0
            x = x.reshape(h, w, c_in)
            y = np.zeros((h, w, c_out))
            for a in range(kh):
                for b in range(kw):
                    y += np.roll(x, (-a, -b), axis=(0, 1)) @ k[a, b]
            cols.append(y.ravel())
        return np.stack(cols, axis=1)

    @pytest.mark.parametrize("kshape,grid", [((3, 3, 2, 3), (5, 4)), ((3, 3, 4, 2), (2, 2)),
                                             ((1, 1, 3, 3), (3, 3)), ((5, 5, 1, 2), (6, 6)),
                                             ((3, 3, 3, 3), (1, 1))])
    def test_equals_the_dense_operator(self, kshape, grid):
        rng = np.random.default_rng(sum(kshape) + sum(grid))
        k = rng.standard_normal(kshape)
        ref = np.linalg.svd(self._dense_operator(k, *grid), compute_uv=False)
        got = np.asarray(spectral.conv_operator_singular_values(k, grid))
        assert got.shape == (grid[0] * grid[1] * min(kshape[2:]),)
        np.testing.assert_allclose(got, ref[:got.size], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ref[got.size:], 0.0, atol=1e-10)  # c_in != c_out: zeros
        host = spectral.host_conv_operator_condition_number(k, grid)
        np.testing.assert_allclose(host["sigma_max"], ref[0], rtol=1e-10)
        np.testing.assert_allclose(host["kappa"], ref[0] / ref[got.size - 1], rtol=1e-8)

    def test_masked_and_live_channels(self):
        rng = np.random.default_rng(20)
        k = rng.standard_normal((3, 3, 4, 5))
        mask = np.ones_like(k)
        mask[:, :, 1] = 0.0  # a dead input channel
        mask[..., 3] = 0.0  # a dead filter
        np.testing.assert_allclose(np.asarray(spectral.conv_operator_singular_values(k, (4, 4),
                                                                                     mask)),
                                   np.asarray(spectral.conv_operator_singular_values(k * mask,
                                                                                     (4, 4))))
        live = spectral.host_conv_operator_condition_number(k, (4, 4), mask)
        assert (live["live_in"], live["live_out"]) == (3, 4)
        ref = np.linalg.svd(self._dense_operator((k * mask)[:, :, [0, 2, 3]][..., [0, 1, 2, 4]],
                                                 4, 4), compute_uv=False)
        np.testing.assert_allclose(live["kappa"], ref[0] / ref[-1], rtol=1e-8)
        assert spectral.host_conv_operator_condition_number(k, (4, 4), mask,
                                                            live=False)["kappa"] == np.inf

    def test_gradient_and_errors(self):
        k = np.random.default_rng(21).standard_normal((3, 3, 2, 2))
        g = jax.grad(lambda k: spectral.conv_operator_singular_values(k, (4, 4))[0])(k)
        assert np.all(np.isfinite(np.asarray(g)))
        with pytest.raises(ValueError, match="2-D convolution kernel"):
            spectral.conv_operator_singular_values(np.ones((4, 4)), (3, 3))
        with pytest.raises(ValueError, match="channels"):
            spectral.conv_operator_singular_values(k, (4, 4, 3))


@pytest.mark.usefixtures("x64")
def test_tsc_gradient_scale_is_as_documented():
    """``reduce="sum"``: each weight gets ``lambda a (a + 1) / (a + |w|)^2 sign(w)``, about
    ``2 lambda`` for ``a = 1`` and small weights; ``mean`` divides it by all the weights,
    ``layer_mean`` by each kernel's size."""
    rng = np.random.default_rng(30)
    params = {"big": 0.02 * rng.standard_normal((300, 40)),
              "small": 0.02 * rng.standard_normal((6, 5)), "bias": rng.standard_normal(40)}
    a, lam = 1.0, 3e-5

    def grad(reduce):
        return jax.grad(lambda p: lam * tj.transformed_sparsity_penalty(p, a=a, reduce=reduce))(
            params)

    closed = {n: lam * a * (a + 1) / (a + np.abs(w)) ** 2 * np.sign(w)
              for n, w in params.items() if n != "bias"}
    g = grad("sum")
    for name, ref in closed.items():
        np.testing.assert_allclose(np.asarray(g[name]), ref, rtol=1e-10)
        # "about 2 lambda per weight" for |w| << a, within the documented bounds
        mags = np.abs(np.asarray(g[name]))
        assert np.all(mags <= lam * (a + 1) / a)
        assert np.all(mags >= lam * a * (a + 1) / (a + 1) ** 2)
        assert np.median(mags) == pytest.approx(2 * lam, rel=0.05)
    np.testing.assert_array_equal(np.asarray(g["bias"]), 0.0)
    total = sum(params[n].size for n in closed)
    g = grad("mean")
    for name, ref in closed.items():
        np.testing.assert_allclose(np.asarray(g[name]), ref / total, rtol=1e-10)
    g = grad("layer_mean")
    for name, ref in closed.items():
        np.testing.assert_allclose(np.asarray(g[name]), ref / params[name].size, rtol=1e-10)
    # Through the transformation: the same gradient added to the updates.
    tx = tj.add_transformed_sparsity_penalty(lam, a=a)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["big"]), closed["big"], rtol=1e-10)


@pytest.mark.usefixtures("x64")
def test_structural_rank_deficiency_inside_the_live_block():
    """Live rows 1 and 2 read only column 0: whatever the values, the live 3x3 block has rank 2.
    That zero is structural too: left out of the penalty and of the live kappa."""
    rng = np.random.default_rng(40)
    m = np.zeros((5, 4))
    m[0, :3] = rng.uniform(0.5, 1.5, 3)
    m[1, 0], m[2, 0] = 0.7, -1.3
    assert int(spectral.live_singular_value_count(m, structural=False)) == 3
    assert int(spectral.live_singular_value_count(m)) == 2
    assert int(jax.jit(spectral.live_singular_value_count)(m)) == 2
    s = np.linalg.svd(m, compute_uv=False)
    assert s[2] < 1e-12  # the structural zero
    logs = np.log(s[:2] + DELTA)
    ref = TAU * (np.log(np.sum(np.exp(logs / TAU))) + np.log(np.sum(np.exp(-logs / TAU))))
    np.testing.assert_allclose(float(_penalty(m)), ref, rtol=1e-10)
    g = np.asarray(jax.grad(_penalty)(m))
    assert np.all(np.isfinite(g))
    assert np.all(g[3:] == 0) and np.all(g[:, 3] == 0)  # dead rows and column
    live = spectral.tree_live_condition_numbers({"w": m})["w"]
    assert (live["live_rows"], live["live_cols"], live["live_rank"]) == (3, 3, 2)
    np.testing.assert_allclose(live["kappa"], s[0] / s[1], rtol=1e-10)
    # The tracked estimator leaves it out too: tracking the whole spectrum (2 k >= 4) gives the
    # exact live surrogate; with k = 1 its bottom block holds the structural zero, which is
    # dropped, so only sigma_max is left (a documented limitation: choose k above the deficiency).
    params = {"w": np.pad(m, ((0, 30), (0, 0)))}
    for k, expected in ((2, ref), (1, 0.0)):
        vectors = st.init_tracked_vectors(params, k=k)
        got = st.tracked_condition_number_penalty(params, vectors, temperature=TAU, delta=DELTA)
        np.testing.assert_allclose(float(got), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_operator_kappa_leaves_out_a_structural_channel_deficiency():
    """Filters 1 and 2 read input channel 0 only: every transfer matrix has rank <= 2 whatever
    the taps, so its third singular value is structural and left out of the live kappa."""
    rng = np.random.default_rng(41)
    k = np.zeros((3, 3, 3, 3))
    k[:, :, :, 0] = rng.standard_normal((3, 3, 3))
    k[:, :, 0, 1] = rng.standard_normal((3, 3))
    k[:, :, 0, 2] = rng.standard_normal((3, 3))
    grid = (4, 4)
    per_frequency = np.linalg.svd(np.fft.fft2(k, s=grid, axes=(0, 1)), compute_uv=False)
    assert per_frequency[..., 2].max() < 1e-12  # the structural zero at every frequency
    kept = np.sort(per_frequency[..., :2].ravel())[::-1]
    live = spectral.host_conv_operator_condition_number(k, grid)
    assert (live["live_in"], live["live_out"], live["live_rank"]) == (3, 3, 2)
    np.testing.assert_allclose(live["kappa"], kept[0] / kept[-1], rtol=1e-10)
    assert spectral.host_conv_operator_condition_number(k, grid, live=False)["kappa"] == np.inf
