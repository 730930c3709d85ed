"""The optax wrapper that trains a pruned network: :func:`sparsify` and its :class:`PruningState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from tscnc_jax.pruning.masks import MaskFn, intersect_masks, is_none
from tscnc_jax.pruning.schedules import PruningSchedule, check_sparsity, concrete_float
from tscnc_jax.tree_utils import PyTree, apply_masks, check_masks

Array = jax.Array

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
                        is_leaf=is_none)


def _zero_where_pruned(tree: PyTree, masks: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)),
        masks, tree, is_leaf=is_none,
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

    return jax.tree.map(one, masks, is_leaf=is_none)


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
      schedule: e.g. :class:`tscnc_jax.pruning.schedules.PolynomialSchedule`; must be
        non-decreasing.
      target_sparsity: final sparsity in ``[0, 1)`` (may be injected by
        :func:`optax.inject_hyperparams`; pass ``static_args=("mask_fn",)``).
      masks: fixed or initial masks (structure of ``params``, ``None`` for unpruned leaves).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state :class:`PruningState`; its
      ``update`` requires ``params``.

    Example:
      >>> import functools, jax, jax.numpy as jnp, optax
      >>> from tscnc_jax import pruning
      >>> from tscnc_jax.pruning import schedules
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
            masks_, inner_updates, params, is_leaf=is_none,
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
