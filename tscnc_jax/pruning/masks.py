"""Mask makers (magnitude, random, channel; layer-wise and global), mask helpers and the sparsity
summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax.pruning.schedules import check_sparsity
from tscnc_jax.pruning.topk import key_dtypes, num_to_prune, order_keys, top_k_each, top_k_groups
from tscnc_jax.tree_utils import FilterFn, PyTree, is_kernel, path_to_str

Array = jax.Array

class MaskFn(Protocol):
    """A mask maker as :func:`sparsify` calls it."""

    def __call__(self, params: PyTree, sparsity: Any, *, masks: PyTree | None = None) -> PyTree: ...


def is_none(x: Any) -> bool:
    return x is None




# ----------------------------------------------------------------------------------------------
# Tree plumbing.
# ----------------------------------------------------------------------------------------------


def flatten_with_masks(tree: PyTree, masks: PyTree | None, name: str = "masks"):
    """``(paths, leaves, mask_leaves, treedef)`` of ``tree``; ``None`` leaves of ``tree`` kept.

    Validates that ``masks`` has the structure and shapes of ``tree`` (``None`` allowed).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    if masks is None:
        return paths, leaves, [None] * len(leaves), treedef
    m_leaves, m_def = jax.tree_util.tree_flatten(masks, is_leaf=is_none)
    if m_def != treedef:
        raise ValueError(
            f"`{name}` must have the tree structure of the parameters (None for unpruned leaves); "
            f"got {m_def} for {treedef}."
        )
    for path, leaf, m in zip(paths, leaves, m_leaves, strict=True):
        if m is not None and leaf is not None and tuple(jnp.shape(m)) != tuple(jnp.shape(leaf)):
            raise ValueError(
                f"`{name}` leaf {path!r} has shape {tuple(jnp.shape(m))}, "
                f"but the parameter has shape {tuple(jnp.shape(leaf))}."
            )
    return paths, leaves, m_leaves, treedef


def selected_leaves(tree: PyTree, masks: PyTree | None, filter_fn: FilterFn | None):
    """Indices, leaves and previous masks of the leaves selected by ``filter_fn``."""
    filter_fn = is_kernel if filter_fn is None else filter_fn
    paths, leaves, m_leaves, treedef = flatten_with_masks(tree, masks)
    idx = [i for i, (p, x) in enumerate(zip(paths, leaves, strict=True))
           if x is not None and filter_fn(p, x)]
    return idx, leaves, m_leaves, treedef


def assemble(treedef, n_leaves: int, idx: Sequence[int], new: Sequence[Array]) -> PyTree:
    out: list[Any] = [None] * n_leaves
    for i, m in zip(idx, new, strict=True):
        out[i] = m
    return jax.tree_util.tree_unflatten(treedef, out)


def keys_with_history(scores: Array, prev: Array | None, fdt: Any, udt: Any) -> Array:
    keys = order_keys(scores, fdt, udt)
    if prev is None:
        return keys
    return jnp.where(jnp.ravel(prev).astype(bool), keys, jnp.zeros_like(keys))


def check_min_kept(min_kept_per_layer: int) -> None:
    if isinstance(min_kept_per_layer, bool) or not isinstance(min_kept_per_layer, int):
        raise ValueError(f"`min_kept_per_layer` must be an int, got {min_kept_per_layer!r}.")
    if min_kept_per_layer < 0:
        raise ValueError(f"`min_kept_per_layer` must be >= 0, got {min_kept_per_layer}.")


def global_top_k(keys: list[Array], sizes: list[int], sparsity: Any, min_kept: int) -> list:
    """Joint top-k over ``keys`` with ``num_to_prune(sum(sizes), sparsity)`` removed."""
    total = sum(sizes)
    k = total - num_to_prune(total, sparsity)
    if min_kept:
        floor_kept = sum(min(min_kept, n) for n in sizes)
        if isinstance(k, int) and k < floor_kept:
            raise ValueError(
                f"sparsity {float(sparsity)!r} keeps {k} of {total} entries, fewer than "
                f"min_kept_per_layer={min_kept} in each of {len(sizes)} layers ({floor_kept})."
            )
        k = jnp.maximum(k, floor_kept) if not isinstance(k, int) else k
        top = jnp.asarray(jnp.iinfo(keys[0].dtype).max, keys[0].dtype)
        protected = top_k_each(keys, [min(min_kept, n) for n in sizes])
        keys = [jnp.where(p, top, kk) for p, kk in zip(protected, keys, strict=True)]
    return top_k_groups([keys], [k])[0]


def keep_top(treedef, leaves: list, idx: Sequence[int], keys: list[Array], sizes: list[int],
             sparsity: Any, *, min_kept: int | None = None, channels: bool = False) -> PyTree:
    """Masks tree keeping, of the selected leaves ``leaves[i]`` (``i`` in ``idx``), the entries
    with the largest ``keys`` (``sizes`` of them per leaf): ``num_to_prune(size, sparsity)``
    removed in each leaf (``min_kept=None``) or in one ranking across the leaves
    (:func:`global_top_k` with ``min_kept``). ``channels``: a key ranks a leaf's output channel
    (last axis), whose mask is broadcast over its filter."""
    if min_kept is None:
        kept = top_k_each(keys, [n - num_to_prune(n, sparsity) for n in sizes])
    else:
        kept = global_top_k(keys, sizes, sparsity, min_kept)
    shape = jnp.broadcast_to if channels else jnp.reshape
    new = [shape(m, leaves[i].shape) for i, m in zip(idx, kept, strict=True)]
    return assemble(treedef, len(leaves), idx, new)


def _channel_keys(x: Array, prev: Array | None, fdt: Any, udt: Any) -> Array:
    """Order keys of the output channels (last axis) by the L2 norm of their filters."""
    if x.ndim < 2:
        raise ValueError(f"channel pruning needs kernels with ndim >= 2, got shape {x.shape}.")
    axes = tuple(range(x.ndim - 1))
    norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(fdt)), axis=axes))
    alive = None if prev is None else jnp.any(jnp.asarray(prev, bool), axis=axes)
    return keys_with_history(norms, alive, fdt, udt)


def _norm_masks(params: PyTree, sparsity: Any, masks: PyTree | None,
                filter_fn: FilterFn | None, *, channels: bool, min_kept: int | None) -> PyTree:
    """The magnitude and channel mask makers: entries ranked by ``|w|`` (``channels``: output
    channels by filter L2 norm, :func:`_channel_keys`), per leaf (``min_kept=None``) or
    globally."""
    check_sparsity(sparsity)
    if min_kept is not None:
        check_min_kept(min_kept)
    idx, leaves, prev, treedef = selected_leaves(params, masks, filter_fn)
    if min_kept is not None and not idx:
        return assemble(treedef, len(leaves), idx, [])
    fdt, udt = key_dtypes([leaves[i] for i in idx])
    if channels:
        keys = [_channel_keys(leaves[i], prev[i], fdt, udt) for i in idx]
        sizes = [leaves[i].shape[-1] for i in idx]
    else:
        keys = [keys_with_history(jnp.abs(leaves[i]), prev[i], fdt, udt) for i in idx]
        sizes = [leaves[i].size for i in idx]
    return keep_top(treedef, leaves, idx, keys, sizes, sparsity, min_kept=min_kept,
                    channels=channels)


# ----------------------------------------------------------------------------------------------
# Mask makers.
# ----------------------------------------------------------------------------------------------


def layerwise_magnitude_masks(
    params: PyTree,
    sparsity: Any,
    *,
    masks: PyTree | None = None,
    filter_fn: FilterFn | None = None,
) -> PyTree:
    """Layer-wise magnitude pruning (LWM): in every selected leaf keep the largest ``|w|``.

    Each leaf of ``n`` weights loses exactly :func:`num_to_prune` ``(n, sparsity)``.

    Args:
      params: parameter tree.
      sparsity: fraction removed in ``[0, 1)``; may be traced.
      masks: previous masks; their pruned entries rank below every surviving one.
      filter_fn: selects the prunable leaves; default :func:`tscnc_jax.is_kernel`.

    Returns:
      Masks tree (``bool`` leaves, ``None`` for unselected leaves).
    """
    return _norm_masks(params, sparsity, masks, filter_fn, channels=False, min_kept=None)


def global_magnitude_masks(
    params: PyTree,
    sparsity: Any,
    *,
    masks: PyTree | None = None,
    filter_fn: FilterFn | None = None,
    min_kept_per_layer: int = 0,
) -> PyTree:
    """Global magnitude pruning: one ranking of ``|w|`` across all selected leaves.

    Exactly :func:`num_to_prune` ``(N, sparsity)`` of the ``N`` selected weights are removed (one
    threshold; ties broken by leaf order, then position). With ``min_kept_per_layer = m > 0`` the
    ``m`` largest weights of each leaf are always kept (so no layer dies) and the rest is ranked
    globally; the total count stays exact (``ValueError`` if the minima exceed it).

    Args:
      params, sparsity, masks, filter_fn: as in :func:`layerwise_magnitude_masks`.
      min_kept_per_layer: minimum kept per leaf (default 0: plain global ranking).

    Returns:
      Masks tree.
    """
    return _norm_masks(params, sparsity, masks, filter_fn, channels=False,
                       min_kept=min_kept_per_layer)


def random_masks(
    params: PyTree,
    sparsity: Any,
    *,
    key: Array,
    masks: PyTree | None = None,
    filter_fn: FilterFn | None = None,
) -> PyTree:
    """Random pruning with an exact count per leaf (the baseline of the pruning literature).

    Leaf number ``i`` (flattening order) is ranked by ``uniform(fold_in(key, i))``. The same key
    gives nested masks for increasing sparsity, so it can be used with gradual schedules.

    Args:
      params, sparsity, masks, filter_fn: as in :func:`layerwise_magnitude_masks`.
      key: a :func:`jax.random.key`.

    Returns:
      Masks tree.
    """
    check_sparsity(sparsity)
    idx, leaves, prev, treedef = selected_leaves(params, masks, filter_fn)
    keys = [
        keys_with_history(
            jax.random.uniform(jax.random.fold_in(key, i), leaves[i].shape, jnp.float32),
            prev[i], jnp.float32, jnp.uint32,
        )
        for i in idx
    ]
    return keep_top(treedef, leaves, idx, keys, [leaves[i].size for i in idx], sparsity)


def layerwise_channel_masks(
    params: PyTree,
    sparsity: Any,
    *,
    masks: PyTree | None = None,
    filter_fn: FilterFn | None = None,
) -> PyTree:
    """Structured pruning of whole output channels, the same fraction in every selected leaf.

    The output channel is the last axis (flax ``Dense`` ``(in, out)`` and ``Conv``
    ``(kh, kw, cin, cout)`` kernels); channel ``c`` is ranked by ``||W[..., c]||_2`` and a leaf with
    ``C`` channels loses exactly :func:`num_to_prune` ``(C, sparsity)`` of them. A pruned channel's
    mask is ``False`` on its whole filter and nowhere else. Pruning the matching bias or
    normalisation entries is left to the model (they are 1-D and not selected by default).

    Args:
      params, sparsity, masks, filter_fn: as in :func:`layerwise_magnitude_masks`.

    Returns:
      Masks tree.
    """
    return _norm_masks(params, sparsity, masks, filter_fn, channels=True, min_kept=None)


def global_channel_masks(
    params: PyTree,
    sparsity: Any,
    *,
    masks: PyTree | None = None,
    filter_fn: FilterFn | None = None,
    min_kept_per_layer: int = 0,
) -> PyTree:
    """Structured pruning of output channels ranked by filter L2 norm across all selected leaves.

    ``sparsity`` is the fraction of *channels* removed over all selected leaves (exactly
    :func:`num_to_prune` ``(total channels, sparsity)``); the fraction of *weights* removed differs
    when layers have different fan-in (measure it with :func:`summarize_sparsity`). Raw norms are
    compared: under He/LeCun initialisation a filter's norm does not depend on its fan-in.
    ``min_kept_per_layer`` counts channels.

    Args:
      params, sparsity, masks, filter_fn, min_kept_per_layer: as in
        :func:`global_magnitude_masks`.

    Returns:
      Masks tree.
    """
    return _norm_masks(params, sparsity, masks, filter_fn, channels=True,
                       min_kept=min_kept_per_layer)


# ----------------------------------------------------------------------------------------------
# Mask helpers and measurement.
# ----------------------------------------------------------------------------------------------


def intersect_masks(*trees: PyTree | None) -> PyTree:
    """Entry-wise AND of masks trees (``None`` leaf = nothing pruned; ``None`` tree ignored).

    All trees must have the same structure (``None`` leaves allowed anywhere); the result has
    ``bool`` leaves, ``None`` where every input is ``None``.
    """
    trees = [t for t in trees if t is not None]
    if not trees:
        return None
    _, _, _, treedef = flatten_with_masks(trees[0], None)
    columns = []
    for j, t in enumerate(trees):
        leaves, t_def = jax.tree_util.tree_flatten(t, is_leaf=is_none)
        if t_def != treedef:
            raise ValueError(
                f"masks tree {j} has structure {t_def}, expected {treedef} (the first tree's)."
            )
        columns.append(leaves)
    out = []
    for row in zip(*columns, strict=True):
        present = [jnp.asarray(m).astype(bool) for m in row if m is not None]
        if not present:
            out.append(None)
            continue
        acc = present[0]
        for m in present[1:]:
            acc = jnp.logical_and(acc, m)
        out.append(acc)
    return jax.tree_util.tree_unflatten(treedef, out)


def nonzero_masks(params: PyTree, *, filter_fn: FilterFn | None = None) -> PyTree:
    """Masks keeping the non-zero entries of the selected leaves (e.g. of a pruned checkpoint)."""
    idx, leaves, _, treedef = selected_leaves(params, None, filter_fn)
    return assemble(treedef, len(leaves), idx, [leaves[i] != 0 for i in idx])


class LayerSparsity(NamedTuple):
    """Measured sparsity of one leaf."""

    size: int
    num_pruned: int
    sparsity: float


class SparsitySummary(NamedTuple):
    """Per-leaf and total sparsity (host Python values) from :func:`summarize_sparsity`."""

    layers: dict[str, LayerSparsity]
    size: int
    num_pruned: int
    sparsity: float

    def table(self) -> str:
        """A markdown table, one row per leaf and a total row."""
        rows = ["| leaf | size | pruned | sparsity |", "|---|---:|---:|---:|"]
        for name, s in self.layers.items():
            rows.append(f"| {name} | {s.size} | {s.num_pruned} | {s.sparsity:.4%} |")
        rows.append(f"| **total** | {self.size} | {self.num_pruned} | {self.sparsity:.4%} |")
        return "\n".join(rows)


def summarize_sparsity(tree: PyTree, *, filter_fn: FilterFn | None = None) -> SparsitySummary:
    """Measures sparsity: the fraction of zero (``False``) entries per leaf and in total.

    Works on parameters (counts exact zeros) and on masks (counts ``False``). By default it looks
    at ``bool`` leaves and at the leaves selected by :func:`tscnc_jax.is_kernel`; ``None`` leaves
    are skipped. The result holds Python numbers (the arrays are copied to the host).

    Args:
      tree: parameters or masks.
      filter_fn: which leaves to measure (called with the path string and the leaf).

    Returns:
      :class:`SparsitySummary`.
    """
    paths, leaves, _, _ = flatten_with_masks(tree, None)
    layers: dict[str, LayerSparsity] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        if leaf is None:
            continue
        if filter_fn is not None:
            if not filter_fn(path, leaf):
                continue
        elif not (jnp.asarray(leaf).dtype == jnp.bool_ or is_kernel(path, leaf)):
            continue
        arr = np.asarray(jax.device_get(leaf))
        pruned = int(arr.size - np.count_nonzero(arr))
        layers[path] = LayerSparsity(int(arr.size), pruned, pruned / arr.size if arr.size else 0.0)
    size = sum(s.size for s in layers.values())
    pruned = sum(s.num_pruned for s in layers.values())
    return SparsitySummary(layers, size, pruned, pruned / size if size else 0.0)
