r"""Tree penalties ``(params) -> scalar``: the CNC and TSC terms of the TSCNC objective.

    loss = L_adv + lambda_s * transformed_sparsity_penalty(params)
                 + lambda_c * condition_number_penalty(params)

Both act on the leaves selected by ``filter_fn(path, leaf)`` (default
:func:`tscnc_jax.tree_utils.is_kernel`: floating arrays of ndim >= 2, so biases, norm scales and
gate parameters are excluded) and accept a ``masks`` tree so that pruned networks are penalised on
their *pruned* kernels. Add them to a loss, or use the optax transformations in
:mod:`tscnc_jax.transforms`, which add their gradients to the updates.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from tscnc_jax import _validation, defaults, sparsity, spectral, tree_utils

Array = jax.Array

#: Default temperature of the smooth log-condition-number surrogate (:mod:`tscnc_jax.defaults`).
DEFAULT_TEMPERATURE = defaults.CNC_TEMPERATURE
#: Default singular-value shift ``delta`` (small against He-initialised ``sigma_max ~ 1``).
DEFAULT_DELTA = defaults.CNC_DELTA

TSC_REDUCTIONS = ("sum", "layer_mean", "mean")


def check_reduce(reduce: str, choices: tuple[str, ...] = ("mean", "sum")) -> None:
    """Raises ``ValueError`` unless ``reduce`` is one of ``choices``."""
    if reduce not in choices:
        raise ValueError(f"`reduce` must be one of {choices}, got {reduce!r}.")


def condition_number_penalty(
    params: Any,
    *,
    temperature: float | Array = DEFAULT_TEMPERATURE,
    delta: float | Array = DEFAULT_DELTA,
    form: Literal["smooth", "log_det"] = "smooth",
    eps: float | Array = 1e-5,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["mean", "sum"] = defaults.CNC_REDUCE,
    live: bool = True,
) -> Array:
    r"""Condition-number constraint (CNC) over the kernels of ``params``.

    ``form="smooth"`` (default) sums or averages :func:`tscnc_jax.smooth_log_condition_number`
    (a smooth upper bound of ``log kappa`` of each kernel, tight within ``2 * temperature *
    log r``). ``form="log_det"`` uses the authors' code's
    :func:`tscnc_jax.log_det_condition_penalty` ``[log(eps + det(W^T W / n_out))]^2``; to
    reproduce the authors' setup apply it to the final classifier only, e.g.
    ``filter_fn=lambda path, w: path.endswith("Dense_1/kernel")``.

    Args:
      params: a pytree of parameters.
      temperature: surrogate temperature ``> 0`` (``form="smooth"``).
      delta: singular-value shift ``>= 0`` (``form="smooth"``).
      form: ``"smooth"`` or ``"log_det"``.
      eps: the determinant offset (``form="log_det"``).
      filter_fn: ``(path, leaf) -> bool`` choosing the kernels.
      masks: optional masks tree (``None`` leaves are not pruned).
      reduce: ``"mean"`` over the selected kernels (default, insensitive to depth) or ``"sum"``.
      live: ``form="smooth"`` on each kernel's live spectrum (default; the singular values that
        are zero by the pruned kernel's structure are left out, see
        :func:`tscnc_jax.smooth_log_condition_number`). ``False``: the whole spectrum.

    Returns:
      A scalar (0 when no kernel is selected).
    """
    if form not in ("smooth", "log_det"):
        raise ValueError(f"`form` must be 'smooth' or 'log_det', got {form!r}.")
    check_reduce(reduce)
    _validation.check_nonnegative("temperature", temperature, strict=True)
    _validation.check_nonnegative("delta", delta)
    _validation.check_nonnegative("eps", eps)
    terms = []
    for _, kernel, mask in tree_utils.named_leaves(params, masks, filter_fn):
        if form == "smooth":
            term = spectral.smooth_log_condition_number(
                kernel, temperature=temperature, delta=delta, mask=mask, live=live
            )
        else:
            term = spectral.log_det_condition_penalty(kernel, eps=eps, mask=mask)
        terms.append(term)
    return reduce_terms(terms, reduce)


def transformed_sparsity_penalty(
    params: Any,
    *,
    a: float | Array = defaults.TSC_A,
    eps: float | Array = 0.0,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["sum", "layer_mean", "mean"] = defaults.TSC_REDUCE,
) -> Array:
    r"""Unstructured transformed sparse constraint (TSC) over the entries of the kernels.

    ``rho_a(x) = (a + 1) |x| / (a + |x|)`` (:func:`tscnc_jax.transformed_l1`), with ``|x|``
    smoothed to ``sqrt(x^2 + eps^2)`` when ``eps > 0``. Small ``a`` approaches the number of
    non-zero weights, large ``a`` the L1 norm.

    **Scale.** With ``reduce="sum"`` (default), ``R = sum_kernels sum_ij rho_a(w_ij)`` and the
    gradient a weight ``w`` receives from ``lambda * R`` is, for ``eps = 0``,

        lambda * rho_a'(|w|) sign(w) = lambda * a (a + 1) / (a + |w|)^2 * sign(w),

    an L1-like pull between ``lambda (a + 1) a / (a + 1)^2`` (at ``|w| = 1``) and ``lambda (a +
    1) / a`` (at ``w -> 0``): ``2 lambda`` for the default ``a = 1`` and the ``|w| << 1`` of
    trained kernels, the same for every weight of every layer. Weight decay ``wd`` gives ``wd *
    w``: ``1.25e-5`` for ``wd = 5e-4`` and a typical ``|w| = 0.025``, so ``lambda ~ 1e-5`` is on
    weight decay's scale. ``reduce="layer_mean"`` divides each kernel's sum by its size (a layer
    of ``n`` weights gets ``lambda rho_a' / n`` per weight: small layers are pushed hardest),
    ``reduce="mean"`` divides the total by the number of selected weights (``lambda rho_a' /
    N``; with a 421k-weight network and ``lambda = 1e-3``, about ``5e-9`` per weight, 10^3-10^4
    below weight decay: practically no effect).

    Args:
      params: a pytree of parameters.
      a: TL1 shape ``> 0``.
      eps: smoothing of ``|x|`` (``>= 0``).
      filter_fn: ``(path, leaf) -> bool`` choosing the kernels.
      masks: optional masks tree; pruned entries contribute ``rho_a(0)`` and get no gradient.
      reduce: ``"sum"``, ``"layer_mean"`` or ``"mean"`` (see Scale).

    Returns:
      A scalar (0 when no kernel is selected).
    """
    _validation.check_nonnegative("a", a, strict=True)
    _validation.check_nonnegative("eps", eps)
    check_reduce(reduce, TSC_REDUCTIONS)
    terms, count = [], 0
    for _, kernel, mask in tree_utils.named_leaves(params, masks, filter_fn):
        w = spectral.masked_kernel(kernel, mask)
        layer = jnp.sum(sparsity.transformed_l1(w, a=a, eps=eps))
        terms.append(layer / w.size if reduce == "layer_mean" else layer)
        count += w.size
    value = reduce_terms(terms, "sum")
    return value / max(count, 1) if reduce == "mean" else value


def reduce_terms(terms: list[Array], reduce: str) -> Array:
    """Stacks per-kernel scalars in one dtype and takes their mean or sum (0 when empty)."""
    if not terms:
        return jnp.zeros([], jnp.float32)
    dtype = jnp.result_type(*terms)
    stacked = jnp.stack([t.astype(dtype) for t in terms])
    return jnp.mean(stacked) if reduce == "mean" else jnp.sum(stacked)


def gated_sparsity_penalty(
    params: Any,
    *,
    form: Literal["textbook", "authors_code"] = "textbook",
    a: float = defaults.GATED_A,
    num_train: int = defaults.GATED_NUM_TRAIN,
    weight_decay: float = defaults.GATED_WEIGHT_DECAY,
    lambda0: float = defaults.GATED_LAMBDA0,
    prior_keep: float = defaults.GATED_PRIOR_KEEP,
    masks: Any | None = None,
) -> Array:
    r"""Gated (structured) TSC summed over every hard-concrete-gated conv of ``params``.

    A gated conv is a sub-tree holding ``log_alpha`` (one gate per output channel) next to
    ``conv/kernel``, the layout of :class:`tscnc_jax.models.GatedConv`. Each contributes
    :func:`tscnc_jax.gated_tsc_penalty` of its kernel (masked when ``masks`` prunes it), with the
    keyword arguments given here; ``form="authors_code"`` is the TSCNC authors' variant with the
    pole at ``u = a`` (see that function). Multiply by the global weight ``lambda`` yourself.

    Returns:
      A scalar (0 when ``params`` has no gated conv).

    Raises:
      ValueError: a ``log_alpha`` leaf without a ``conv/kernel`` sibling.
    """
    if form not in ("textbook", "authors_code"):
        raise ValueError(f"`form` must be 'textbook' or 'authors_code', got {form!r}.")
    for name, value in (("a", a), ("num_train", num_train), ("prior_keep", prior_keep)):
        _validation.check_nonnegative(name, value, strict=True)
    _validation.check_nonnegative("weight_decay", weight_decay)
    _validation.check_nonnegative("lambda0", lambda0)
    tree_utils.check_masks(params, masks)
    flat = {tree_utils.path_to_str(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    mask_of = {}
    if masks is not None:
        mask_leaves = jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None)
        mask_of = dict(zip(flat, mask_leaves, strict=True))
    terms = []
    for path, log_alpha in flat.items():
        if path.rsplit("/", 1)[-1] != "log_alpha":
            continue
        kernel_path = path[: -len("log_alpha")] + "conv/kernel"
        if kernel_path not in flat:
            raise ValueError(f"gate parameters {path!r} have no kernel at {kernel_path!r}; gated "
                             f"convs must follow the layout of tscnc_jax.models.GatedConv.")
        terms.append(sparsity.gated_tsc_penalty(
            flat[kernel_path], log_alpha, a=a, num_train=num_train, weight_decay=weight_decay,
            lambda0=lambda0, prior_keep=prior_keep, form=form, mask=mask_of.get(kernel_path)))
    return reduce_terms(terms, "sum")
