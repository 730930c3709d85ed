"""HYDRA's learned importance scores (Sehwag, Wang, Mittal, Jana 2020, arXiv 2002.10509).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from tscnc_jax.pruning.masks import (
    assemble,
    flatten_with_masks,
    global_magnitude_masks,
    is_none,
    layerwise_magnitude_masks,
    selected_leaves,
)
from tscnc_jax.pruning.schedules import check_sparsity
from tscnc_jax.pruning.topk import num_to_prune, topk_mask
from tscnc_jax.tree_utils import FilterFn, PyTree

Array = jax.Array

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
    idx, leaves, _, treedef = selected_leaves(params, None, filter_fn)
    new = []
    for i in idx:
        w = jnp.asarray(leaves[i])
        fan_in = math.prod(w.shape[:-1])
        w_max = jnp.max(jnp.abs(w))
        safe = jnp.where(w_max > 0, w_max, jnp.ones_like(w_max))
        new.append(jnp.where(w_max > 0, math.sqrt(6.0 / fan_in) * w / safe, jnp.zeros_like(w)))
    return assemble(treedef, len(leaves), idx, new)


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
    99 % a layer-wise rule leaves a 3x3x1x32 first conv 2 of its 288 weights
    (:func:`num_to_prune`), i.e. at most two live channels; the global rule does not. The
    result is a masks tree for :func:`apply_masks` or :func:`sparsify` ``(..., masks=...)``
    (fine-tuning with the mask fixed).
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
    _, leaves, score_leaves, treedef = flatten_with_masks(params, scores, name="scores")
    # All leaves' top-k in one selection loop; same masks as topk_mask_ste leaf by leaf.
    keep_leaves = jax.tree_util.tree_leaves(scores_to_masks(scores, sparsity, scope=scope),
                                            is_leaf=is_none)
    out = []
    for w, s, keep in zip(leaves, score_leaves, keep_leaves, strict=True):
        if w is None:
            out.append(None)
            continue
        if freeze_weights:
            w = lax.stop_gradient(w)
        out.append(w if s is None else w * _straight_through(s, keep).astype(w.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
