"""Flax models that are, layer for layer, the PyTorch networks of the robust-pruning benchmarks.

Our :class:`~tscnc_jax.models.PreActResNet18` is pre-activation and our
:class:`~tscnc_jax.models.VGG` has a single Dense head, so their weights fit none of the
PyTorch definitions the field evaluates on. The two models here compute the same function as

* :class:`ResNet18`: the CIFAR ResNet-18 of kuangliu's ``pytorch-cifar`` (``models/resnet.py``),
  which is the Adversarial Pruning Benchmark's base ResNet-18 (Piras et al. 2024, arXiv
  2409.01249; ``pralab/AdversarialPruningBenchmark``, ``models/base_resnet18.py``), HYDRA's
  ``resnet18`` (Sehwag et al. 2020; the benchmark's ``models/hydra.py``) and RobustBench's
  ``ResNet18`` (``robustbench/model_zoo/architectures/resnet.py``);
* :class:`VGG16BN`: HYDRA's ``vgg16_bn`` for CIFAR, the benchmark's base VGG-16
  (``models/base_vgg16.py``, ``models/hydra.py``).

and name their parameters so that :mod:`tscnc_jax.export` maps them 1:1 onto those modules'
``state_dict`` (``load_state_dict(strict=True)``). Facts taken from those definitions:

* every convolution is bias-free, 3x3 with ``padding=1`` (1x1 with ``padding=0`` in a ResNet
  shortcut), followed by ``nn.BatchNorm2d`` with PyTorch's defaults ``eps=1e-5``,
  ``momentum=0.1`` (Flax ``momentum=0.9``), affine, tracking running statistics;
* ResNet-18: ``conv1`` 3x3 stride 1 (64) - ``bn1`` - ReLU; ``layer1``..``layer4`` of two
  post-activation ``BasicBlock`` s (64/128/256/512 channels, the first block of layers 2-4 with
  stride 2); a block is ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with
  ``shortcut = Sequential(Conv2d 1x1 stride s, BatchNorm2d)`` when the stride or the width
  changes, else the identity; then ``F.avg_pool2d(out, 4)``, flatten and ``linear``
  (``nn.Linear(512, classes)``);
* VGG-16-BN: ``features`` = the cfg-16 stack ``64 64 M 128 128 M 256 256 256 M 512 512 512 M
  512 512 512`` (no pool after the last block), each number a (conv, BN, ReLU) triple and ``M``
  ``MaxPool2d(2, 2)``, so the Sequential's indices are conv ``3k`` + pools; then
  ``AdaptiveAvgPool2d((2, 2))``, ``torch.flatten(x, 1)`` and ``classifier`` =
  ``Linear(512*4, 256) ReLU Linear(256, 256) ReLU Linear(256, classes)`` (indices 0, 2, 4).

Stride-2 3x3 convolutions pad one pixel on each side, as PyTorch's ``padding=1`` does; Flax's
``"SAME"`` would pad ``(0, 1)`` there and compute a different (shifted) function. Submodules
are named after the PyTorch attribute, with ``_i`` for the ``i``-th entry of a Sequential
(``layer2_0/shortcut_0/kernel`` is ``layer2.0.shortcut.0.weight``; ``features_7`` is
``features.7``). Inputs are NHWC in ``[0, 1]`` with no normalisation layer, as the benchmarks
load them (the Piras benchmark with ``normalization=False``; RobustBench models take ``[0, 1]``
images). The VGG flattens its 2x2 pooled map in NHWC order, not PyTorch's channel-major NCHW
order: :func:`tscnc_jax.export.to_torch_state_dict` permutes the first Linear's columns
accordingly.

As with the other models, pruning masks are applied to the parameters outside the model
(:func:`tscnc_jax.apply_masks`), BatchNorm statistics live in ``batch_stats`` and synchronise
over ``bn_axis_name`` in data-parallel training. One training-time difference remains:
PyTorch updates ``running_var`` with the unbiased batch variance, Flax with the biased one (a
factor ``n / (n - 1)`` on the update, ``n`` = batch x pixels); evaluation is identical.
``width`` (64 in the benchmarks) scales every conv's channels, for fast tests; the
benchmarks load only ``width=64``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tscnc_jax.models import Conv, max_pool_2x2

Array = jax.Array

# The VGG-16 cfg of HYDRA / the Piras benchmark: no max pool after the last three convs.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _batch_norm(train: bool, dtype: Any, axis_name: str | None, name: str) -> nn.BatchNorm:
    # PyTorch's BatchNorm2d defaults: eps 1e-5, momentum 0.1 (running <- 0.9 running + 0.1 batch).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        axis_name=axis_name if train else None, name=name)


def _torch_conv(x: Array, features: int, kernel: int, stride: int, dtype: Any,
                name: str, impl: str = "auto") -> Array:
    """A bias-free ``Conv2d(kernel, stride, padding=kernel // 2)`` in NHWC."""
    pad = kernel // 2
    if stride == 1:
        # Symmetric padding of kernel // 2 is exactly "SAME" at stride 1 (odd kernels).
        padding = "SAME"
    else:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        padding = "VALID"
    return Conv(features, (kernel, kernel), (stride, stride), padding=padding, use_bias=False,
                dtype=dtype, impl=impl, name=name)(x)


def adaptive_avg_pool_2d(x: Array, output_size: tuple[int, int]) -> Array:
    """PyTorch's ``AdaptiveAvgPool2d`` on NHWC: output cell ``i`` of ``n`` averages input rows
    ``floor(i * h / n)`` to ``ceil((i + 1) * h / n)`` (exclusive), the same for columns."""
    h, w = x.shape[1:3]
    oh, ow = output_size
    rows = []
    for i in range(oh):
        r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cols = []
        for j in range(ow):
            c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            cols.append(jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al. 2016, arXiv 1512.03385), PyTorch naming.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a 1x1 conv
    (``shortcut_0``) + BatchNorm (``shortcut_1``) when the stride or the width changes.
    """

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # see tscnc_jax.models.CONV_IMPLS
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        def bn(y, name):
            return _batch_norm(train, self.dtype, self.bn_axis_name, name)(y)

        def conv(y, kernel, stride, name):
            return _torch_conv(y, self.features, kernel, stride, self.dtype, name, self.conv_impl)

        out = nn.relu(bn(conv(x, 3, self.stride, "conv1"), "bn1"))
        out = bn(conv(out, 3, 1, "conv2"), "bn2")
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn(conv(x, 1, self.stride, "shortcut_0"), "shortcut_1")
        return nn.relu(out + x)


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (post-activation), parameter for parameter the PyTorch model of the
    Piras benchmark, HYDRA and RobustBench (see the module docstring); 11,173,962 parameters
    at ``width=64``, 10 classes.

    Parameter paths: ``conv1``, ``bn1``, ``layer{1..4}_{0,1}/{conv1,bn1,conv2,bn2}``,
    ``layer{2,3,4}_0/shortcut_{0,1}``, ``linear``. Needs inputs whose ``layer4`` output is 4x4
    (32x32 or 28x28 images): ``avg_pool2d(out, 4)`` must leave one pixel for ``linear``.
    """

    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # see tscnc_jax.models.CONV_IMPLS
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = _torch_conv(x.astype(self.dtype), self.width, 3, 1, self.dtype, "conv1",
                        self.conv_impl)
        x = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
        for stage, mult in enumerate((1, 2, 4, 8)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * mult, stride, dtype=self.dtype,
                               conv_impl=self.conv_impl, bn_axis_name=self.bn_axis_name,
                               name=f"layer{stage + 1}_{block}")(x, train=train)
        x = nn.avg_pool(x, (4, 4), strides=(4, 4), padding="VALID")  # F.avg_pool2d(out, 4)
        if x.shape[1:3] != (1, 1):
            raise ValueError(
                f"ResNet18 needs a 4x4 map before avg_pool2d(4) (32x32 inputs), which leaves "
                f"1x1 for `linear`; these inputs leave {x.shape[1]}x{x.shape[2]}.")
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="linear")(x)


class VGG16BN(nn.Module):
    """HYDRA's CIFAR VGG-16 with BatchNorm (Sehwag et al. 2020), parameter for parameter the
    PyTorch ``vgg16_bn`` of HYDRA and the Piras benchmark (see the module docstring).

    ``features_{3k}`` are the 13 convs (``features_0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34,
    37, 40``), ``features_{3k+1}`` their BatchNorms; then a 2x2 adaptive average pool, flatten
    (NHWC order here, see :mod:`tscnc_jax.export`) and ``classifier_0`` (4 * 512 -> 256), ReLU,
    ``classifier_2`` (256 -> 256), ReLU, ``classifier_4`` (256 -> classes). ``width`` scales the
    conv channels (``width * {1, 2, 4, 8}``); the hidden layers stay 256 wide.
    """

    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    conv_impl: str = "auto"  # see tscnc_jax.models.CONV_IMPLS
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        x = x.astype(self.dtype)
        index = 0  # position in PyTorch's `features` Sequential
        for item in VGG16_CFG:
            if item == "M":
                x = max_pool_2x2(x, self.conv_impl)  # MaxPool2d(2, 2): floor mode, as max_pool_2x2
                index += 1
                continue
            features = item * self.width // 64
            x = _torch_conv(x, features, 3, 1, self.dtype, f"features_{index}", self.conv_impl)
            x = _batch_norm(train, self.dtype, self.bn_axis_name, f"features_{index + 1}")(x)
            x = nn.relu(x)
            index += 3
        x = adaptive_avg_pool_2d(x, (2, 2))
        x = x.reshape(x.shape[0], -1)  # NHWC order: (h, w, c)
        x = nn.relu(nn.Dense(256, dtype=self.dtype, name="classifier_0")(x))
        x = nn.relu(nn.Dense(256, dtype=self.dtype, name="classifier_2")(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier_4")(x)


ARCHS = {"resnet18": ResNet18, "vgg16_bn": VGG16BN}
"""The architectures :mod:`tscnc_jax.export` converts, by the name it takes as ``arch``."""
