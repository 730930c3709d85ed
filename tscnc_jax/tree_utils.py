"""Pytree helpers shared by the penalties, the pruning engine and the reports.

Conventions used across the library:

* A leaf is addressed by its *path string*: the keys from the root joined with ``/``
  (``"Conv_0/kernel"``, ``"params/Dense_1/kernel"``), as produced by :func:`path_to_str`.
* A *filter* is a callable ``filter_fn(path: str, leaf) -> bool`` selecting the leaves a penalty
  or a pruning method acts on. :func:`is_kernel` is the default: floating arrays of ndim >= 2
  (Dense and Conv kernels); biases, norm scales and gate parameters (ndim 1) are excluded.
* A *masks* tree has the structure of ``params``; each leaf is either ``None`` (leaf not pruned) or
  an array of the leaf's shape whose non-zero entries are kept (``bool`` or ``0/1`` floats).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
FilterFn = Callable[[str, Any], bool]


def path_to_str(path: tuple) -> str:
    """Formats a ``jax.tree_util`` key path as ``"a/b/c"``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def is_kernel(path: str, leaf: Any) -> bool:
    """Default filter: floating-point arrays with ``ndim >= 2`` (Dense / Conv kernels)."""
    del path
    return getattr(leaf, "ndim", 0) >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def _is_none(x: Any) -> bool:
    return x is None


def check_masks(params: PyTree, masks: PyTree | None, *, name: str = "masks") -> None:
    """Raises ``ValueError`` unless ``masks`` has the structure and leaf shapes of ``params``.

    ``None`` leaves in ``masks`` are allowed anywhere (that leaf is not pruned).
    """
    if masks is None:
        return
    p_def = jax.tree_util.tree_structure(params)
    m_def = jax.tree_util.tree_structure(masks, is_leaf=_is_none)
    if p_def != m_def:
        raise ValueError(
            f"`{name}` must have the tree structure of `params` (with None for unpruned leaves); "
            f"got {m_def} for params {p_def}."
        )
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    m_leaves = jax.tree_util.tree_leaves(masks, is_leaf=_is_none)
    for (path, p), m in zip(p_leaves, m_leaves, strict=True):
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise ValueError(
                f"`{name}` leaf {path_to_str(path)!r} has shape {tuple(m.shape)}, "
                f"but the parameter has shape {tuple(p.shape)}."
            )


def named_leaves(
    params: PyTree,
    masks: PyTree | None = None,
    filter_fn: FilterFn | None = None,
) -> list[tuple[str, jax.Array, jax.Array | None]]:
    """Lists ``(path, leaf, mask_or_None)`` for the leaves of ``params`` selected by ``filter_fn``.

    Validates ``masks`` against ``params`` (see :func:`check_masks`). The order is the pytree
    flattening order, so it is deterministic.
    """
    check_masks(params, masks)
    filter_fn = is_kernel if filter_fn is None else filter_fn
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if masks is None:
        mask_leaves = [None] * len(flat)
    else:
        mask_leaves = jax.tree_util.tree_leaves(masks, is_leaf=_is_none)
    out = []
    for (path, leaf), mask in zip(flat, mask_leaves, strict=True):
        name = path_to_str(path)
        if filter_fn(name, leaf):
            out.append((name, leaf, mask))
    return out


def apply_masks(params: PyTree, masks: PyTree | None) -> PyTree:
    """Returns ``params`` with every masked leaf multiplied by its mask (``None`` leaves kept)."""
    if masks is None:
        return params
    check_masks(params, masks)
    return jax.tree.map(
        lambda p, m: p if m is None else p * m.astype(p.dtype), params, masks, is_leaf=_is_none
    )
