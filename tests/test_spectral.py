"""Singular values, condition numbers and the smooth log-kappa surrogate against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_mask, random_with_spectrum
from jax.test_util import check_grads

import tscnc_jax as tj

# (shape, log10 kappa) cases: rectangular both ways, square, Conv-shaped, 5-D.
SHAPES = [(64, 16), (16, 64), (32, 32), (3, 3, 8, 16), (3, 3, 2, 64), (2, 2, 2, 3, 5)]


def _np_matrix(w):
    w = np.asarray(w, np.float64)
    return w.reshape(-1, w.shape[-1])


def _ill_conditioned(rng, shape, log10_kappa):
    m = int(np.prod(shape[:-1]))
    n = shape[-1]
    s = np.logspace(0, -log10_kappa, min(m, n))
    return random_with_spectrum(rng, m, n, s).reshape(shape)


class TestAsMatrix:
    def test_layouts(self):
        assert tj.as_matrix(jnp.zeros((7, 5))).shape == (7, 5)
        assert tj.as_matrix(jnp.zeros((3, 3, 4, 8))).shape == (36, 8)
        assert tj.as_matrix(jnp.zeros((2, 3, 3, 4, 8))).shape == (72, 8)
        w = jnp.arange(3 * 3 * 2 * 4.0).reshape(3, 3, 2, 4)
        # Column j of the matrix is output channel j's flattened filter.
        np.testing.assert_array_equal(tj.as_matrix(w)[:, 1], np.asarray(w[..., 1]).ravel())

    @pytest.mark.parametrize("shape", [(), (5,)])
    def test_low_rank_arrays_rejected(self, shape):
        with pytest.raises(ValueError, match="kernel.*ndim >= 2"):
            tj.as_matrix(jnp.zeros(shape))


@pytest.mark.usefixtures("x64")
class TestAgainstNumpy:
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("log10_kappa", [0.5, 3.0, 6.0])
    def test_singular_values_and_kappa(self, shape, log10_kappa):
        rng = np.random.default_rng(hash((shape, log10_kappa)) % 2**32)
        w = _ill_conditioned(rng, shape, log10_kappa)
        s_ref = np.linalg.svd(_np_matrix(w), compute_uv=False)
        s = np.asarray(jax.jit(tj.singular_values)(w))
        assert s.dtype == np.float64
        np.testing.assert_allclose(s, s_ref, rtol=1e-5)
        kappa = float(jax.jit(tj.condition_number)(w))
        np.testing.assert_allclose(kappa, 10.0**log10_kappa, rtol=1e-5)
        np.testing.assert_allclose(kappa, np.linalg.cond(_np_matrix(w)), rtol=1e-5)

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("sparsity", [0.5, 0.9])
    def test_masked(self, shape, sparsity):
        rng = np.random.default_rng(7)
        w = rng.standard_normal(shape)
        mask = random_mask(rng, shape, sparsity)
        s_ref = np.linalg.svd(_np_matrix(w * mask), compute_uv=False)
        s = tj.singular_values(w, mask)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-12 * s_ref[0])
        kappa_ref = s_ref[0] / s_ref[-1] if s_ref[-1] > 1e-12 * s_ref[0] else np.inf
        kappa = float(tj.condition_number(w, mask))
        np.testing.assert_allclose(kappa, kappa_ref, rtol=1e-5)
        tree = tj.tree_condition_numbers({"k": w}, masks={"k": mask})
        np.testing.assert_allclose(tree["k"], kappa_ref, rtol=1e-5)

    def test_rank_deficient_is_inf(self):
        w = np.random.default_rng(0).standard_normal((6, 4))
        w[:, 2] = 0.0  # a dead output unit
        assert float(tj.condition_number(w)) == np.inf
        assert float(tj.condition_number(jnp.zeros((4, 3)))) == np.inf
        rank1 = np.outer(np.arange(1.0, 6.0), np.arange(1.0, 4.0))
        assert float(tj.condition_number(rank1)) == np.inf
        mask = np.ones((6, 4))
        mask[:, 0] = 0
        assert tj.tree_condition_numbers({"k": np.ones((6, 4)) + np.eye(6, 4)}, {"k": mask})[
            "k"
        ] == float("inf")

    def test_vmap_over_kernels(self):
        w = np.random.default_rng(1).standard_normal((5, 12, 7))
        s = jax.vmap(tj.singular_values)(w)
        for i in range(5):
            np.testing.assert_allclose(s[i], np.linalg.svd(w[i], compute_uv=False), rtol=1e-10)


class TestTreeConditionNumbers:
    def test_keys_filter_and_float64_accuracy(self):
        rng = np.random.default_rng(3)
        conv = _ill_conditioned(rng, (3, 3, 4, 8), 6.0).astype(np.float32)
        dense = rng.standard_normal((16, 10)).astype(np.float32)
        params = {
            "Conv_0": {"kernel": conv, "bias": np.zeros(8, np.float32)},
            "Dense_0": {"kernel": dense, "bias": np.zeros(10, np.float32)},
            "BatchNorm_0": {"scale": np.ones(8, np.float32)},
        }
        kappas = tj.tree_condition_numbers(params)
        assert list(kappas) == ["Conv_0/kernel", "Dense_0/kernel"]
        assert all(isinstance(v, float) for v in kappas.values())
        # Reported in float64 even though the kernels are float32.
        ref = np.linalg.cond(_np_matrix(conv.astype(np.float64)))
        np.testing.assert_allclose(kappas["Conv_0/kernel"], ref, rtol=1e-9)
        np.testing.assert_allclose(kappas["Dense_0/kernel"], np.linalg.cond(dense), rtol=1e-6)

    def test_custom_filter(self):
        params = {"a": {"kernel": np.eye(3)}, "b": {"kernel": 2 * np.eye(4)}}
        kappas = tj.tree_condition_numbers(params, filter_fn=lambda p, w: p.startswith("b"))
        assert kappas == {"b/kernel": 1.0}


class TestLiveConditionNumbers:
    def test_dead_rows_and_columns_are_dropped(self):
        # A 7x5 matrix whose row 2 (an input nobody reads) and column 1 (a unit with no inputs)
        # are pruned away: the full kappa is inf, the live 6x4 part's is NumPy's cond of it.
        rng = np.random.default_rng(5)
        w = rng.standard_normal((7, 5))
        mask = np.ones_like(w)
        mask[2, :] = 0
        mask[:, 1] = 0
        assert tj.tree_condition_numbers({"k": w}, {"k": mask})["k"] == float("inf")
        live = tj.tree_live_condition_numbers({"k": w}, {"k": mask})["k"]
        ref = np.linalg.cond(np.delete(np.delete(w, 2, axis=0), 1, axis=1))
        np.testing.assert_allclose(live["kappa"], ref, rtol=1e-10)
        assert (live["live_rows"], live["live_cols"], live["rows"], live["cols"]) == (6, 4, 7, 5)
        # Its singular values are the full pruned matrix's non-zero ones.
        s_full = np.linalg.svd(w * mask, compute_uv=False)
        np.testing.assert_allclose(live["kappa"], s_full[0] / s_full[3], rtol=1e-10)

    def test_dense_kernel_unchanged_and_degenerate_cases(self):
        rng = np.random.default_rng(6)
        conv = rng.standard_normal((3, 3, 4, 8))
        live = tj.tree_live_condition_numbers({"Conv_0": {"kernel": conv}})["Conv_0/kernel"]
        np.testing.assert_allclose(live["kappa"], np.linalg.cond(_np_matrix(conv)), rtol=1e-10)
        assert (live["live_rows"], live["live_cols"]) == (36, 8)
        # A live part that is itself rank deficient stays inf; an all-zero kernel too.
        rank1 = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 4.0))
        assert tj.tree_live_condition_numbers({"k": rank1})["k"]["kappa"] == float("inf")
        empty = tj.tree_live_condition_numbers({"k": np.zeros((4, 3))})["k"]
        assert empty["kappa"] == float("inf") and empty["live_rows"] == 0


@pytest.mark.usefixtures("x64")
class TestInvariances:
    def test_scale_rotation_identity(self):
        rng = np.random.default_rng(11)
        w = _ill_conditioned(rng, (20, 12), 4.0)
        q_left, _ = np.linalg.qr(rng.standard_normal((20, 20)))
        q_right, _ = np.linalg.qr(rng.standard_normal((12, 12)))
        k = float(tj.condition_number(w))
        for c in (1e-3, 0.5, 7.0, -2.0):
            np.testing.assert_allclose(float(tj.condition_number(c * w)), k, rtol=1e-9)
        np.testing.assert_allclose(float(tj.condition_number(q_left @ w)), k, rtol=1e-9)
        np.testing.assert_allclose(float(tj.condition_number(w @ q_right)), k, rtol=1e-9)
        for n in (1, 5, 64):
            assert float(tj.condition_number(jnp.eye(n))) == pytest.approx(1.0, abs=1e-12)
        # Permuting Conv input channels is a row permutation: kappa unchanged.
        conv = rng.standard_normal((3, 3, 4, 8))
        np.testing.assert_allclose(
            float(tj.condition_number(conv[:, :, ::-1, :])),
            float(tj.condition_number(conv)),
            rtol=1e-9,
        )


@pytest.mark.usefixtures("x64")
class TestSmoothSurrogate:
    TEMPERATURES = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3]

    @pytest.mark.parametrize("shape", [(40, 12), (12, 40), (3, 3, 4, 16)])
    @pytest.mark.parametrize("delta", [0.0, 1e-3, 0.1])
    def test_bound_and_convergence(self, shape, delta):
        rng = np.random.default_rng(5)
        w = _ill_conditioned(rng, shape, 3.0)
        s = np.linalg.svd(_np_matrix(w), compute_uv=False)
        r = s.size
        log_kappa = np.log(s[0] / s[-1])
        log_kappa_delta = np.log((s[0] + delta) / (s[-1] + delta))
        gaps = []
        for tau in self.TEMPERATURES:
            value = float(tj.smooth_log_condition_number(w, temperature=tau, delta=delta))
            assert log_kappa_delta - 1e-12 <= value <= log_kappa_delta + 2 * tau * np.log(r) + 1e-12
            assert value <= log_kappa + 2 * tau * np.log(r) + 1e-12
            gaps.append(value - log_kappa_delta)
        # Monotone convergence to log kappa(M + delta) as the temperature falls.
        assert all(g1 >= g2 - 1e-12 for g1, g2 in zip(gaps, gaps[1:], strict=False))
        assert gaps[-1] < 1e-2

    def test_equal_singular_values_are_minimisers(self):
        q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((16, 16)))
        tau = 0.2
        value = float(tj.smooth_log_condition_number(q, temperature=tau, delta=0.0))
        np.testing.assert_allclose(value, 2 * tau * np.log(16), rtol=1e-10)
        grad = jax.grad(lambda w: tj.smooth_log_condition_number(w, temperature=tau, delta=0.0))(q)
        np.testing.assert_allclose(grad, 0.0, atol=1e-10)

    def test_matches_float64_reference_formula(self):
        rng = np.random.default_rng(9)
        w = rng.standard_normal((30, 10))
        mask = random_mask(rng, w.shape, 0.7)
        tau, delta = 0.25, 1e-2
        s = np.linalg.svd(w * mask, compute_uv=False)
        ls = np.log(s + delta)
        ref = tau * np.log(np.sum(np.exp(ls / tau))) + tau * np.log(np.sum(np.exp(-ls / tau)))
        value = tj.smooth_log_condition_number(w, temperature=tau, delta=delta, mask=mask)
        np.testing.assert_allclose(float(value), ref, rtol=1e-10)

    def test_gradient_check(self):
        w = np.random.default_rng(4).standard_normal((9, 6))
        mask = random_mask(np.random.default_rng(5), w.shape, 0.3)
        check_grads(
            lambda x: tj.smooth_log_condition_number(x, temperature=0.3, delta=1e-2, mask=mask),
            (w,),
            order=1,
            modes=["fwd", "rev"],
        )

    def test_gradient_is_singular_value_derivative(self):
        # dR/dM = U diag(dR/dsigma) V^T.
        rng = np.random.default_rng(6)
        w = rng.standard_normal((8, 5))
        tau, delta = 0.5, 1e-2
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        ls = np.log(s + delta)
        p_max = np.exp(ls / tau) / np.sum(np.exp(ls / tau))
        p_min = np.exp(-ls / tau) / np.sum(np.exp(-ls / tau))
        dsigma = (p_max - p_min) / (s + delta)
        expected = (u * dsigma) @ vt
        grad = jax.grad(lambda x: tj.smooth_log_condition_number(x, temperature=tau, delta=delta))
        np.testing.assert_allclose(grad(w), expected, rtol=1e-8, atol=1e-12)


@pytest.mark.usefixtures("x64")
class TestLogDetPenalty:
    def test_formula(self):
        rng = np.random.default_rng(0)
        w = 0.5 * rng.standard_normal((64, 10))
        ref = np.log(1e-5 + np.linalg.det(w.T @ w / 10)) ** 2
        np.testing.assert_allclose(float(tj.log_det_condition_penalty(w)), ref, rtol=1e-10)
        # Equals (sum log(sigma^2 / C))^2 when det >> eps.
        s = np.linalg.svd(w, compute_uv=False)
        approx = np.sum(np.log(s**2 / 10)) ** 2
        np.testing.assert_allclose(float(tj.log_det_condition_penalty(w, eps=0.0)), approx,
                                   rtol=1e-10)

    def test_gradient_check(self):
        w = np.random.default_rng(1).standard_normal((12, 4))
        check_grads(lambda x: tj.log_det_condition_penalty(x), (w,), order=1, modes=["rev"])

    def test_wide_matrix_is_constant(self):
        # n_out > n_in: the Gram matrix is singular, the term is log(eps)^2 with zero gradient.
        w = np.random.default_rng(2).standard_normal((4, 10))
        np.testing.assert_allclose(float(tj.log_det_condition_penalty(w)), np.log(1e-5) ** 2,
                                   rtol=1e-6)
        g = jax.grad(tj.log_det_condition_penalty)(w)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, 0.0, atol=1e-6)

    def test_float32_underflow_documented(self):
        # 100 classes at CIFAR-like scale: det underflows in float32, the term is inert.
        w = 0.05 * np.random.default_rng(3).standard_normal((640, 100)).astype(np.float32)
        with jax.enable_x64(False):
            value = tj.log_det_condition_penalty(jnp.asarray(w))
            grad = jax.grad(tj.log_det_condition_penalty)(jnp.asarray(w))
        np.testing.assert_allclose(float(value), np.log(1e-5) ** 2, rtol=1e-5)
        assert float(jnp.abs(grad).max()) == 0.0


class TestValidation:
    def test_bad_hyperparameters(self):
        w = jnp.ones((4, 3))
        with pytest.raises(ValueError, match="temperature"):
            tj.smooth_log_condition_number(w, temperature=-0.1, delta=1e-3)
        with pytest.raises(ValueError, match="temperature"):
            tj.smooth_log_condition_number(w, temperature=0.0, delta=1e-3)
        with pytest.raises(ValueError, match="delta"):
            tj.smooth_log_condition_number(w, temperature=0.1, delta=-1e-3)
        with pytest.raises(ValueError, match="eps"):
            tj.log_det_condition_penalty(w, eps=-1.0)
        with pytest.raises(ValueError, match="temperature"):
            tj.smooth_log_condition_number(w, temperature=float("nan"), delta=1e-3)

    def test_bad_kernels_and_masks(self):
        with pytest.raises(ValueError, match="kernel.*floating"):
            tj.singular_values(jnp.ones((4, 3), jnp.int32))
        with pytest.raises(ValueError, match="kernel.*floating"):
            tj.smooth_log_condition_number(jnp.ones((4, 3), bool), temperature=0.1, delta=0.0)
        with pytest.raises(ValueError, match="kernel.*ndim"):
            tj.condition_number(jnp.ones(3))
        with pytest.raises(ValueError, match="mask.*shape"):
            tj.singular_values(jnp.ones((4, 3)), mask=jnp.ones((3, 4)))
        with pytest.raises(ValueError, match="mask.*shape"):
            tj.tree_condition_numbers({"k": np.ones((4, 3))}, masks={"k": np.ones((4, 4))})
        with pytest.raises(ValueError, match="masks.*tree structure"):
            tj.tree_condition_numbers({"k": np.ones((4, 3))}, masks={"other": np.ones((4, 3))})

    def test_half_precision_is_promoted(self):
        w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.bfloat16)
        s = tj.singular_values(w)
        assert s.dtype == jnp.float32
        ref = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
        np.testing.assert_allclose(s, ref, rtol=1e-5)
