r"""Transformed sparse constraint (TSC): transformed L1 and hard-concrete gated penalties.

Transformed L1 (TL1; Lv and Fan 2009, Zhang and Xin 2018), for ``a > 0``::

    rho_a(x) = (a + 1) |x| / (a + |x|)

interpolates between the L0 count (``a -> 0``) and L1 (``a -> inf``); it is concave in ``|x|``
and bounded by ``a + 1``. The *unstructured* TSC of TSCNC (arXiv 2503.20454) sums ``rho_a`` over
the entries of every prunable kernel (:func:`tscnc_jax.transformed_sparsity_penalty`).

The *gated* (structured) TSC of the authors' code applies the transform to the expected L0 + L2
cost of hard-concrete gates, one gate per output channel (Louizos, Welling, Kingma 2018, arXiv
1712.01312). The gate helpers here are pure functions of ``log_alpha`` and an explicit key.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from tscnc_jax import defaults
from tscnc_jax._validation import check_kernel, check_nonnegative
from tscnc_jax.spectral import masked_kernel

Array = jax.Array

# Hard-concrete constants of Louizos et al. (2018), used by the authors' code.
HC_BETA = 2.0 / 3.0
HC_GAMMA = -0.1
HC_ZETA = 1.1
HC_LOG_ALPHA_RANGE = (-4.605170185988091, 4.605170185988091)  # [log 0.01, log 100]


def transformed_l1(x: Any, *, a: float | Array, eps: float | Array = 0.0) -> Array:
    r"""Elementwise transformed L1 ``rho_a(x) = (a + 1) t / (a + t)`` with ``t = |x|``.

    With ``eps > 0``, ``t = sqrt(x^2 + eps^2)`` so that ``rho_a`` is differentiable at 0 (then
    ``rho_a(0) = (a + 1) eps / (a + eps)``, a constant offset that does not affect gradients).

    Args:
      x: floating array.
      a: shape parameter ``> 0``; small ``a`` approaches the L0 count, large ``a`` L1.
      eps: smoothing ``>= 0`` of ``|x|``.

    Returns:
      Array of ``x``'s shape, each entry in ``[0, a + 1)``.
    """
    check_nonnegative("a", a, strict=True)
    check_nonnegative("eps", eps)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"`x` must have a floating dtype, got {x.dtype}.")
    a = jnp.asarray(a, x.dtype)
    eps = jnp.asarray(eps, x.dtype)
    # Where eps == 0 use |x| (subgradient 0 at 0). The smooth branch gets a safe eps so that its
    # (discarded) gradient is finite, otherwise jnp.where would propagate 0 * inf = NaN.
    safe_eps = jnp.where(eps > 0, eps, jnp.ones_like(eps))
    t = jnp.where(eps > 0, jnp.sqrt(jnp.square(x) + jnp.square(safe_eps)), jnp.abs(x))
    return (a + 1) * t / (a + t)


# ----------------------------------------------------------------------------------------------
# Hard-concrete gates (Louizos et al. 2018).
# ----------------------------------------------------------------------------------------------


def init_log_alpha(key: Array, num_gates: int, *, droprate: float = 0.3, stddev: float = 0.01):
    """``log_alpha ~ N(log((1 - droprate) / droprate), stddev^2)``, the authors' initialisation."""
    if not 0.0 < droprate < 1.0:
        raise ValueError(f"`droprate` must be in (0, 1), got {droprate!r}.")
    mean = jnp.log(1.0 - droprate) - jnp.log(droprate)
    return mean + stddev * jax.random.normal(key, (num_gates,))


def hard_concrete_sample(
    key: Array,
    log_alpha: Any,
    *,
    beta: float = HC_BETA,
    gamma: float = HC_GAMMA,
    zeta: float = HC_ZETA,
    eps: float = 1e-6,
) -> Array:
    """Draws one stretched-and-clipped hard-concrete gate per entry of ``log_alpha``.

    ``u ~ U(eps, 1 - eps)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    ``z = clip(s (zeta - gamma) + gamma, 0, 1)``. Differentiable in ``log_alpha``
    (reparameterisation). Share one sample across the batch by calling this once per step.
    """
    log_alpha = jnp.asarray(log_alpha)
    u = jax.random.uniform(key, log_alpha.shape, log_alpha.dtype, minval=eps, maxval=1.0 - eps)
    s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
    return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_gate(
    log_alpha: Any, *, gamma: float = HC_GAMMA, zeta: float = HC_ZETA
) -> Array:
    """Deterministic evaluation gate ``clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
    log_alpha = jnp.asarray(log_alpha)
    return jnp.clip(jax.nn.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_prob_nonzero(
    log_alpha: Any,
    *,
    beta: float = HC_BETA,
    gamma: float = HC_GAMMA,
    zeta: float = HC_ZETA,
    eps: float = 1e-6,
) -> Array:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``, clipped to [eps, 1-eps]."""
    log_alpha = jnp.asarray(log_alpha)
    p = jax.nn.sigmoid(log_alpha - beta * jnp.log(-gamma / zeta))
    return jnp.clip(p, eps, 1.0 - eps)


def clamp_log_alpha(
    log_alpha: Any, *, lo: float = HC_LOG_ALPHA_RANGE[0], hi: float = HC_LOG_ALPHA_RANGE[1]
) -> Array:
    """Clamps ``log_alpha`` to ``[log 0.01, log 100]``, as the authors' code does every step."""
    return jnp.clip(log_alpha, lo, hi)


def gated_tsc_penalty(
    kernel: Any,
    log_alpha: Any,
    *,
    a: float = defaults.GATED_A,
    num_train: int = defaults.GATED_NUM_TRAIN,
    weight_decay: float = defaults.GATED_WEIGHT_DECAY,
    lambda0: float = defaults.GATED_LAMBDA0,
    prior_keep: float = defaults.GATED_PRIOR_KEEP,
    form: Literal["textbook", "authors_code"] = "textbook",
    mask: Any | None = None,
    beta: float = HC_BETA,
    gamma: float = HC_GAMMA,
    zeta: float = HC_ZETA,
) -> Array:
    r"""Gated transformed sparse constraint of one kernel with one hard-concrete gate per output.

    For output channel ``o`` with weights ``W_o = kernel[..., o]`` (``n_o`` entries)::

        pi_o = P(z_o != 0)                            (hard_concrete_prob_nonzero)
        u_o  = pi_o * ((p / 2) ||W_o||^2 + lambda0 * n_o)
        p    = num_train * weight_decay / prior_keep  (prior precision)

        "textbook":     (1 / num_train) * sum_o (a + 1) u_o / (a + u_o)
        "authors_code": (1 / num_train) * sum_o (a + 1) u_o / (a - u_o)

    ``u_o`` is the expected L0 + L2 cost of channel ``o`` (Louizos et al. 2018). The textbook form
    applies TL1 to it: concave, bounded by ``(a + 1) / num_train`` per channel. The authors' code
    applies the map to the *negative* log-prior, which turns the denominator into ``a - u``: the
    result is convex in ``u``, has a **pole at u = a** (infinite penalty) and is negative beyond
    it; with its defaults ``u_o`` is ~35 at initialisation, so the pole is not reached in
    practice, but large kernels or other ``num_train`` / ``weight_decay`` can reach it. Offered
    only for faithful comparison. Multiply the result by the global weight ``lambda`` yourself.

    Args:
      kernel: floating array of ndim >= 2, output channels on the last axis.
      log_alpha: gate parameters of shape ``(kernel.shape[-1],)``.
      a: TL1 shape parameter ``> 0`` (100 in the authors' code).
      num_train: training-set size ``N`` (50000 in the authors' code).
      weight_decay: the weight decay defining the prior precision ``p``.
      lambda0: L0 cost per weight.
      prior_keep: ``1 - droprate`` of the prior (0.7 hard-coded in the authors' code).
      form: ``"textbook"`` (default) or ``"authors_code"``.
      mask: optional pruning mask of the kernel's shape.
      beta, gamma, zeta: hard-concrete constants.

    Returns:
      A scalar.
    """
    if form not in ("textbook", "authors_code"):
        raise ValueError(f"`form` must be 'textbook' or 'authors_code', got {form!r}.")
    check_nonnegative("a", a, strict=True)
    check_nonnegative("num_train", num_train, strict=True)
    check_nonnegative("weight_decay", weight_decay)
    check_nonnegative("lambda0", lambda0)
    check_nonnegative("prior_keep", prior_keep, strict=True)
    kernel = masked_kernel(check_kernel(kernel), mask)
    log_alpha = jnp.asarray(log_alpha)
    if log_alpha.shape != (kernel.shape[-1],):
        raise ValueError(
            f"`log_alpha` must have shape ({kernel.shape[-1]},) (one gate per output channel of "
            f"the kernel of shape {tuple(kernel.shape)}), got {tuple(log_alpha.shape)}."
        )
    w = kernel.reshape(-1, kernel.shape[-1])
    n_o = w.shape[0]
    precision = num_train * weight_decay / prior_keep
    pi = hard_concrete_prob_nonzero(log_alpha, beta=beta, gamma=gamma, zeta=zeta)
    u = pi * (0.5 * precision * jnp.sum(jnp.square(w), axis=0) + lambda0 * n_o)
    denom = a + u if form == "textbook" else a - u
    return jnp.sum((a + 1) * u / denom) / num_train
