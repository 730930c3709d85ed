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

from tscnc_jax.pruning.hydra import (
    init_scores,
    masked_params_from_scores,
    scores_to_masks,
    topk_mask_ste,
)
from tscnc_jax.pruning.masks import (
    LayerSparsity,
    MaskFn,
    SparsitySummary,
    global_channel_masks,
    global_magnitude_masks,
    intersect_masks,
    layerwise_channel_masks,
    layerwise_magnitude_masks,
    nonzero_masks,
    random_masks,
    summarize_sparsity,
)
from tscnc_jax.pruning.schedules import (
    IterativeSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    PruningSchedule,
    check_sparsity,
)
from tscnc_jax.pruning.topk import num_to_prune, topk_mask
from tscnc_jax.pruning.wrapper import PruningState, sparsify
from tscnc_jax.tree_utils import apply_masks

__all__ = [
    "IterativeSchedule",
    "LayerSparsity",
    "MaskFn",
    "OneShotSchedule",
    "PolynomialSchedule",
    "PruningSchedule",
    "PruningState",
    "SparsitySummary",
    "apply_masks",
    "check_sparsity",
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
