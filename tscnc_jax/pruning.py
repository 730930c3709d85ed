r"""Pruning engine: exact-count masks, HYDRA learned scores and an optax wrapper.

Conventions (see also :mod:`tscnc_jax.tree_utils`):

* **Sparsity** is the fraction of weights *removed*: ``0.99`` keeps 1 %. It must satisfy
  ``0 <= sparsity < 1``.
* **Masks** are trees with the structure of ``params``: ``None`` for leaves that are not pruned, a
  ``bool`` array of the leaf's shape (``True`` = kept) otherwise. :func:`apply_masks` (from
  :mod:`tscnc_jax.tree_utils`) multiplies them in, purely.
* **Exact counts.** A group of ``n`` weights pruned to sparsity ``s`` loses exactly
  :func:`num_to_prune` ``(n, s) = min(ceil(s n), n - 1)`` weights: the smallest achievable
  sparsity that is not below ``s`` (``s <= measured < s + 1 / n``), never the whole group.
  The kept entries are the ``k = n - num_to_prune(n, s)`` largest scores, selected by rank (not by
  a threshold), with ties broken by position: among equal scores the entry with the lower
  row-major index is kept. The count is therefore exact even when many magnitudes are equal.
  The rank selection works with a traced ``k`` (a radix select on the scores' bit patterns), so
  schedules whose sparsity depends on the step compile once. A traced sparsity is multiplied in
  float32: the count may then differ by one from the float64 rule when ``s n`` lies within one
  float32 ulp above an integer (only possible for groups of many weights). :func:`sparsify`
  uses the float64 rule for the target itself.

Mask makers (``mask_fn(params, sparsity, *, masks=None) -> masks`` after fixing their keyword
arguments with :func:`functools.partial`):

* :func:`layerwise_magnitude_masks` (LWM): the same sparsity in every prunable leaf.
* :func:`global_magnitude_masks`: one ranking of ``|w|`` across all prunable leaves, optionally
  keeping at least ``min_kept_per_layer`` weights in each leaf.
* :func:`random_masks`: uniform random ranking (per leaf, exact count), from an explicit key.
* :func:`layerwise_channel_masks`, :func:`global_channel_masks`: whole output channels (the last
  axis of a flax kernel), ranked by the L2 norm of their filters.

When ``masks`` (the previous masks) is given, previously pruned entries rank below every surviving
one; with a non-decreasing sparsity the new masks are then nested in the old ones.

HYDRA (Sehwag et al. 2020, arXiv 2002.10509): :func:`init_scores`, :func:`topk_mask_ste`,
:func:`scores_to_masks` and :func:`masked_params_from_scores` train one importance score per
weight with the weights frozen.

The optax wrapper :func:`sparsify` keeps the masks in its state (:class:`PruningState`, with
jaxpruner's field names ``masks``, ``inner_state``, ``target_sparsities``, ``count``), recomputes
them on the schedule's mask-update steps and guarantees that pruned weights stay exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from tscnc_jax.schedules import PruningSchedule, check_sparsity, concrete_float
from tscnc_jax.tree_utils import FilterFn, PyTree, apply_masks, check_masks, is_kernel, path_to_str

Array = jax.Array

__all__ = [
    "LayerSparsity",
    "MaskFn",
    "PruningState",
    "SparsitySummary",
    "apply_masks",
    "global_channel_masks",
    "global_magnitude_masks",
    "init_scores",
    "intersect_masks",
    "layerwise_channel_masks",
    "layerwise_magnitude_masks",
    "masked_params_from_scores",
    "nonzero_masks",
    "num_to_prune",
    "random_masks",
    "scores_to_masks",
    "sparsify",
    "summarize_sparsity",
    "topk_mask",
    "topk_mask_ste",
]


class MaskFn(Protocol):
    """A mask maker as :func:`sparsify` calls it."""

    def __call__(self, params: PyTree, sparsity: Any, *, masks: PyTree | None = None) -> PyTree: ...


def _is_none(x: Any) -> bool:
    return x is None


# ----------------------------------------------------------------------------------------------
# Exact-count selection.
# ----------------------------------------------------------------------------------------------


def num_to_prune(size: int, sparsity: Any) -> int | Array:
    """Number of entries removed from a group of ``size`` at ``sparsity``.

    ``min(ceil(sparsity * size), size - 1)`` (0 for an empty group): the smallest count whose
    measured sparsity is not below the target (so 0.99 of a 288-weight layer prunes 286, 99.31 %),
    keeping at least one entry. A relative tolerance of 1e-9 absorbs float error (``0.29 * 100``
    is ``28.999...`` and prunes 29). Returns a Python ``int`` for a concrete ``sparsity``
    (computed in float64) and an ``int32`` array for a traced one (float32, used mid-schedule).
    """
    check_sparsity(sparsity)
    size = int(size)
    if size <= 0:
        return 0
    value = concrete_float(sparsity, "sparsity")
    if value is not None:
        return min(math.ceil(value * size - 1e-9 * size), size - 1)
    s = jnp.asarray(sparsity, jnp.float32)
    # One float32 ulp of tolerance below the product (0.3f * 10 is 3.0000001 and prunes 3).
    product = jnp.nextafter(s * size, jnp.float32(0))
    return jnp.clip(jnp.ceil(product).astype(jnp.int32), 0, size - 1)


def _key_dtypes(arrays: Sequence[Array]) -> tuple[Any, Any]:
    """(float, unsigned) dtypes of the order keys: 64-bit if any input is float64."""
    if any(jnp.asarray(a).dtype == jnp.float64 for a in arrays):
        return jnp.float64, jnp.uint64
    return jnp.float32, jnp.uint32


def _order_keys(scores: Array, float_dtype: Any, uint_dtype: Any) -> Array:
    """Flattened unsigned keys whose unsigned order is the float order of ``scores``.

    Standard IEEE-754 trick: flip all bits of negative numbers, set the sign bit of the others.
    ``-0.0`` is first mapped to ``+0.0`` so that the two zeros tie. Key 0 is below every number.
    """
    x = jnp.ravel(scores).astype(float_dtype)
    x = jnp.where(x == 0, jnp.zeros_like(x), x)
    bits = lax.bitcast_convert_type(x, uint_dtype)
    nbits = jnp.iinfo(uint_dtype).bits
    sign = jnp.asarray(1, uint_dtype) << jnp.asarray(nbits - 1, uint_dtype)
    return jnp.where((bits & sign) != 0, ~bits, bits | sign)


def _kth_largest_keys(groups: Sequence[Sequence[Array]], ks: Sequence[Any]) -> Array:
    """Per group ``g``, the largest ``t_g`` with ``#{key >= t_g} >= k_g``: a bitwise radix select.

    One pass per bit (32 or 64), each a comparison and a sum per group; all groups share one loop
    (one compiled loop for a whole network). The ``k_g`` may be traced.
    """
    dtype = groups[0][0].dtype
    nbits = jnp.iinfo(dtype).bits
    one = jnp.asarray(1, dtype)
    ks = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks])

    def body(i, prefixes):
        candidates = prefixes | (one << (nbits - 1 - i).astype(dtype))
        counts = jnp.stack([
            sum(jnp.sum(kk >= candidates[g], dtype=jnp.int32) for kk in group)
            for g, group in enumerate(groups)
        ])
        return jnp.where(counts >= ks, candidates, prefixes)

    return lax.fori_loop(0, nbits, body, jnp.zeros((len(groups),), dtype))


def _top_k_groups(groups: Sequence[Sequence[Array]], ks: Sequence[Any]) -> list[list[Array]]:
    """Flat bool masks of the ``k_g`` largest keys jointly over each group's arrays.

    Ties are broken by index, lower first, the index order being the concatenation of the
    group's arrays.
    """
    if not groups:
        return []
    thresholds = _kth_largest_keys(groups, ks)
    out = []
    for g, (group, k) in enumerate(zip(groups, ks, strict=True)):
        t = thresholds[g]
        need = k - sum(jnp.sum(kk > t, dtype=jnp.int32) for kk in group)
        kept = []
        offset = jnp.zeros((), jnp.int32)
        for kk in group:
            tie = kk == t
            tie_rank = offset + jnp.cumsum(tie, dtype=jnp.int32)  # 1-based rank among the ties
            kept.append((kk > t) | (tie & (tie_rank <= need)))
            offset = offset + jnp.sum(tie, dtype=jnp.int32)
        out.append(kept)
    return out


def _top_k_each(keys: Sequence[Array], ks: Sequence[Any]) -> list[Array]:
    """``_top_k_groups`` with one array per group."""
    return [kept for (kept,) in _top_k_groups([[kk] for kk in keys], ks)]


def topk_mask(scores: Any, k: Any) -> Array:
    """Boolean mask of the ``k`` largest entries of ``scores`` (exactly ``k`` are ``True``).

    Ties are broken by position: among equal scores the lower row-major index is kept (the
    convention of :func:`jax.lax.top_k`). ``k`` may be a traced integer; jit-compatible.

    Args:
      scores: real array of any shape (ranked as floats; float64 keeps full precision).
      k: number of entries kept, ``0 <= k <= scores.size``.

    Returns:
      ``bool`` array of ``scores.shape``.
    """
    scores = jnp.asarray(scores)
    k_value = concrete_float(k, "k")
    if k_value is not None and not 0 <= k_value <= scores.size:
        raise ValueError(f"`k` must be in [0, {scores.size}], got {k!r}.")
    fdt, udt = _key_dtypes([scores])
    (mask,) = _top_k_each([_order_keys(scores, fdt, udt)], [k])
    return mask.reshape(scores.shape)


# ----------------------------------------------------------------------------------------------
# Tree plumbing.
# ----------------------------------------------------------------------------------------------


def _flatten(tree: PyTree, masks: PyTree | None, name: str = "masks"):
    """``(paths, leaves, mask_leaves, treedef)`` of ``tree``; ``None`` leaves of ``tree`` kept.

    Validates that ``masks`` has the structure and shapes of ``tree`` (``None`` allowed).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    if masks is None:
        return paths, leaves, [None] * len(leaves), treedef
    m_leaves, m_def = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
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


def _selected(tree: PyTree, masks: PyTree | None, filter_fn: FilterFn | None):
    """Indices, leaves and previous masks of the leaves selected by ``filter_fn``."""
    filter_fn = is_kernel if filter_fn is None else filter_fn
    paths, leaves, m_leaves, treedef = _flatten(tree, masks)
    idx = [i for i, (p, x) in enumerate(zip(paths, leaves, strict=True))
           if x is not None and filter_fn(p, x)]
    return idx, leaves, m_leaves, treedef


def _assemble(treedef, n_leaves: int, idx: Sequence[int], new: Sequence[Array]) -> PyTree:
    out: list[Any] = [None] * n_leaves
    for i, m in zip(idx, new, strict=True):
        out[i] = m
    return jax.tree_util.tree_unflatten(treedef, out)


def _keys_with_history(scores: Array, prev: Array | None, fdt: Any, udt: Any) -> Array:
    keys = _order_keys(scores, fdt, udt)
    if prev is None:
        return keys
    return jnp.where(jnp.ravel(prev).astype(bool), keys, jnp.zeros_like(keys))


def _check_min_kept(min_kept_per_layer: int) -> None:
    if isinstance(min_kept_per_layer, bool) or not isinstance(min_kept_per_layer, int):
        raise ValueError(f"`min_kept_per_layer` must be an int, got {min_kept_per_layer!r}.")
    if min_kept_per_layer < 0:
        raise ValueError(f"`min_kept_per_layer` must be >= 0, got {min_kept_per_layer}.")


def _global_top_k(keys: list[Array], sizes: list[int], sparsity: Any, min_kept: int) -> list:
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
        protected = _top_k_each(keys, [min(min_kept, n) for n in sizes])
        keys = [jnp.where(p, top, kk) for p, kk in zip(protected, keys, strict=True)]
    return _top_k_groups([keys], [k])[0]


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
    check_sparsity(sparsity)
    idx, leaves, prev, treedef = _selected(params, masks, filter_fn)
    fdt, udt = _key_dtypes([leaves[i] for i in idx])
    keys = [_keys_with_history(jnp.abs(leaves[i]), prev[i], fdt, udt) for i in idx]
    ks = [leaves[i].size - num_to_prune(leaves[i].size, sparsity) for i in idx]
    kept = _top_k_each(keys, ks)
    new = [m.reshape(leaves[i].shape) for i, m in zip(idx, kept, strict=True)]
    return _assemble(treedef, len(leaves), idx, new)


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
    check_sparsity(sparsity)
    _check_min_kept(min_kept_per_layer)
    idx, leaves, prev, treedef = _selected(params, masks, filter_fn)
    if not idx:
        return _assemble(treedef, len(leaves), idx, [])
    fdt, udt = _key_dtypes([leaves[i] for i in idx])
    keys = [_keys_with_history(jnp.abs(leaves[i]), prev[i], fdt, udt) for i in idx]
    sizes = [leaves[i].size for i in idx]
    kept = _global_top_k(keys, sizes, sparsity, min_kept_per_layer)
    new = [m.reshape(leaves[i].shape) for i, m in zip(idx, kept, strict=True)]
    return _assemble(treedef, len(leaves), idx, new)


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
    idx, leaves, prev, treedef = _selected(params, masks, filter_fn)
    keys = [
        _keys_with_history(
            jax.random.uniform(jax.random.fold_in(key, i), leaves[i].shape, jnp.float32),
            prev[i], jnp.float32, jnp.uint32,
        )
        for i in idx
    ]
    ks = [leaves[i].size - num_to_prune(leaves[i].size, sparsity) for i in idx]
    kept = _top_k_each(keys, ks)
    new = [m.reshape(leaves[i].shape) for i, m in zip(idx, kept, strict=True)]
    return _assemble(treedef, len(leaves), idx, new)


def _channel_keys(x: Array, prev: Array | None, fdt: Any, udt: Any) -> Array:
    """Order keys of the output channels (last axis) by the L2 norm of their filters."""
    if x.ndim < 2:
        raise ValueError(f"channel pruning needs kernels with ndim >= 2, got shape {x.shape}.")
    axes = tuple(range(x.ndim - 1))
    norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(fdt)), axis=axes))
    alive = None if prev is None else jnp.any(jnp.asarray(prev, bool), axis=axes)
    return _keys_with_history(norms, alive, fdt, udt)


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
    check_sparsity(sparsity)
    idx, leaves, prev, treedef = _selected(params, masks, filter_fn)
    fdt, udt = _key_dtypes([leaves[i] for i in idx])
    keys = [_channel_keys(leaves[i], prev[i], fdt, udt) for i in idx]
    channels = [leaves[i].shape[-1] for i in idx]
    kept = _top_k_each(keys, [c - num_to_prune(c, sparsity) for c in channels])
    new = [jnp.broadcast_to(m, leaves[i].shape) for i, m in zip(idx, kept, strict=True)]
    return _assemble(treedef, len(leaves), idx, new)


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
    check_sparsity(sparsity)
    _check_min_kept(min_kept_per_layer)
    idx, leaves, prev, treedef = _selected(params, masks, filter_fn)
    if not idx:
        return _assemble(treedef, len(leaves), idx, [])
    fdt, udt = _key_dtypes([leaves[i] for i in idx])
    keys = [_channel_keys(leaves[i], prev[i], fdt, udt) for i in idx]
    sizes = [leaves[i].shape[-1] for i in idx]
    kept = _global_top_k(keys, sizes, sparsity, min_kept_per_layer)
    new = [jnp.broadcast_to(m, leaves[i].shape) for i, m in zip(idx, kept, strict=True)]
    return _assemble(treedef, len(leaves), idx, new)


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
    _, _, _, treedef = _flatten(trees[0], None)
    columns = []
    for j, t in enumerate(trees):
        leaves, t_def = jax.tree_util.tree_flatten(t, is_leaf=_is_none)
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
    idx, leaves, _, treedef = _selected(params, None, filter_fn)
    return _assemble(treedef, len(leaves), idx, [leaves[i] != 0 for i in idx])


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
    paths, leaves, _, _ = _flatten(tree, None)
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


# ----------------------------------------------------------------------------------------------
# HYDRA learned scores (Sehwag, Wang, Mittal, Jana 2020, arXiv 2002.10509).
# ----------------------------------------------------------------------------------------------


def init_scores(params: PyTree, *, filter_fn: FilterFn | None = None) -> PyTree:
    r"""HYDRA's scaled initialisation: ``score = sqrt(6 / fan_in) * W / max|W|`` per leaf.

    ``fan_in`` is the product of all axes but the last (flax layout). The scores are a positive
    multiple of ``W``, so the first mask of :func:`scores_to_masks` is the layer-wise magnitude
    mask (:func:`layerwise_magnitude_masks`). An all-zero leaf gets zero scores.

    Returns:
      A tree with the structure of ``params``: score arrays (dtype of the leaf) for the selected
      leaves, ``None`` elsewhere.
    """
    idx, leaves, _, treedef = _selected(params, None, filter_fn)
    new = []
    for i in idx:
        w = jnp.asarray(leaves[i])
        fan_in = math.prod(w.shape[:-1])
        w_max = jnp.max(jnp.abs(w))
        safe = jnp.where(w_max > 0, w_max, jnp.ones_like(w_max))
        new.append(jnp.where(w_max > 0, math.sqrt(6.0 / fan_in) * w / safe, jnp.zeros_like(w)))
    return _assemble(treedef, len(leaves), idx, new)


@jax.custom_vjp
def _straight_through(score: Array, keep: Array) -> Array:
    return keep.astype(score.dtype)


def _straight_through_fwd(score, keep):
    return keep.astype(score.dtype), jnp.sign(score)


def _straight_through_bwd(sign, g):
    return g * sign, None


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def topk_mask_ste(score: Array, sparsity: Any) -> Array:
    r"""HYDRA mask of one leaf with a straight-through gradient.

    Forward: ``1.0`` on the top ``k = n - num_to_prune(n, sparsity)`` entries of ``|score|``
    (exact count, ties to the lower index), ``0.0`` elsewhere, in ``score``'s dtype.
    Backward: :math:`\partial L / \partial \mathrm{score} = \partial L / \partial \mathrm{mask}
    \cdot \mathrm{sign}(\mathrm{score})` (HYDRA passes the gradient straight through the top-k
    of ``|score|``; the sign is the derivative of ``|score|``, 0 at 0).
    """
    check_sparsity(sparsity)
    score = jnp.asarray(score)
    k = score.size - num_to_prune(score.size, sparsity)
    keep = topk_mask(lax.stop_gradient(jnp.abs(score)), k)
    return _straight_through(score, keep)


def scores_to_masks(
    scores: PyTree,
    sparsity: Any,
    *,
    scope: Literal["layer", "global"] = "layer",
    min_kept_per_layer: int = 1,
) -> PyTree:
    """Boolean masks from HYDRA scores: keep the top-k of ``|score|`` (exact k).

    ``scope="layer"`` (HYDRA's rule) prunes every non-``None`` leaf of ``scores`` to
    ``sparsity``: the same keep ratio in every layer. ``scope="global"`` ranks all scores
    together (as :func:`global_magnitude_masks`, keeping at least ``min_kept_per_layer`` per
    leaf), so the total count is exact while small layers can keep more: with HYDRA's
    initialisation ``sqrt(6 / fan_in) * W / max|W|`` the ranking favours low-fan-in layers. At
    99 % a layer-wise rule leaves a 3x3x1x32 first conv 3 of its 288 weights, i.e. at most three
    live channels; the global rule does not. The result is a masks tree for
    :func:`apply_masks` or :func:`sparsify` ``(..., masks=...)`` (fine-tuning with the mask
    fixed).
    """
    def every_leaf(path, leaf):
        return True

    scores = lax.stop_gradient(scores)
    if scope == "layer":
        return layerwise_magnitude_masks(scores, sparsity, filter_fn=every_leaf)
    if scope == "global":
        return global_magnitude_masks(scores, sparsity, filter_fn=every_leaf,
                                      min_kept_per_layer=min_kept_per_layer)
    raise ValueError(f"`scope` must be 'layer' or 'global', got {scope!r}.")


def masked_params_from_scores(
    params: PyTree,
    scores: PyTree,
    sparsity: Any,
    *,
    freeze_weights: bool = True,
    scope: Literal["layer", "global"] = "layer",
) -> PyTree:
    r"""Parameters as the network sees them while HYDRA trains the scores.

    Returns ``W * topk_mask_ste(score)`` for every leaf with a score and ``W`` for the others.
    With ``freeze_weights=True`` (HYDRA's pruning phase) every parameter is wrapped in
    :func:`jax.lax.stop_gradient`, so only the scores receive gradients. Use it inside any loss::

        def loss(scores, batch):
            p = masked_params_from_scores(params, scores, 0.99)
            return adversarial_loss(model.apply({"params": p}, batch.x), batch.y)

        grads = jax.grad(loss)(scores, batch)  # optimise the scores with any optax optimizer

    Args:
      params: parameter tree.
      scores: tree with ``params``' structure, ``None`` for unscored leaves (:func:`init_scores`).
      sparsity: fraction removed per scored leaf, ``[0, 1)``.
      freeze_weights: stop gradients to ``params``.
      scope: ``"layer"`` or ``"global"`` top-k, as in :func:`scores_to_masks`.
    """
    check_sparsity(sparsity)
    _, leaves, score_leaves, treedef = _flatten(params, scores, name="scores")
    # All leaves' top-k in one selection loop; same masks as topk_mask_ste leaf by leaf.
    keep_leaves = jax.tree_util.tree_leaves(scores_to_masks(scores, sparsity, scope=scope),
                                            is_leaf=_is_none)
    out = []
    for w, s, keep in zip(leaves, score_leaves, keep_leaves, strict=True):
        if w is None:
            out.append(None)
            continue
        if freeze_weights:
            w = lax.stop_gradient(w)
        out.append(w if s is None else w * _straight_through(s, keep).astype(w.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# The optax wrapper.
# ----------------------------------------------------------------------------------------------


class PruningState(NamedTuple):
    """State of :func:`sparsify` (jaxpruner's field names).

    Attributes:
      count: number of updates done (``int32``); update number ``count`` is the next one.
      masks: current masks (``bool`` leaves, ``None`` for unpruned leaves).
      inner_state: state of the wrapped optimizer (moments masked like the parameters).
      target_sparsities: per pruned leaf, the final sparsity requested (``float32`` scalar;
        for fixed masks, their measured sparsity); ``None`` for unpruned leaves.
    """

    count: Array
    masks: PyTree
    inner_state: optax.OptState
    target_sparsities: PyTree


def _as_bool_masks(masks: PyTree) -> PyTree:
    return jax.tree.map(lambda m: None if m is None else jnp.asarray(m).astype(bool), masks,
                        is_leaf=_is_none)


def _zero_where_pruned(tree: PyTree, masks: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
        masks, tree, is_leaf=_is_none,
    )


def _mask_params_like_subtrees(tree: PyTree, masks: PyTree, params: PyTree) -> PyTree:
    """Zeroes pruned entries in every subtree of ``tree`` shaped like ``params``.

    That covers optax's moment trees (``trace``, ``mu``, ``nu``, ...), however deeply nested in
    ``chain`` / ``inject_hyperparams`` states. Subtrees of another structure (e.g. factored
    moments, or ``optax.masked``'s partial trees) are left alone; the wrapper's output masking
    still keeps their pruned weights at zero.
    """
    p_def = jax.tree_util.tree_structure(params)
    p_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(params)]

    def params_like(x):
        if jax.tree_util.tree_structure(x) != p_def:
            return False
        leaves = jax.tree_util.tree_leaves(x)
        return all(
            hasattr(leaf, "shape") and tuple(leaf.shape) == tuple(s)
            for leaf, s in zip(leaves, p_shapes, strict=True)
        )

    return jax.tree.map(
        lambda x: _zero_where_pruned(x, masks) if params_like(x) else x, tree, is_leaf=params_like
    )


def _target_sparsities(masks: PyTree, target: Any) -> PyTree:
    def one(m):
        if m is None:
            return None
        if target is None:
            return 1.0 - jnp.mean(jnp.asarray(m, jnp.float32))
        return jnp.asarray(target, jnp.float32)

    return jax.tree.map(one, masks, is_leaf=_is_none)


def sparsify(
    inner: optax.GradientTransformation,
    *,
    mask_fn: MaskFn | None = None,
    schedule: PruningSchedule | None = None,
    target_sparsity: float | Array | None = None,
    masks: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer so that it trains a pruned network and pruned weights stay exactly 0.

    Two uses:

    * **Pruning during training**: ``mask_fn``, ``schedule`` and ``target_sparsity``. On update
      number ``t`` with ``schedule.is_mask_update_step(t)`` the masks are recomputed as
      ``mask_fn(params, schedule.get_sparsity_at_step(target_sparsity, t), masks=old_masks)``
      and intersected with the old masks.
    * **Training with fixed masks** (fine-tuning after HYDRA, or a pruned checkpoint):
      ``masks`` only. Both may be combined (``masks`` then gives the initial masks).

    Semantics of one update, with masks ``m`` (after any recomputation):

    1. the incoming gradients are zeroed where ``m`` is 0;
    2. ``inner`` runs on them with the *pruned* parameters ``apply_masks(params, m)`` (so weight
       decay and penalties such as :func:`tscnc_jax.add_condition_number_penalty` see the pruned
       kernels);
    3. every subtree of the inner state shaped like ``params`` (momentum, Adam moments, ...) is
       zeroed where ``m`` is 0, so no stale moment can push a pruned weight;
    4. the returned update is the inner update where ``m`` is 1 and ``-params`` where ``m`` is 0,
       so ``optax.apply_updates(params, updates)`` is exactly 0 at every pruned entry, also at the
       step that prunes it, also if ``params`` were dense (fixed masks applied from the first step).

    What "dense weights" means here: the wrapper keeps no shadow copy. The weights it ranks are the
    current parameters, whose pruned entries are exactly zero; the previous masks are passed to
    ``mask_fn`` so that pruned entries rank below all survivors (also below surviving weights that
    happen to be zero), hence with a non-decreasing schedule the masks are nested and each
    recomputation removes exactly the requested number of weights of the *whole* layer (sparsity
    is always relative to the full layer, never to the surviving weights). The intersection with
    the old masks makes revival impossible even for a decreasing schedule (the sparsity then stays
    higher than scheduled). For HYDRA, scores are trained with :func:`masked_params_from_scores`
    (no wrapper needed); fine-tune with ``sparsify(inner, masks=scores_to_masks(scores, s))``.

    The wrapper must be the outermost transformation (apply its updates unchanged): a
    transformation chained after it would rescale the ``-params`` correction. Compose everything
    else inside ``inner``. Under :func:`jax.jit` the mask recomputation is a :func:`jax.lax.cond`,
    so the step compiles once.

    Args:
      inner: the optimizer to wrap (e.g. ``optax.chain(add_condition_number_penalty(...),
        optax.sgd(0.1, momentum=0.9, nesterov=True))``).
      mask_fn: ``mask_fn(params, sparsity, *, masks) -> masks`` such as
        ``functools.partial(global_magnitude_masks, min_kept_per_layer=1)``. It must accept a
        traced ``sparsity`` and return the same masks structure for every sparsity.
      schedule: e.g. :class:`tscnc_jax.schedules.PolynomialSchedule`; must be non-decreasing.
      target_sparsity: final sparsity in ``[0, 1)`` (may be injected by
        :func:`optax.inject_hyperparams`; pass ``static_args=("mask_fn",)``).
      masks: fixed or initial masks (structure of ``params``, ``None`` for unpruned leaves).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state :class:`PruningState`; its
      ``update`` requires ``params``.

    Example:
      >>> import functools, jax, jax.numpy as jnp, optax
      >>> from tscnc_jax import pruning, schedules
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
      >>> tx = pruning.sparsify(
      ...     optax.sgd(0.1, momentum=0.9),
      ...     mask_fn=pruning.layerwise_magnitude_masks,
      ...     schedule=schedules.OneShotSchedule(),
      ...     target_sparsity=0.9)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> pruning.summarize_sparsity(params).num_pruned  # ceil(0.9 * 2048)
      1844

    References:
      Zhu and Gupta 2017 (arXiv 1710.01878); Lee et al., jaxpruner (arXiv 2304.14082) for the
      state layout; Sehwag et al. 2020 (HYDRA, arXiv 2002.10509).
    """
    scheduled = (mask_fn, schedule, target_sparsity)
    if any(x is None for x in scheduled) and any(x is not None for x in scheduled):
        raise ValueError(
            "sparsify: pruning during training needs all of `mask_fn`, `schedule` and "
            "`target_sparsity`; to train with fixed masks give only `masks`."
        )
    if mask_fn is None and masks is None:
        raise ValueError(
            "sparsify: give `mask_fn`, `schedule` and `target_sparsity` (pruning during training) "
            "or `masks` (fixed masks)."
        )
    if target_sparsity is not None:
        check_sparsity(target_sparsity, "target_sparsity")
    static_target = None if target_sparsity is None else concrete_float(target_sparsity)
    inner = optax.with_extra_args_support(inner)
    fixed_masks = None if masks is None else _as_bool_masks(masks)

    def init_fn(params):
        if fixed_masks is not None:
            check_masks(params, fixed_masks)
        m0 = fixed_masks
        if mask_fn is not None:
            from_fn = _as_bool_masks(mask_fn(params, 0.0, masks=None))
            check_masks(params, from_fn, name="mask_fn(params, 0.0)")
            m0 = intersect_masks(from_fn, fixed_masks) if fixed_masks is not None else from_fn
        return PruningState(
            count=jnp.zeros([], jnp.int32),
            masks=m0,
            inner_state=inner.init(params),
            target_sparsities=_target_sparsities(m0, target_sparsity),
        )

    def recompute(params, old, count):
        sparsity = schedule.get_sparsity_at_step(target_sparsity, count)

        def compute(s):
            new = mask_fn(params, s, masks=old)
            check_masks(params, new, name="mask_fn(...)")
            return intersect_masks(_as_bool_masks(new), old)

        if static_target is None:
            return compute(sparsity)
        # At the target itself use the float64 count rule (see the module docstring).
        return lax.cond(
            sparsity >= jnp.float32(static_target),
            lambda: compute(static_target),
            lambda: compute(sparsity),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "sparsify needs the parameters: call `update(updates, state, params)`."
            )
        check_masks(params, state.masks, name="state.masks")
        masks_ = state.masks
        if mask_fn is not None:
            masks_ = lax.cond(
                schedule.is_mask_update_step(state.count),
                lambda old: recompute(params, old, state.count),
                lambda old: old,
                masks_,
            )
        grads = _zero_where_pruned(updates, masks_)
        inner_updates, inner_state = inner.update(
            grads, state.inner_state, apply_masks(params, masks_), **extra_args
        )
        inner_state = _mask_params_like_subtrees(inner_state, masks_, params)
        new_updates = jax.tree.map(
            lambda m, u, p: u if m is None else jnp.where(m, u, -p.astype(u.dtype)),
            masks_, inner_updates, params, is_leaf=_is_none,
        )
        targets = state.target_sparsities
        if target_sparsity is not None:
            targets = _target_sparsities(masks_, target_sparsity)
        return new_updates, PruningState(
            count=optax.safe_int32_increment(state.count),
            masks=masks_,
            inner_state=inner_state,
            target_sparsities=targets,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
