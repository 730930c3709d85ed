"""The empirical local Lipschitz estimate: bound directions, linear maps, invariances, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tscnc_jax as tj
from tests.conftest import random_with_spectrum


def _linear(w):
    return lambda x: jnp.reshape(x, (x.shape[0], -1)) @ w


def test_linear_map_approaches_sigma_max_from_below(x64):
    rng = np.random.default_rng(0)
    s = np.array([5.0, 2.0, 1.5, 1.0, 0.5])
    w = random_with_spectrum(rng, 12, 5, s)
    x = jnp.full((6, 12), 0.5)
    est = jax.jit(lambda x, k: tj.local_lipschitz(_linear(w), x, key=k, eps=0.2, norm="l2",
                                                   steps=60))(x, jax.random.key(1))
    est = np.asarray(est)
    assert est.shape == (6,)
    assert np.all(est <= s[0] * (1 + 1e-9))  # every iterate is a witness: never above the truth
    assert np.all(est >= 0.99 * s[0])  # the ascent on the Rayleigh quotient finds the top direction
    # An L-inf search ball is a smaller feasible set for the direction: still a lower bound.
    est_inf = tj.local_lipschitz(_linear(w), x, key=jax.random.key(2), eps=0.1, steps=30)
    assert np.all(np.asarray(est_inf) <= s[0] * (1 + 1e-9))
    assert np.all(np.asarray(est_inf) >= s[-1])


def test_relu_network_stays_below_product_of_spectral_norms(x64):
    model = tj.create_model("mlp", features=(32, 16), num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 20)))
    x = jax.random.uniform(jax.random.key(1), (16, 20))
    est = tj.local_lipschitz(lambda z: model.apply(params, z), x, key=jax.random.key(2),
                             eps=0.3, steps=40)
    kernels = [np.asarray(leaf) for path, leaf, _ in tj.named_leaves(params)
               if path.endswith("kernel")]
    bound = np.prod([np.linalg.svd(k, compute_uv=False)[0] for k in kernels])
    est = np.asarray(est)
    assert np.all(est > 0) and np.all(est <= bound * (1 + 1e-9)), (est.max(), bound)


def test_scales_with_the_output_and_is_reproducible():
    w = jax.random.normal(jax.random.key(0), (784, 10)) / 28
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    key = jax.random.key(3)
    base = tj.local_lipschitz(_linear(w), x, key=key, eps=0.1)
    np.testing.assert_array_equal(base, tj.local_lipschitz(_linear(w), x, key=key, eps=0.1))
    scaled = tj.local_lipschitz(_linear(3.0 * w), x, key=key, eps=0.1)
    np.testing.assert_allclose(scaled, 3.0 * base, rtol=1e-4)
    assert base.dtype == jnp.float32 and np.all(np.isfinite(base))


def test_rejects_a_zero_radius_and_bad_arguments():
    f = _linear(jnp.eye(3))
    x = jnp.full((2, 3), 0.5)
    with pytest.raises(ValueError, match="eps"):
        tj.local_lipschitz(f, x, key=jax.random.key(0), eps=0.0)
    with pytest.raises(ValueError, match="norm"):
        tj.local_lipschitz(f, x, key=jax.random.key(0), eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="steps"):
        tj.local_lipschitz(f, x, key=jax.random.key(0), eps=0.1, steps=0)
