"""Flax linen models: MLP, small CNN, LeNet-5, VGG, pre-activation ResNet-18 and WideResNet.

Conventions:

* Inputs are NHWC images in ``[0, 1]`` (no normalisation layer, as in the adversarial-training
  literature this project follows); outputs are logits.
* ``model.apply(variables, x, train=...)``; models with BatchNorm keep ``batch_stats`` (pass
  ``mutable=["batch_stats"]`` when ``train=True``). For data-parallel training build them with
  ``bn_axis_name`` equal to the step's axis name: batch statistics are then synchronised.
  Gated WideResNets draw their hard-concrete gates from the ``"gates"`` RNG stream when
  ``train=True``.
* Parameter paths are Flax's automatic names (``Conv_0/kernel``, ``PreActBlock_3/Conv_1/kernel``,
  ``Dense_0/kernel``), so penalties and pruning address kernels by path, and every prunable kernel
  is a floating array of ndim >= 2 (:func:`tscnc_jax.tree_utils.is_kernel`).
* ``conv_impl`` (every model): ``"auto"`` (default) uses the XLA:CPU-tuned convolution and
  pooling kernels below when the computation is lowered for the CPU and plain
  ``lax.conv_general_dilated`` / ``nn.max_pool`` on GPU and TPU; ``"cpu"`` / ``"xla"`` force
  one of them (:data:`CONV_IMPLS`). ``dtype`` is the compute dtype (``"bfloat16"`` accepted by
  :func:`create_model`); parameters are float32 either way.
* Pruning masks are not part of the models: apply them to the parameters
  (:func:`tscnc_jax.apply_masks`) before ``apply``; the models stay pure.

Speed on XLA:CPU (``python -m benchmarks.lowering``, batch 128, forward + backward, measured on
the project's 2-core machine): XLA:CPU lowers a 3x3 convolution with a 2x2 output to a slow
direct convolution, 1503 ms against 19.6 ms as im2col + matmul for 512->512 channels; from 4x4
outputs on, XLA's own convolution is as fast or faster (88 vs 99 ms at 4x4, 121 vs 192 ms at
16x16). :class:`Conv` therefore switches to im2col + matmul for outputs of at most 4 pixels, with
the same parameters. It does the same for inputs of at most 3 channels (a first layer): on a
28x28x1 -> 32 conv the input gradient takes 2.8 ms as im2col against 8.5 ms (32x32x3 -> 64:
26 vs 46 ms), while at 8 channels im2col is already 5x slower. 2x2 max pooling is a
reshape-and-max, 3.8-13x faster than ``nn.max_pool`` forward + backward at the shapes of the
small CNN and VGG, with a hand-written elementwise backward that halves the small CNN's input
gradient again (47 -> 23 ms at batch 128) against autodiff of the reshape-and-max. (The
first-layer numbers are with jaxlib 0.10's default YNNPACK convolution fusions; under
:func:`tscnc_jax.xla_cpu.set_fast_cpu_flags` im2col is about even at 3 input channels and still
2x faster for the input gradient at 1.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import custom_derivatives, lax

from tscnc_jax import sparsity

Array = jax.Array

conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # He et al. 2015


def _window_broadcast(y: Array) -> Array:
    """Repeats each pixel of ``(b, h, w, c)`` over a 2x2 window: ``(b, 2h, 2w, c)``."""
    b, h, w, c = y.shape
    return jnp.broadcast_to(y[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
        b, 2 * h, 2 * w, c)


def _is_zero(tangent: Any) -> bool:
    return isinstance(tangent, custom_derivatives.SymbolicZero)


@jax.custom_jvp
def _max_pool_2x2_even(x: Array) -> Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@_max_pool_2x2_even.defjvp
def _max_pool_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    # JAX's own rule for a max reduction, written so that its transpose (the backward pass) is
    # elementwise: a window's tangent is the mean of the tangents of the elements equal to its
    # max. Ties are common (a zero image background gives a constant conv output). Autodiff of
    # the reshape-and-max gives the same numbers, but its transpose lowers to 6-D transposes and
    # a reduction that XLA:CPU ran several times slower than the forward; here the tie count is
    # a sum of four strided slices, and the transpose a broadcast times the tie mask, which fuse.
    (x,), (dx,) = primals, tangents
    y = _max_pool_2x2_even(x)
    b, h, w, c = x.shape
    hit = (x == _window_broadcast(y)).astype(x.dtype)
    count = hit[:, 0::2, 0::2] + hit[:, 0::2, 1::2] + hit[:, 1::2, 0::2] + hit[:, 1::2, 1::2]
    dy = (hit * dx).reshape(b, h // 2, 2, w // 2, 2, c).sum(axis=(2, 4)) / count
    return y, dy


#: Layer implementations: ``"cpu"`` the XLA:CPU-tuned kernels of this module (im2col for small
#: outputs and thin inputs, the convolution's rewritten backward, the elementwise max-pool
#: backward), ``"xla"`` plain ``lax.conv_general_dilated`` / ``nn.max_pool``, ``"auto"`` the CPU
#: kernels where the computation is lowered for the CPU and the plain ones on any other platform
#: (``lax.platform_dependent``: decided per lowering, so a step exported for ``cuda`` or ``tpu``
#: from a CPU host carries no CPU kernel).
CONV_IMPLS = ("auto", "cpu", "xla")


def check_conv_impl(impl: str) -> str:
    """Returns ``impl`` if it is one of :data:`CONV_IMPLS`, else raises ``ValueError``."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
    return impl


def _by_platform(impl: str, cpu: Callable, xla: Callable, *args: Array) -> Array:
    if impl == "cpu":
        return cpu(*args)
    if impl == "xla":
        return xla(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=xla)


def max_pool_2x2(x: Array, impl: str = "auto") -> Array:
    """2x2 max pooling with stride 2 (VALID: an odd last row/column is dropped), NHWC.

    Same values as ``nn.max_pool(x, (2, 2), (2, 2))``. With the CPU kernel (``impl="cpu"``, or
    ``"auto"`` on the CPU; see :data:`CONV_IMPLS`) the gradient is that of ``jnp.max`` over each
    window: ties share the cotangent equally (``nn.max_pool``'s select-and-scatter, used by
    ``"xla"``, gives all of it to one of them; the two agree wherever a window's max is unique).
    """
    b, h, w, c = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"max_pool_2x2 needs spatial size >= 2, got {h}x{w}.")
    x = x[:, : h - h % 2, : w - w % 2, :]
    return _by_platform(check_conv_impl(impl), _max_pool_2x2_even,
                        lambda v: nn.max_pool(v, (2, 2), (2, 2)), x)


def _im2col_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: str) -> Array:
    """Convolution as one matmul over shifted slices (equals ``lax.conv_general_dilated``)."""
    kh, kw, _, c_out = kernel.shape
    sh, sw = strides
    if padding == "SAME":
        h, w = x.shape[1:3]
        out_h, out_w = -(-h // sh), -(-w // sw)
        pad_h = max((out_h - 1) * sh + kh - h, 0)
        pad_w = max((out_w - 1) * sw + kw - w, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                        (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    elif padding != "VALID":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
    h, w = x.shape[1:3]
    out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
    cols = [
        x[:, i : i + (out_h - 1) * sh + 1 : sh, j : j + (out_w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    # Channel order (kh, kw, c_in) matches kernel.reshape(-1, c_out), i.e. as_matrix(kernel).
    return jnp.concatenate(cols, axis=-1) @ kernel.reshape(-1, c_out)


_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _xla_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: str) -> Array:
    """``lax.conv_general_dilated`` in NHWC / HWIO, with a backward XLA:CPU runs at full speed."""
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _xla_conv_jvp(strides, padding, primals, tangents):
    # Autodiff's input gradient is a convolution that reads the kernel with its in/out features
    # swapped (dim_labels 01oi). Inside a while loop (every attack) XLA:CPU runs such a
    # convolution on a slow generic path, with or without its YNNPACK fusions
    # (tscnc_jax/xla_cpu.py): a 14x14x32->64 attack iteration took 28.5 ms, 7.0 ms here. Here
    # the tangent in x goes through a copy of the kernel stored (kh, kw, c_out, c_in) (the
    # barrier stops XLA folding the transpose back), so its transpose -- the input gradient --
    # is a standard 01io convolution. The numbers are autodiff's (identical wherever
    # measured; the tests compare to 1e-5).
    (x, kernel), (dx, dkernel) = primals, tangents
    terms = []
    if not _is_zero(dx):
        swapped = lax.optimization_barrier(kernel.transpose(0, 1, 3, 2))
        terms.append(lax.conv_general_dilated(dx, swapped, strides, padding,
                                              dimension_numbers=("NHWC", "HWOI", "NHWC")))
    if not _is_zero(dkernel):
        terms.append(lax.conv_general_dilated(x, dkernel, strides, padding,
                                              dimension_numbers=_NHWC))
    return _xla_conv(x, kernel, strides, padding), sum(terms[1:], terms[0])


_xla_conv.defjvp(_xla_conv_jvp, symbolic_zeros=True)


class Conv(nn.Module):
    """2-D convolution with ``nn.Conv``'s parameters (``kernel (kh, kw, c_in, c_out)``, ``bias``).

    With the CPU kernels (``impl="cpu"``, or the default ``"auto"`` when lowered for the CPU;
    see :data:`CONV_IMPLS`), outputs of at most ``im2col_max_pixels`` pixels (default: 2x2),
    and inputs of at most ``im2col_max_channels`` channels (default 3: a first layer on grey or
    RGB images), are computed as im2col + matmul (77x faster on XLA:CPU for the former, 1.8-3x
    faster input gradient for the latter, see the module docstring); the rest with
    ``lax.conv_general_dilated`` and a rewritten backward. ``impl="xla"`` (and ``"auto"`` on
    GPU/TPU) is plain ``lax.conv_general_dilated``. All give the same result to float32
    rounding.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = conv_kernel_init
    im2col_max_pixels: int = 4
    im2col_max_channels: int = 3
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        strides = tuple(self.strides)
        y = _by_platform(check_conv_impl(self.impl),
                         functools.partial(self._cpu_conv, strides=strides),
                         lambda a, k: lax.conv_general_dilated(a, k, strides, self.padding,
                                                               dimension_numbers=_NHWC),
                         x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y

    def _cpu_conv(self, x: Array, kernel: Array, *, strides: tuple[int, int]) -> Array:
        kh, kw = self.kernel_size
        sh, sw = strides
        h, w = x.shape[1:3]
        if self.padding == "SAME":
            out_pixels = -(-h // sh) * -(-w // sw)
        else:
            out_pixels = ((h - kh) // sh + 1) * ((w - kw) // sw + 1)
        if out_pixels <= self.im2col_max_pixels or x.shape[-1] <= self.im2col_max_channels:
            return _im2col_conv(x, kernel, strides, self.padding)
        return _xla_conv(x, kernel, strides, self.padding)


class GatedConv(nn.Module):
    """A bias-free :class:`Conv` whose output channels are scaled by hard-concrete gates.

    Parameters ``kernel`` and ``log_alpha`` (one gate per output channel, initialised as in
    Louizos et al. 2018 with drop rate 0.3). Training (``train=True``) draws one gate sample per
    channel from the ``"gates"`` RNG stream, shared across the batch; evaluation uses the
    deterministic gate. Scaling the output equals scaling the channel's weights since there is no
    bias. Pair with :func:`tscnc_jax.gated_tsc_penalty` / :func:`tscnc_jax.gated_sparsity_penalty`.
    """

    features: int
    strides: tuple[int, int] = (1, 1)
    droprate_init: float = 0.3
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        y = Conv(self.features, strides=self.strides, use_bias=False, dtype=self.dtype,
                 impl=self.conv_impl, name="conv")(x)
        log_alpha = self.param(
            "log_alpha",
            lambda key, n: sparsity.init_log_alpha(key, n, droprate=self.droprate_init),
            self.features,
        )
        if train:
            z = sparsity.hard_concrete_sample(self.make_rng("gates"), log_alpha)
        else:
            z = sparsity.hard_concrete_gate(log_alpha)
        return y * z.astype(y.dtype)


def _batch_norm(train: bool, dtype: Any, axis_name: str | None) -> nn.BatchNorm:
    # With ``axis_name`` (the data-parallel axis) the batch statistics are averaged over devices
    # (synchronised BatchNorm), so a step gives the same result on any number of devices.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        axis_name=axis_name if train else None)


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    features: Sequence[int] = (256, 256)
    num_classes: int = 10
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # no convolution; accepted so that every model takes the same keys

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        del train
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for f in self.features:
            x = nn.relu(nn.Dense(f, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class SmallCNN(nn.Module):
    """MNIST-scale CNN: Conv3x3(32)-pool-Conv3x3(64)-pool-Dense(128)-Dense(classes).

    421,642 parameters on 28x28x1 inputs. ``gated=True`` replaces both convs by bias-free
    :class:`GatedConv` layers (one hard-concrete gate per output channel), the network the
    authors'-code variant of TSCNC penalises with the gated TSC on MNIST-scale data; apply it
    with ``train=True`` only with a ``"gates"`` RNG.
    """

    num_classes: int = 10
    width: int = 32
    gated: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        for features in (self.width, 2 * self.width):
            if self.gated:
                x = GatedConv(features, dtype=self.dtype, conv_impl=self.conv_impl)(x, train=train)
            else:
                x = Conv(features, dtype=self.dtype, impl=self.conv_impl)(x)
            x = max_pool_2x2(nn.relu(x), self.conv_impl)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(4 * self.width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, for 28x28 or 32x32 inputs."""

    num_classes: int = 10
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        del train
        pad = "SAME" if x.shape[1] == 28 else "VALID"  # 28x28 is padded to the classic 32x32
        impl = self.conv_impl
        x = max_pool_2x2(nn.relu(Conv(6, (5, 5), padding=pad, dtype=self.dtype, impl=impl)(x)),
                         impl)
        x = max_pool_2x2(nn.relu(Conv(16, (5, 5), padding="VALID", dtype=self.dtype,
                                      impl=impl)(x)), impl)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(84, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


VGG_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """CIFAR-style VGG (Simonyan and Zisserman 2015): 3x3 convs, 2x2 pools, one Dense classifier.

    ``width`` scales every conv's channels (``width=0.25`` gives a narrow VGG for CPU runs). A
    pool is skipped once the feature map is 1x1 (28x28 inputs reach 1x1 after four pools).
    """

    depth: int = 16
    num_classes: int = 10
    use_bn: bool = False
    width: float = 1.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        if self.depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {self.depth}.")
        for item in VGG_CONFIGS[self.depth]:
            if item == "M":
                if x.shape[1] >= 2 and x.shape[2] >= 2:
                    x = max_pool_2x2(x, self.conv_impl)
                continue
            x = Conv(max(1, int(round(item * self.width))), use_bias=not self.use_bn,
                     dtype=self.dtype, impl=self.conv_impl)(x)
            if self.use_bn:
                x = _batch_norm(train, self.dtype, self.bn_axis_name)(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))  # 1x1 for 32x32 inputs: a reshape
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, arXiv 1603.05027), optional gated first conv."""

    features: int
    strides: tuple[int, int] = (1, 1)
    gated: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name)(x))
        if x.shape[-1] != self.features or self.strides != (1, 1):
            shortcut = Conv(self.features, (1, 1), self.strides, use_bias=False,
                            dtype=self.dtype, impl=self.conv_impl, name="shortcut")(out)
        else:
            shortcut = x
        if self.gated:
            y = GatedConv(self.features, self.strides, dtype=self.dtype,
                          conv_impl=self.conv_impl)(out, train=train)
        else:
            y = Conv(self.features, strides=self.strides, use_bias=False, dtype=self.dtype,
                     impl=self.conv_impl)(out)
        y = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name)(y))
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = Conv(self.features, use_bias=False, dtype=self.dtype, impl=self.conv_impl)(y)
        return y + shortcut


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 for 32x32 inputs (four stages of two blocks, 64-512 channels)."""

    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = Conv(self.width, use_bias=False, dtype=self.dtype, impl=self.conv_impl)(x)
        for stage, mult in enumerate((1, 2, 4, 8)):
            for block in range(2):
                strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
                x = PreActBlock(self.width * mult, strides, dtype=self.dtype,
                                conv_impl=self.conv_impl,
                                bn_axis_name=self.bn_axis_name)(x, train=train)
        x = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


class WideResNet(nn.Module):
    """Pre-activation WideResNet-d-k (Zagoruyko and Komodakis 2016).

    ``gated=True`` puts a hard-concrete gate on every output channel of the first conv of each
    block, as in the TSCNC authors' code (then ``apply`` with ``train=True`` needs a ``"gates"``
    RNG).
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    gated: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
        n = (self.depth - 4) // 6
        x = Conv(16, use_bias=False, dtype=self.dtype, impl=self.conv_impl)(x)
        for stage, width in enumerate((16, 32, 64)):
            for block in range(n):
                strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
                x = PreActBlock(width * self.widen_factor, strides, gated=self.gated,
                                dropout_rate=self.dropout_rate, dtype=self.dtype,
                                conv_impl=self.conv_impl,
                                bn_axis_name=self.bn_axis_name)(x, train=train)
        x = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


_MODELS = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "lenet5": LeNet5,
    "vgg": VGG,
    "preact_resnet18": PreActResNet18,
    "wide_resnet": WideResNet,
}


def conv_input_shapes(model: nn.Module, variables: Any,
                      input_shape: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Where each convolution of ``model`` runs: ``{kernel path: {"input", "strides",
    "padding"}}``.

    ``input`` is the layer input's ``(height, width, channels)`` for one ``input_shape`` image
    (without batch axis), found by tracing ``model.apply`` on zeros (shapes only, nothing is
    computed); ``strides`` and ``padding`` are the layer's. The operator-level spectra of
    :func:`tscnc_jax.spectral.conv_operator_singular_values` need the input's grid. Paths are
    those of ``variables["params"]`` (``"Conv_1/kernel"``). Covers :class:`Conv` and
    ``flax.linen.Conv`` layers.
    """
    found: dict[str, dict[str, Any]] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (Conv, nn.Conv)) and args:
            path = "/".join((*module.path, "kernel"))
            strides = module.strides if module.strides is not None else (1, 1)
            strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
            found[path] = {"input": tuple(int(d) for d in args[0].shape[1:]),
                           "strides": strides, "padding": module.padding}
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, xb: model.apply(v, xb, train=False), variables, x)
    return found


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a model by name (``mlp``, ``small_cnn``, ``lenet5``, ``vgg``, ``preact_resnet18``,
    ``wide_resnet``, and the PyTorch-compatible ``resnet18`` and ``vgg16_bn`` of
    :mod:`tscnc_jax.torch_models`) with its keyword arguments; unknown names or arguments raise
    ``ValueError``."""
    from tscnc_jax import torch_models  # it builds on this module's layers

    registry = {**_MODELS, **torch_models.ARCHS}
    if name not in registry:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(registry)}.")
    cls = registry[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"Unknown argument(s) {sorted(unknown)} for model {name!r}; "
                         f"accepted: {sorted(fields)}.")
    if "conv_impl" in kwargs:
        check_conv_impl(kwargs["conv_impl"])
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = _dtype(kwargs["dtype"])
    return cls(**kwargs)


#: Compute dtypes a model accepts by name (parameters stay float32 either way).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]
