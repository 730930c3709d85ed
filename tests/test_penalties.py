"""Tree penalties: values, filters, masks, and finite gradients at degenerate points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_mask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import tscnc_jax as tj


def _params(rng, dtype=np.float64):
    return {
        "Conv_0": {"kernel": rng.standard_normal((3, 3, 2, 8)).astype(dtype),
                   "bias": rng.standard_normal(8).astype(dtype)},
        "Dense_0": {"kernel": rng.standard_normal((72, 16)).astype(dtype),
                    "bias": rng.standard_normal(16).astype(dtype)},
        "BatchNorm_0": {"scale": rng.standard_normal(16).astype(dtype)},
        "Dense_1": {"kernel": rng.standard_normal((16, 10)).astype(dtype)},
    }


@pytest.mark.usefixtures("x64")
class TestTreePenalties:
    def test_condition_number_penalty_reduces_over_kernels(self):
        params = _params(np.random.default_rng(0))
        kernels = [params["Conv_0"]["kernel"], params["Dense_0"]["kernel"],
                   params["Dense_1"]["kernel"]]
        terms = [float(tj.smooth_log_condition_number(k, temperature=0.2, delta=1e-3))
                 for k in kernels]
        mean = tj.condition_number_penalty(params, temperature=0.2, delta=1e-3)
        total = tj.condition_number_penalty(params, temperature=0.2, delta=1e-3, reduce="sum")
        np.testing.assert_allclose(float(mean), np.mean(terms), rtol=1e-12)
        np.testing.assert_allclose(float(total), np.sum(terms), rtol=1e-12)

    def test_log_det_form_and_filter(self):
        params = _params(np.random.default_rng(1))
        only_classifier = lambda path, leaf: path == "Dense_1/kernel"
        value = tj.condition_number_penalty(params, form="log_det", filter_fn=only_classifier)
        ref = tj.log_det_condition_penalty(params["Dense_1"]["kernel"])
        np.testing.assert_allclose(float(value), float(ref), rtol=1e-12)
        # Nothing selected: zero.
        assert float(tj.condition_number_penalty(params, filter_fn=lambda p, w: False)) == 0.0

    def test_masks_are_applied(self):
        rng = np.random.default_rng(2)
        params = _params(rng)
        mask = random_mask(rng, (72, 16), 0.9)
        masks = jax.tree.map(lambda _: None, params)
        masks["Dense_0"]["kernel"] = mask
        pruned = jax.tree.map(lambda x: x, params)
        pruned["Dense_0"]["kernel"] = params["Dense_0"]["kernel"] * mask
        for fn in (
            lambda p, m: tj.condition_number_penalty(p, masks=m, temperature=0.1, delta=1e-2),
            lambda p, m: tj.transformed_sparsity_penalty(p, masks=m, a=1.0),
        ):
            np.testing.assert_allclose(float(fn(params, masks)), float(fn(pruned, None)),
                                       rtol=1e-12)
            # Pruned entries get no gradient from either penalty; the others do.
            g = np.asarray(jax.grad(lambda p, fn=fn: fn(p, masks))(params)["Dense_0"]["kernel"])
            assert np.all(g[mask == 0] == 0)
            assert np.count_nonzero(g[mask == 1]) > 0.9 * np.count_nonzero(mask)

    def test_transformed_sparsity_penalty(self):
        params = _params(np.random.default_rng(3))
        kernels = [params["Conv_0"]["kernel"], params["Dense_0"]["kernel"],
                   params["Dense_1"]["kernel"]]
        a = 0.5
        ref = sum(np.sum((a + 1) * np.abs(k) / (a + np.abs(k))) for k in kernels)
        np.testing.assert_allclose(float(tj.transformed_sparsity_penalty(params, a=a)), ref,
                                   rtol=1e-12)
        n = sum(k.size for k in kernels)
        np.testing.assert_allclose(
            float(tj.transformed_sparsity_penalty(params, a=a, reduce="mean")), ref / n,
            rtol=1e-12)
        layer_mean = sum(np.mean((a + 1) * np.abs(k) / (a + np.abs(k))) for k in kernels)
        np.testing.assert_allclose(
            float(tj.transformed_sparsity_penalty(params, a=a, reduce="layer_mean")),
            layer_mean, rtol=1e-12)
        with pytest.raises(ValueError, match="reduce"):
            tj.transformed_sparsity_penalty(params, a=a, reduce="max")
        # Biases and norm scales are excluded by default: changing them changes nothing.
        params["Conv_0"]["bias"] = params["Conv_0"]["bias"] * 100
        params["BatchNorm_0"]["scale"] = params["BatchNorm_0"]["scale"] * 100
        np.testing.assert_allclose(float(tj.transformed_sparsity_penalty(params, a=a)), ref,
                                   rtol=1e-12)

    def test_gradient_checks(self):
        params = _params(np.random.default_rng(4))
        check_grads(lambda p: tj.condition_number_penalty(p, temperature=0.3, delta=1e-2),
                    (params,), order=1, modes=["rev"])
        check_grads(lambda p: tj.transformed_sparsity_penalty(p, a=2.0, eps=1e-2), (params,),
                    order=1, modes=["rev"])
        check_grads(lambda p: tj.condition_number_penalty(p, form="log_det",
                                                          filter_fn=lambda q, w: "Dense_1" in q),
                    (params,), order=1, modes=["rev"])

    def test_validation(self):
        params = _params(np.random.default_rng(5))
        with pytest.raises(ValueError, match="reduce"):
            tj.condition_number_penalty(params, reduce="max")
        with pytest.raises(ValueError, match="form"):
            tj.condition_number_penalty(params, form="exact")
        with pytest.raises(ValueError, match="temperature"):
            tj.condition_number_penalty(params, temperature=-1.0)
        with pytest.raises(ValueError, match="delta"):
            tj.condition_number_penalty(params, delta=-1.0)
        with pytest.raises(ValueError, match="`a`"):
            tj.transformed_sparsity_penalty(params, a=-1.0)
        bad = jax.tree.map(lambda _: None, params)
        bad["Dense_0"]["kernel"] = np.ones((16, 72))
        with pytest.raises(ValueError, match="masks.*Dense_0/kernel.*shape"):
            tj.condition_number_penalty(params, masks=bad)
        with pytest.raises(ValueError, match="masks.*tree structure"):
            tj.transformed_sparsity_penalty(params, a=1.0, masks={"Dense_0": None})


# ---------------------------------------------------------------------------------------------
# Finite gradients where SVD-based gradients usually break (JAX issues 2311, 8732).
# ---------------------------------------------------------------------------------------------

# Per-kernel penalties ``(w, mask) -> scalar``, each on the masked kernel; value_and_grad wrt w,
# jitted once at module level so that fuzzing recompiles per shape only.
_PENALTIES = {
    "smooth_cnc": lambda w, m: tj.smooth_log_condition_number(
        w, temperature=0.1, delta=1e-3, mask=m),
    "smooth_cnc_tiny_delta": lambda w, m: tj.smooth_log_condition_number(
        w, temperature=0.01, delta=1e-8, mask=m),
    "log_det": lambda w, m: tj.log_det_condition_penalty(w, mask=m),
    "tsc": lambda w, m: jnp.sum(tj.transformed_l1(w * m, a=1.0)),
    "tsc_smooth": lambda w, m: jnp.sum(tj.transformed_l1(w * m, a=0.1, eps=1e-3)),
    "gated_tsc": lambda w, m: tj.gated_tsc_penalty(
        w, jnp.zeros(w.shape[-1], w.dtype), mask=m, form="authors_code"),
}
_VALUE_AND_GRAD = {name: jax.jit(jax.value_and_grad(fn)) for name, fn in _PENALTIES.items()}


def _degenerate_kernels():
    rank1 = np.outer(np.arange(1.0, 9.0), np.arange(1.0, 5.0))
    zero_rows = np.random.default_rng(0).standard_normal((8, 4))
    zero_rows[[1, 4, 6]] = 0.0
    zero_cols = np.random.default_rng(1).standard_normal((8, 4))
    zero_cols[:, [0, 2]] = 0.0
    return {
        "identity": np.eye(6),
        "repeated": np.diag([2.0, 2.0, 1.0, 1.0, 1.0]),
        "rank1": rank1,
        "zero_rows": zero_rows,
        "zero_cols": zero_cols,
        "zeros": np.zeros((5, 3)),
        "conv_identity": np.eye(9 * 2, 4).reshape(3, 3, 2, 4),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(_degenerate_kernels()))
def test_finite_gradients_on_degenerate_kernels(case, dtype):
    with jax.enable_x64(dtype == np.float64):
        w = jnp.asarray(_degenerate_kernels()[case], dtype)
        for name, fn in _VALUE_AND_GRAD.items():
            value, grad = fn(w, jnp.ones_like(w))
            assert np.isfinite(float(value)), (case, name)
            assert np.all(np.isfinite(np.asarray(grad))), (case, name)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(16, 8), (8, 16), (64, 64), (3, 3, 4, 16), (3, 3, 16, 8), (256, 32)]),
    sparsity=st.sampled_from([0.5, 0.9, 0.99, 0.999]),
    seed=st.integers(0, 2**16),
)
def test_finite_gradients_on_pruned_kernels(shape, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    mask = jnp.asarray(random_mask(rng, shape, sparsity), jnp.float32)
    for name, fn in _VALUE_AND_GRAD.items():
        value, grad = fn(w, mask)
        assert np.isfinite(float(value)), name
        g = np.asarray(grad)
        assert np.all(np.isfinite(g)), name
        # The pruned weights receive exactly zero gradient.
        assert np.all(g[np.asarray(mask) == 0] == 0), name
    # The whole-tree penalties too, under jit.
    params = {"layer": {"kernel": w, "bias": jnp.zeros(shape[-1])}}
    masks = {"layer": {"kernel": mask, "bias": None}}
    grads = _tree_grad(params, masks)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@jax.jit
def _tree_grad(params, masks):
    return jax.grad(lambda p: tj.condition_number_penalty(p, masks=masks)
                    + tj.transformed_sparsity_penalty(p, a=1.0, masks=masks))(params)
