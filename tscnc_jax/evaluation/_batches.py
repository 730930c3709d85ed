"""The data of an evaluation and its batches: the data set collected into host arrays and checked
against the bounds and the model's classes; chunk sizes (buckets: powers of two from
:data:`MIN_BUCKET`, so that few distinct shapes compile), chunks and their padding; the
placement of a chunk on a mesh's devices; a prediction pass over a whole array in chunks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax.evaluation._compile import _Jits

# Smallest chunk an attack runs on when compacting (smaller chunks are padded up to it).
MIN_BUCKET = 8


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket_sizes(batch_size: int, multiple: int = 1) -> list[int]:
    """Chunk sizes used when compacting: ``batch_size`` and the powers of two in
    ``[MIN_BUCKET, batch_size)``, each rounded up to a multiple of ``multiple`` (the devices
    that share a chunk; ``batch_size`` must be one)."""
    sizes = {batch_size}
    s = MIN_BUCKET
    while s < batch_size:
        sizes.add(min(_round_up(s, multiple), batch_size))
        s *= 2
    return sorted(sizes)


def _bucket(n: int, batch_size: int, compact: bool, multiple: int = 1) -> int:
    """The chunk size for ``n <= batch_size`` examples."""
    if not compact:
        return batch_size
    return min(s for s in _bucket_sizes(batch_size, multiple) if s >= min(n, batch_size))


def _smaller_bucket(size: int, batch_size: int, multiple: int = 1) -> int:
    """The largest chunk size below ``size`` (0 if none)."""
    return max((s for s in _bucket_sizes(batch_size, multiple) if s < size), default=0)


class _Placement(NamedTuple):
    """Where the driver puts each chunk it passes to a jitted function: on the default device
    (``sharding=None``), or split along the batch axis over the devices of a mesh (``multiple``:
    their number; every chunk is a multiple of it)."""

    sharding: jax.sharding.NamedSharding | None = None
    multiple: int = 1

    def put(self, x) -> jax.Array:
        return jnp.asarray(x) if self.sharding is None else jax.device_put(x, self.sharding)


def _placement(mesh: jax.sharding.Mesh | None) -> _Placement:
    """The placement of a chunk on ``mesh`` (its batch axis over every axis of the mesh)."""
    if mesh is None:
        return _Placement()
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
    foreign = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(
            f"mesh has {len(foreign)} device(s) of other processes (e.g. {foreign[0]}); the "
            "evaluation runs on this process's data, over its own devices: pass "
            "tscnc_jax.parallel.local_mesh().")
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return _Placement(jax.sharding.NamedSharding(mesh, spec), int(mesh.devices.size))


_NO_MESH = _Placement()  # the default device


def _collect(dataset_batches: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    xs, ys = [], []
    for i, batch in enumerate(dataset_batches):
        if isinstance(batch, Mapping):
            xb = batch["image"] if "image" in batch else batch["x"]
            yb = batch["label"] if "label" in batch else batch["y"]
        elif isinstance(batch, Sequence) and len(batch) == 2:
            xb, yb = batch
        else:
            raise ValueError(
                f"batch {i}: expected (x, y) or a dict with 'image'/'label'; got {type(batch)}."
            )
        xb, yb = np.asarray(xb), np.asarray(yb)
        if xb.ndim < 2 or yb.shape != (xb.shape[0],):
            raise ValueError(f"batch {i}: x has shape {xb.shape} and y {yb.shape}.")
        if xs and xb.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"batch {i}: example shape {xb.shape[1:]} != {xs[0].shape[1:]}.")
        xs.append(xb)
        ys.append(yb)
    if not xs or sum(len(y) for y in ys) == 0:
        raise ValueError("`dataset_batches` yielded no examples.")
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"inputs must be floating point; got dtype {x.dtype}.")
    # The dtype JAX computes in (float64 inputs become float32 unless x64 is enabled), so that
    # the attacks' outputs and the clean inputs are compared in the same dtype.
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {y.dtype}.")
    return x, y.astype(np.int32), max(len(b) for b in xs)


def _chunks(idx: np.ndarray, batch_size: int, compact: bool = False, multiple: int = 1):
    """Yields ``(padded_indices, n_valid)``: chunks of ``batch_size``, the last one padded (by
    repeating its first index) to ``batch_size``, or with ``compact`` to the smallest bucket that
    holds it (:func:`_bucket_sizes`)."""
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        n = len(part)
        size = _bucket(n, batch_size, compact, multiple)
        if n < size:
            part = np.concatenate([part, np.full(size - n, part[0], part.dtype)])
        yield part, n


def _pad_labels(y: np.ndarray, n_valid: int, n_classes: int) -> np.ndarray:
    """Labels of a padded chunk whose padding rows repeat a clean-correct example: the padding
    gets a wrong label, so that every attack sees it as broken from the start (it never holds
    back an early exit and Square never queries it); the valid rows are untouched."""
    y = y.copy()
    y[n_valid:] = (y[n_valid:] + 1) % n_classes
    return y


def _check_data(jits: _Jits, x_all, y_all, batch_size, bounds) -> int:
    """Checks the inputs against ``bounds`` and the labels against the logits; returns the
    number of classes."""
    lo, hi = bounds
    if not np.all(np.isfinite(x_all)):
        raise ValueError("inputs contain NaN or inf.")
    if x_all.min() < lo or x_all.max() > hi:
        raise ValueError(
            f"inputs must lie inside bounds [{lo}, {hi}]; got values in "
            f"[{x_all.min()}, {x_all.max()}]. Pass matching `bounds=`."
        )
    model_key = () if jits.draws is None else (jax.random.key(0),)
    out = jits.logits().eval_shape(
        jits.model.arrays, jax.ShapeDtypeStruct((batch_size,) + x_all.shape[1:], x_all.dtype),
        *model_key,
    )
    if len(out.shape) != 2 or out.shape[0] != batch_size:
        raise ValueError(f"`logits_fn` must return logits of shape (B, K); got {out.shape}.")
    n_classes = int(out.shape[1])
    if y_all.min() < 0 or y_all.max() >= n_classes:
        raise ValueError(
            f"labels must be in [0, {n_classes}); got values in [{y_all.min()}, {y_all.max()}]."
        )
    return n_classes


def _predict_all(predict, x_np: np.ndarray, batch_size: int, y_np: np.ndarray | None = None,
                 key: jax.Array | None = None, place: _Placement = _NO_MESH) -> np.ndarray:
    """The predicted class of every example, in padded batches of ``batch_size``; with a ``key``,
    a stochastic model's ``predict(x, y, key)`` (chunk ``j``: ``fold_in(key, j)``)."""
    pred = np.empty(len(x_np), np.int32)
    for j, (part, m) in enumerate(_chunks(np.arange(len(x_np)), batch_size)):
        if key is None:
            out = predict(place.put(x_np[part]))
        else:
            out = predict(place.put(x_np[part]), place.put(y_np[part]),
                          jax.random.fold_in(key, j))
        pred[part[:m]] = np.asarray(out)[:m]
    return pred
