"""PyTorch ``state_dict`` s for the benchmark architectures of :mod:`tscnc_jax.torch_models`.

A robust pruned model is compared where the field compares them: the Adversarial Pruning
Benchmark (Piras et al. 2024, arXiv 2409.01249) loads a ResNet-18 or VGG-16-BN ``state_dict``
into its base PyTorch model with ``load_state_dict(strict=True)``, RobustBench into its
``ResNet18``. :func:`to_torch_state_dict` turns the variables of
:class:`~tscnc_jax.torch_models.ResNet18` / :class:`~tscnc_jax.torch_models.VGG16BN` into exactly
that dictionary; :func:`from_torch_state_dict` reads such a dictionary back (a published PyTorch
checkpoint, to evaluate it with :mod:`tscnc_jax.attacks`). :func:`save_safetensors` /
:func:`load_safetensors` write and read it with the ``safetensors`` package (numpy API, no
PyTorch needed); a PyTorch user loads the file with ``safetensors.torch.load_file``.

Layouts: a conv kernel ``(kh, kw, in, out)`` (HWIO) becomes ``weight`` ``(out, in, kh, kw)``
(OIHW); a Dense kernel ``(in, out)`` becomes a Linear ``weight`` ``(out, in)``; BatchNorm
``scale``/``bias``/``mean``/``var`` become ``weight``/``bias``/``running_mean``/``running_var``,
plus a ``num_batches_tracked`` int64 scalar (Flax does not count batches; PyTorch reads it only
when ``momentum=None``). Names: Flax submodule ``name_i`` is PyTorch's Sequential entry
``name.i`` (``layer1_0/shortcut_1/mean`` is ``layer1.0.shortcut.1.running_mean``).

The VGG flattens its ``(2, 2, C)`` pooled map in NHWC order, feature ``(h * 2 + w) * C + c``;
PyTorch flattens NCHW, feature ``c * 4 + h * 2 + w``. ``classifier.0.weight`` is therefore the
Dense kernel with its rows permuted from ``(h, w, c)`` to ``(c, h, w)`` order, so that both
models compute the same function (tested against a NumPy forward pass with PyTorch semantics).

Pruning masks are not part of the variables: pass the masked parameters (a
:class:`~tscnc_jax.training.TrainState`'s ``params`` already are), or ``masks=``.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tscnc_jax import tree_utils
from tscnc_jax.torch_models import ARCHS

PyTree = Any
StateDict = dict[str, np.ndarray]

# Where each architecture reads its width and number of classes, so that reduced models
# (``width < 64``, tests) and other label sets (CIFAR-100) export too.
_WIDTH_FROM = {"resnet18": ("conv1", "kernel"), "vgg16_bn": ("features_0", "kernel")}
_CLASSES_FROM = {"resnet18": ("linear", "bias"), "vgg16_bn": ("classifier_4", "bias")}
# Dense layers that read a flattened spatial map, with the map's (height, width).
_FLATTENED_INPUT = {"vgg16_bn": {("classifier_0",): (2, 2)}}
_MAX_LISTED = 12


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {sorted(ARCHS)}.")


def _flatten(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    if not isinstance(variables, Mapping):
        raise TypeError(f"`variables` must be a mapping like {{'params': ..., 'batch_stats': "
                        f"...}}, got {type(variables).__name__}.")
    return traverse_util.flatten_dict(dict(variables))


def _infer_model_kwargs(arch: str, flat: Mapping[tuple[str, ...], Any]) -> dict[str, int]:
    kwargs = {}
    width = flat.get(("params", *_WIDTH_FROM[arch]))
    if width is not None and np.ndim(width) == 4:
        kwargs["width"] = int(np.shape(width)[-1])
    classes = flat.get(("params", *_CLASSES_FROM[arch]))
    if classes is not None and np.ndim(classes) == 1:
        kwargs["num_classes"] = int(np.shape(classes)[0])
    return kwargs


@functools.lru_cache(maxsize=16)
def _reference(arch: str, model_kwargs: tuple[tuple[str, int], ...]
               ) -> tuple[dict[str, tuple[int, ...]], tuple[tuple[str, ...], ...]]:
    """``arch``'s variable shapes ``{"params/conv1/kernel": shape}`` on 32x32x3 inputs, and its
    modules' paths in call order (the PyTorch modules' registration order), from
    ``jax.eval_shape`` (nothing is computed)."""
    model = ARCHS[arch](**dict(model_kwargs))
    order: dict[tuple[str, ...], None] = {}

    def record(next_fun, args, kwargs, context):
        order.setdefault(tuple(context.module.path), None)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    shapes = {"/".join(path): tuple(leaf.shape)
              for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}
    return shapes, tuple(order)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _mismatch_error(what: str, got: Mapping[str, tuple], expected: Mapping[str, tuple],
                    optional: frozenset[str] = frozenset()) -> ValueError | None:
    def params_first(keys):  # the parameters tell more than their BatchNorm statistics
        return sorted(keys, key=lambda k: not k.startswith("params/"))

    missing = [f"{k} {expected[k]}" for k in params_first(expected)
               if k not in got and k not in optional]
    extra = [f"{k} {got[k]}" for k in params_first(got) if k not in expected]
    wrong = [f"{k}: got {got[k]}, expected {expected[k]}" for k in params_first(expected)
             if k in got and tuple(got[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return None
    parts = [f"{name} ({len(items)}): {_listing(items)}"
             for name, items in (("missing", missing), ("unexpected", extra),
                                 ("wrong shape", wrong)) if items]
    return ValueError(f"{what}; " + "; ".join(parts) + ".")


def _check_variables(arch: str, flat: Mapping[tuple[str, ...], Any]
                     ) -> tuple[tuple[str, ...], ...]:
    """Raises unless ``flat`` has exactly ``arch``'s paths and shapes; returns its module order."""
    kwargs = _infer_model_kwargs(arch, flat)
    expected, module_order = _reference(arch, tuple(sorted(kwargs.items())))
    got = {"/".join(path): tuple(np.shape(leaf)) for path, leaf in flat.items()}
    desc = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    error = _mismatch_error(f"`variables` do not match arch {arch!r} ({desc or 'defaults'})",
                            got, expected)
    if error is not None:
        raise error
    return module_order


def _torch_module(path: tuple[str, ...]) -> str:
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def _flatten_permutation(shape: tuple[int, ...], map_hw: tuple[int, int]) -> np.ndarray:
    """Row order taking a Dense kernel from NHWC-flattened inputs to NCHW-flattened ones."""
    (h, w), fan_in = map_hw, shape[0]
    if fan_in % (h * w):
        raise ValueError(f"A Dense kernel of shape {shape} cannot read a flattened {h}x{w} map.")
    channels = fan_in // (h * w)
    # NCHW position c * h * w + i * w + j holds NHWC feature (i * w + j) * channels + c.
    return np.arange(fan_in).reshape(h, w, channels).transpose(2, 0, 1).reshape(-1)


class _Entry:
    """One Flax leaf and its PyTorch tensor: name and the two layout conversions."""

    def __init__(self, flax_path: tuple[str, ...], torch_key: str,
                 to_torch: Callable[[np.ndarray], np.ndarray],
                 from_torch: Callable[[np.ndarray], np.ndarray]):
        self.flax_path, self.torch_key = flax_path, torch_key
        self.to_torch, self.from_torch = to_torch, from_torch


def _entries(arch: str, flat: Mapping[tuple[str, ...], Any]) -> list[_Entry]:
    flattened_inputs = _FLATTENED_INPUT.get(arch, {})
    entries = []
    for path, leaf in flat.items():
        collection, module, leaf_name = path[0], path[1:-1], path[-1]
        prefix = _torch_module(module)
        ndim = np.ndim(leaf)
        if collection == "params" and leaf_name == "kernel" and ndim == 4:  # HWIO <-> OIHW
            entry = _Entry(path, f"{prefix}.weight", lambda k: k.transpose(3, 2, 0, 1),
                           lambda t: t.transpose(2, 3, 1, 0))
        elif collection == "params" and leaf_name == "kernel" and ndim == 2:  # (in, out)
            if module in flattened_inputs:
                perm = _flatten_permutation(np.shape(leaf), flattened_inputs[module])
                inverse = np.argsort(perm)
                entry = _Entry(path, f"{prefix}.weight",
                               lambda k, p=perm: k[p].T, lambda t, q=inverse: t.T[q])
            else:
                entry = _Entry(path, f"{prefix}.weight", lambda k: k.T, lambda t: t.T)
        else:
            torch_name = {("params", "bias"): "bias", ("params", "scale"): "weight",
                          ("batch_stats", "mean"): "running_mean",
                          ("batch_stats", "var"): "running_var"}.get((collection, leaf_name))
            if torch_name is None:  # _check_variables rules this out for the known archs
                raise ValueError(f"No PyTorch counterpart for {'/'.join(path)!r}.")
            entry = _Entry(path, f"{prefix}.{torch_name}", lambda a: a, lambda a: a)
        entries.append(entry)
    return entries


def _batch_norm_modules(flat: Mapping[tuple[str, ...], Any]) -> list[str]:
    return [_torch_module(path[1:-1]) for path in flat
            if path[0] == "batch_stats" and path[-1] == "mean"]


def _order(keys: list[str], module_order: tuple[tuple[str, ...], ...]) -> list[str]:
    # PyTorch's state_dict order: modules as registered, then weight, bias, running_mean,
    # running_var, num_batches_tracked within a module. load_state_dict does not depend on it
    # (nor does a safetensors file keep it); people reading the keys do.
    rank = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}
    position = {_torch_module(path): i for i, path in enumerate(module_order)}

    def sort_key(key):
        module, name = key.rsplit(".", 1)
        return position[module], rank[name]

    return sorted(keys, key=sort_key)


def to_torch_state_dict(variables: Mapping[str, Any], arch: str, *,
                        masks: PyTree | None = None,
                        num_batches_tracked: int = 0) -> StateDict:
    """The PyTorch ``state_dict`` of ``arch`` holding ``variables``, as float32 NumPy arrays.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a
        :class:`~tscnc_jax.torch_models.ResNet18` (``arch="resnet18"``) or
        :class:`~tscnc_jax.torch_models.VGG16BN` (``arch="vgg16_bn"``); any ``num_classes`` and
        ``width`` (read from the variables; the benchmarks load ``width=64``).
      arch: ``"resnet18"`` or ``"vgg16_bn"``.
      masks: optional pruning masks with the structure of ``variables["params"]`` (``None``
        leaves unpruned), multiplied in before export.
      num_batches_tracked: the value of every BatchNorm's ``num_batches_tracked`` (int64).

    Returns:
      ``{torch name: array}`` in the reference module's ``state_dict`` order: ``conv1.weight``
      ``(64, 3, 3, 3)``, ``bn1.weight``, ..., ``bn1.num_batches_tracked`` ``()`` int64,
      ``layer2.0.shortcut.0.weight``, ..., ``linear.weight`` ``(classes, 512)``, ``linear.bias``.

    Raises:
      ValueError: unknown ``arch``, or ``variables`` that are not that architecture's (the
        message lists the missing and unexpected paths and the wrong shapes).
    """
    _check_arch(arch)
    variables = dict(variables)
    if masks is not None and "params" in variables:
        variables["params"] = tree_utils.apply_masks(variables["params"], masks)
    flat = _flatten(variables)
    module_order = _check_variables(arch, flat)
    state = {}
    for entry in _entries(arch, flat):
        value = np.asarray(jax.device_get(flat[entry.flax_path]), dtype=np.float32)
        state[entry.torch_key] = np.require(entry.to_torch(value), requirements="C")
    for module in _batch_norm_modules(flat):
        state[f"{module}.num_batches_tracked"] = np.asarray(num_batches_tracked, dtype=np.int64)
    return {key: state[key] for key in _order(list(state), module_order)}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_torch_state_dict(state_dict: Mapping[str, Any], arch: str,
                          template_variables: Mapping[str, Any]) -> dict[str, PyTree]:
    """Variables for ``arch`` read from a PyTorch ``state_dict`` (the inverse of
    :func:`to_torch_state_dict`).

    Args:
      state_dict: ``{name: array or torch.Tensor}`` of the reference PyTorch module; a
        ``module.`` prefix on every key (``nn.DataParallel`` checkpoints) is removed.
        ``num_batches_tracked`` entries may be absent (old checkpoints); their values are
        ignored.
      arch: ``"resnet18"`` or ``"vgg16_bn"``.
      template_variables: variables of the Flax model to fill (``model.init(...)`` or
        ``jax.eval_shape`` of it): they fix the tree, the shapes and the dtypes.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` with the template's structure and dtypes.

    Raises:
      ValueError: unknown ``arch``, a template that is not that architecture's, or a
        ``state_dict`` whose keys or shapes differ from the template's PyTorch counterpart
        (the message names the missing and unexpected keys and the wrong shapes).
    """
    _check_arch(arch)
    template = _flatten(template_variables)
    _check_variables(arch, template)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    entries = _entries(arch, template)
    expected = {}
    for entry in entries:
        shape = np.shape(template[entry.flax_path])
        expected[entry.torch_key] = entry.to_torch(np.empty(shape, np.float32)).shape
    tracked = {f"{module}.num_batches_tracked" for module in _batch_norm_modules(template)}
    expected.update(dict.fromkeys(tracked, ()))
    got = {key: tuple(np.shape(_to_numpy(value))) for key, value in state_dict.items()}
    error = _mismatch_error(f"`state_dict` does not match arch {arch!r} and the template",
                            got, expected, optional=frozenset(tracked))
    if error is not None:
        raise error
    flat = {}
    for entry in entries:
        leaf = template[entry.flax_path]
        value = entry.from_torch(_to_numpy(state_dict[entry.torch_key]))
        flat[entry.flax_path] = jnp.asarray(value, dtype=leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def save_safetensors(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``state_dict`` to ``path`` in the safetensors format, atomically.

    The bytes go to a temporary file in the same directory, which is synced and renamed over
    ``path``: a reader never sees a half-written file, and an interrupted save leaves any
    previous file intact. ``metadata`` defaults to ``{"format": "pt"}`` (what Hugging Face
    readers expect of a PyTorch checkpoint). Needs the ``safetensors`` package.
    """
    from safetensors.numpy import save  # optional dependency, needed only here

    # np.ascontiguousarray would turn the 0-d num_batches_tracked into shape (1,).
    tensors = {key: np.require(value, requirements="C") for key, value in state_dict.items()}
    data = save(tensors, metadata=dict(metadata if metadata is not None else {"format": "pt"}))
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the mode open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """Reads a safetensors file as ``{name: np.ndarray}`` (needs the ``safetensors`` package)."""
    from safetensors.numpy import load_file

    return dict(load_file(os.fspath(path)))
