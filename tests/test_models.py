"""Models: shapes, parameter naming, and the fast convolution/pooling lowerings."""

import re

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
    for pixels, channels in ((0, 0), (10_000, 0), (0, 10_000)):
        conv = models.Conv(6, kernel, strides, padding, im2col_max_pixels=pixels,
                           im2col_max_channels=channels)
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
    # Windows of random normals have a unique max: the gradient is nn.max_pool's too.
    g = jax.random.normal(jax.random.key(2), models.max_pool_2x2(x).shape)
    ours = jax.vjp(models.max_pool_2x2, x)[1](g)[0]
    flax_grad = jax.vjp(lambda z: nn.max_pool(z, (2, 2), (2, 2)), x)[1](g)[0]
    np.testing.assert_array_equal(ours, flax_grad)


def _pool_reference_grad(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """float64 loop: each window's cotangent shared equally among the elements equal to its max."""
    out = np.zeros_like(x, dtype=np.float64)
    b, h, w, c = x.shape
    for n, i, j, k in np.ndindex(b, h // 2, w // 2, c):
        window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k]
        hit = window == window.max()
        out[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k] = hit * g[n, i, j, k] / hit.sum()
    return out


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (2, 7, 5, 3)])
def test_max_pool_gradient_shares_ties_like_jnp_max(shape):
    # Values from {0, 1, 2} make ties common, as ReLU's zeros do in a network.
    x = jax.random.randint(jax.random.key(3), shape, 0, 3).astype(jnp.float32)
    y, vjp = jax.vjp(models.max_pool_2x2, x)
    g = jax.random.normal(jax.random.key(4), y.shape)
    ours = np.asarray(vjp(g)[0])
    even = (shape[1] // 2 * 2, shape[2] // 2 * 2)
    ref = np.zeros(shape)
    ref[:, :even[0], :even[1]] = _pool_reference_grad(
        np.asarray(x)[:, :even[0], :even[1]], np.asarray(g, np.float64))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert np.all(ours[:, even[0]:] == 0) and np.all(ours[:, :, even[1]:] == 0)
    # And autodiff of the plain reshape-and-max agrees.
    def autodiff_pool(z):
        b, h, w, c = z.shape
        z = z[:, :even[0], :even[1]]
        return z.reshape(b, even[0] // 2, 2, even[1] // 2, 2, c).max(axis=(2, 4))
    np.testing.assert_allclose(ours, jax.vjp(autodiff_pool, x)[1](g)[0], rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("strides, padding",
                         [((1, 1), "SAME"), ((2, 2), "SAME"), ((2, 1), "VALID")])
def test_xla_conv_derivatives_equal_autodiff(strides, padding):
    # The hand-written JVP (whose transpose XLA:CPU lowers to its fast convolution) must give
    # autodiff's numbers, forward and reverse mode, with respect to either argument or both.
    kx, kw, kt = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (2, 7, 6, 3))
    w = jax.random.normal(kw, (3, 3, 3, 4))

    def ref(z, k):
        return lax.conv_general_dilated(z, k, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ours(z, k):
        return models._xla_conv(z, k, strides, padding)

    def loss(f):
        return lambda z, k: jnp.sum(jnp.sin(f(z, k)))

    for argnums in (0, 1, (0, 1)):
        a = jax.grad(loss(ours), argnums)(x, w)
        b = jax.grad(loss(ref), argnums)(x, w)
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), a, b)
    tangents = (jax.random.normal(kt, x.shape), jnp.ones_like(w))
    _, jvp_ours = jax.jvp(ours, (x, w), tangents)
    _, jvp_ref = jax.jvp(ref, (x, w), tangents)
    np.testing.assert_allclose(jvp_ours, jvp_ref, rtol=1e-5, atol=1e-5)
    # Second order (a gradient-norm penalty differentiates through the input gradient).
    hvp = jax.grad(lambda k: jnp.sum(jax.grad(loss(ours))(x, k) ** 2))(w)
    hvp_ref = jax.grad(lambda k: jnp.sum(jax.grad(loss(ref))(x, k) ** 2))(w)
    np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-4, atol=1e-4)


def test_attack_loop_convolutions_use_standard_kernel_layout():
    # A lowering contract (no timing): inside a PGD while loop, every convolution of the small
    # CNN's input gradient must read its kernel in HWIO order (dim_labels ..._01io->...); the
    # swapped 01oi form is the one XLA:CPU runs 2.5x slower. Checked on the compiled HLO.
    model = tj.create_model("small_cnn")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    x = jnp.zeros((8, 28, 28, 1))
    y = jnp.zeros((8,), jnp.int32)
    attack = jax.jit(lambda v, z: tj.attacks.pgd(lambda u: model.apply(v, u), z, y,
                                         key=jax.random.key(1), eps=0.1, steps=3))
    hlo = attack.lower(variables, x).compile().as_text()
    labels = re.findall(r"dim_labels=(\w+)->", hlo)
    assert labels, "no convolution in the compiled attack"
    assert all(lab.endswith("_01io") for lab in labels), labels


def _exported_step(platform: str, conv_impl: str) -> str:
    """The StableHLO of a TRADES training step of the small CNN, exported for ``platform``."""
    model = tj.create_model("small_cnn", width=4, conv_impl=conv_impl)
    tx = tj.training.make_optimizer(0.1, cnc_weight=0.1)
    state = tj.create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    step = jax.jit(tj.training.make_train_step(
        model, tx, loss="trades", attack=tj.training.default_attack("trades", eps=0.1, steps=1)))
    batch = {"image": jnp.zeros((4, 28, 28, 1)), "label": jnp.zeros((4,), jnp.int32)}
    return jax.export.export(step, platforms=(platform,))(state, batch).mlir_module()


def _cpu_kernels(text: str) -> dict:
    """What the CPU kernels leave in a program: the barrier of the rewritten convolution
    backward and im2col's concatenation of 3x3 = 9 shifted slices along the channel axis."""
    im2col = [c for c in re.findall(r"stablehlo\.concatenate ([^\n]*)", text)
              if c.count("%") == 9 and "dim = 3" in c]
    return {"barrier": text.count("optimization_barrier"), "im2col": len(im2col)}


def test_cpu_kernels_only_in_programs_lowered_for_the_cpu():
    cpu = _cpu_kernels(_exported_step("cpu", "auto"))
    assert cpu["barrier"] > 0 and cpu["im2col"] > 0, cpu
    for platform in ("cuda", "tpu"):
        assert _cpu_kernels(_exported_step(platform, "auto")) == {"barrier": 0, "im2col": 0}
    # The explicit overrides win over the platform.
    forced = _cpu_kernels(_exported_step("cuda", "cpu"))
    assert forced["barrier"] > 0 and forced["im2col"] > 0, forced
    assert _cpu_kernels(_exported_step("cpu", "xla")) == {"barrier": 0, "im2col": 0}


@pytest.mark.parametrize("name, kwargs, shape", [
    ("small_cnn", {"width": 4}, (28, 28, 1)),
    ("lenet5", {}, (28, 28, 1)),
    ("vgg", {"width": 1 / 16, "use_bn": True}, (32, 32, 3)),
])
def test_conv_impls_compute_the_same_function(name, kwargs, shape):
    x = jax.random.uniform(jax.random.key(1), (3, *shape))
    y = jnp.array([0, 1, 2])
    fns = {}
    for impl in models.CONV_IMPLS:
        model = tj.create_model(name, conv_impl=impl, **kwargs)
        variables = model.init(jax.random.key(0), x[:1])  # the same parameters for every impl
        fns[impl] = jax.value_and_grad(
            lambda v, z, m=model: tj.training.cross_entropy(m.apply(v, z), y).mean(),
            argnums=(0, 1))
    ref_loss, ref_grads = fns["xla"](variables, x)
    for impl in ("cpu", "auto"):
        loss, grads = fns[impl](variables, x)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     grads, ref_grads)


def test_conv_impl_and_dtype_are_checked_by_name():
    with pytest.raises(ValueError, match=r"conv_impl must be one of .* got 'gpu'"):
        tj.create_model("small_cnn", conv_impl="gpu")
    with pytest.raises(ValueError, match=r"dtype must be one of .* got 'float16'"):
        tj.create_model("small_cnn", dtype="float16")
    model = tj.create_model("small_cnn", width=4, dtype="bfloat16")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))  # float32 params
    assert model.apply(variables, jnp.zeros((2, 28, 28, 1))).dtype == jnp.bfloat16
