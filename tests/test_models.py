"""Models: shapes, parameter naming, and the fast convolution/pooling lowerings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import tscnc_jax as tj
from tscnc_jax import models


def _count(params):
    return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("shape, kernel, strides, padding", [
    ((2, 2, 2, 8), (3, 3), (1, 1), "SAME"),
    ((2, 4, 4, 8), (3, 3), (1, 1), "SAME"),
    ((2, 5, 7, 3), (3, 3), (2, 2), "SAME"),
    ((2, 6, 6, 4), (5, 5), (1, 1), "VALID"),
    ((2, 4, 4, 4), (1, 1), (2, 2), "SAME"),
    ((1, 8, 8, 2), (3, 3), (2, 1), "VALID"),
])
def test_im2col_conv_matches_xla(shape, kernel, strides, padding):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (*kernel, shape[-1], 6))
    ref = lax.conv_general_dilated(x, w, strides, padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out = models._im2col_conv(x, w, strides, padding)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # The Conv module gives the same numbers whichever lowering it picks.
    for threshold in (0, 10_000):
        conv = models.Conv(6, kernel, strides, padding, im2col_max_pixels=threshold)
        variables = {"params": {"kernel": w, "bias": jnp.zeros(6)}}
        np.testing.assert_allclose(conv.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


def test_conv_has_nn_conv_parameters():
    x = jnp.ones((1, 8, 8, 3))
    ours = models.Conv(5).init(jax.random.key(0), x)["params"]
    flax = nn.Conv(5, (3, 3)).init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (2, 7, 5, 3), (1, 2, 2, 1)])
def test_max_pool_matches_flax(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    np.testing.assert_array_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


@pytest.mark.parametrize("name, kwargs, input_shape, n_params", [
    ("mlp", {}, (28, 28, 1), 784 * 256 + 256 + 256 * 256 + 256 + 2570),
    ("small_cnn", {}, (28, 28, 1), 421_642),
    ("lenet5", {}, (28, 28, 1), 61_706),
    ("vgg", {"depth": 11, "width": 0.25}, (28, 28, 1), None),
    ("vgg", {"depth": 16}, (32, 32, 3), 14_719_818),
    ("vgg", {"depth": 16, "use_bn": True}, (32, 32, 3), 14_724_042),
    ("preact_resnet18", {}, (32, 32, 3), None),
    ("wide_resnet", {"depth": 10, "widen_factor": 2}, (32, 32, 3), None),
    ("wide_resnet", {"depth": 10, "widen_factor": 2, "gated": True}, (32, 32, 3), None),
])
def test_models_shapes_and_kernels(name, kwargs, input_shape, n_params):
    model = tj.create_model(name, num_classes=10, **kwargs)
    x = jnp.zeros((2, *input_shape))
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "gates": jax.random.key(1)}, x))
    out = jax.eval_shape(
        lambda v: model.apply(v, x, train=False), variables)
    assert out.shape == (2, 10)
    params = variables["params"]
    if n_params is not None:
        assert _count(params) == n_params
    kernels = tj.named_leaves(params)
    assert kernels and all(path.endswith("kernel") for path, _, _ in kernels)


def test_preact_resnet18_forward_train_and_eval():
    model = tj.create_model("preact_resnet18", width=8)
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    assert _count(variables["params"]) < 200_000
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_gated_wide_resnet_gates():
    model = tj.create_model("wide_resnet", depth=10, widen_factor=1, gated=True)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init({"params": jax.random.key(1), "gates": jax.random.key(2)}, x)
    log_alphas = {p: w for p, w in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                  if tj.path_to_str(p).endswith("log_alpha")}
    assert len(log_alphas) == 3  # one gated conv per block, 3 blocks
    # Training samples gates (needs the "gates" RNG); evaluation is deterministic.
    a = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"gates":
                                                                             jax.random.key(3)})[0]
    b = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"gates":
                                                                             jax.random.key(4)})[0]
    assert not np.allclose(a, b)
    with pytest.raises(Exception, match="gates"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])
    # Gate parameters are 1-D, so the default kernel filter leaves them out of CNC/TSC.
    assert not any("log_alpha" in p for p, _, _ in tj.named_leaves(variables["params"]))


def test_create_model_errors():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'"):
        tj.create_model("resnet50")
    with pytest.raises(ValueError, match="widht"):
        tj.create_model("small_cnn", widht=3)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        tj.create_model("wide_resnet", depth=12).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
