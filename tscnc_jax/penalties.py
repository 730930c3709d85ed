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

from tscnc_jax import sparsity, spectral, tree_utils

Array = jax.Array

#: Default temperature of the smooth log-condition-number surrogate.
DEFAULT_TEMPERATURE = 0.1
#: Default singular-value shift ``delta`` (small against He-initialised ``sigma_max ~ 1``).
DEFAULT_DELTA = 1e-3


def _check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "sum"):
        raise ValueError(f"`reduce` must be 'mean' or 'sum', got {reduce!r}.")


def condition_number_penalty(
    params: Any,
    *,
    temperature: float | Array = DEFAULT_TEMPERATURE,
    delta: float | Array = DEFAULT_DELTA,
    form: Literal["smooth", "log_det"] = "smooth",
    eps: float | Array = 1e-5,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["mean", "sum"] = "mean",
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

    Returns:
      A scalar (0 when no kernel is selected).
    """
    if form not in ("smooth", "log_det"):
        raise ValueError(f"`form` must be 'smooth' or 'log_det', got {form!r}.")
    _check_reduce(reduce)
    spectral.check_nonnegative("temperature", temperature, strict=True)
    spectral.check_nonnegative("delta", delta)
    spectral.check_nonnegative("eps", eps)
    terms = []
    for _, kernel, mask in tree_utils.named_leaves(params, masks, filter_fn):
        if form == "smooth":
            term = spectral.smooth_log_condition_number(
                kernel, temperature=temperature, delta=delta, mask=mask
            )
        else:
            term = spectral.log_det_condition_penalty(kernel, eps=eps, mask=mask)
        terms.append(term)
    return _reduce(terms, reduce)


def transformed_sparsity_penalty(
    params: Any,
    *,
    a: float | Array,
    eps: float | Array = 0.0,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    normalize: bool = False,
) -> Array:
    r"""Unstructured transformed sparse constraint (TSC): ``sum_kernels sum_ij rho_a(w_ij)``.

    ``rho_a(x) = (a + 1) |x| / (a + |x|)`` (:func:`tscnc_jax.transformed_l1`), with ``|x|``
    smoothed to ``sqrt(x^2 + eps^2)`` when ``eps > 0``. Small ``a`` approaches the number of
    non-zero weights, large ``a`` the L1 norm.

    Args:
      params: a pytree of parameters.
      a: TL1 shape ``> 0``.
      eps: smoothing of ``|x|`` (``>= 0``).
      filter_fn: ``(path, leaf) -> bool`` choosing the kernels.
      masks: optional masks tree; pruned entries contribute ``rho_a(0)``.
      normalize: divide by the number of selected weights (a per-weight average in ``[0, a+1)``).

    Returns:
      A scalar (0 when no kernel is selected).
    """
    spectral.check_nonnegative("a", a, strict=True)
    spectral.check_nonnegative("eps", eps)
    total, count = [], 0
    for _, kernel, mask in tree_utils.named_leaves(params, masks, filter_fn):
        w = spectral._masked(kernel, mask)
        total.append(jnp.sum(sparsity.transformed_l1(w, a=a, eps=eps)))
        count += w.size
    value = _reduce(total, "sum")
    return value / max(count, 1) if normalize else value


def _reduce(terms: list[Array], reduce: str) -> Array:
    if not terms:
        return jnp.zeros([], jnp.float32)
    dtype = jnp.result_type(*terms)
    stacked = jnp.stack([t.astype(dtype) for t in terms])
    return jnp.mean(stacked) if reduce == "mean" else jnp.sum(stacked)


def gated_sparsity_penalty(
    params: Any,
    *,
    form: Literal["textbook", "authors_code"] = "textbook",
    a: float = 100.0,
    num_train: int = 50_000,
    weight_decay: float = 5e-4,
    lambda0: float = 1e-3,
    prior_keep: float = 0.7,
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
        spectral.check_nonnegative(name, value, strict=True)
    spectral.check_nonnegative("weight_decay", weight_decay)
    spectral.check_nonnegative("lambda0", lambda0)
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
    return _reduce(terms, "sum")
