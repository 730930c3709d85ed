"""Exact-count top-k selection: a radix select on the scores' bit patterns, for a traced ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tscnc_jax.pruning.schedules import check_sparsity, concrete_float

Array = jax.Array

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


def key_dtypes(arrays: Sequence[Array]) -> tuple[Any, Any]:
    """(float, unsigned) dtypes of the order keys: 64-bit if any input is float64."""
    if any(jnp.asarray(a).dtype == jnp.float64 for a in arrays):
        return jnp.float64, jnp.uint64
    return jnp.float32, jnp.uint32


def order_keys(scores: Array, float_dtype: Any, uint_dtype: Any) -> Array:
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


def top_k_groups(groups: Sequence[Sequence[Array]], ks: Sequence[Any]) -> list[list[Array]]:
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


def top_k_each(keys: Sequence[Array], ks: Sequence[Any]) -> list[Array]:
    """``top_k_groups`` with one array per group."""
    return [kept for (kept,) in top_k_groups([[kk] for kk in keys], ks)]


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
    fdt, udt = key_dtypes([scores])
    (mask,) = top_k_each([order_keys(scores, fdt, udt)], [k])
    return mask.reshape(scores.shape)
