r"""Spectral quantities of weight kernels: singular values, condition numbers and smooth surrogates.

A kernel is viewed as a matrix ``M`` of shape ``(fan_in, fan_out)``: a Dense kernel ``(in, out)``
as is, a Conv kernel ``(kh, kw, c_in, c_out)`` (Flax layout) as ``(kh * kw * c_in, c_out)``; in
general every axis but the last is folded into ``fan_in`` (:func:`as_matrix`). PyTorch stores the
transpose of the same matrix, so singular values agree across frameworks.

With ``sigma_1 >= ... >= sigma_r >= 0`` the singular values of ``M`` (``r = min(fan_in,
fan_out)``), the condition number is ``kappa(M) = sigma_1 / sigma_r`` (``inf`` when ``sigma_r =
0``). Heavily pruned kernels are often rank deficient or nearly so, which is the failure mode TSCNC
(Feng, Lin, Gao, Wei, arXiv 2503.20454) targets; every function accepts an optional pruning
``mask`` and then acts on the pruned kernel ``M * mask``.

Gradients flow through singular values only (``d sigma_i / dM = u_i v_i^T``); no singular vector
enters a loss, so the gradients stay finite for repeated and zero singular values, the case of
identity-like and pruned matrices where gradients through ``U`` and ``V`` are undefined.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax import tree_utils
from tscnc_jax._validation import check_kernel, check_nonnegative

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def masked_kernel(kernel: Any, mask: Any | None = None) -> Array:
    """``kernel * mask`` (``kernel`` when ``mask`` is ``None``), checked: a floating kernel of
    ndim >= 2 and a mask of its shape (``ValueError`` otherwise)."""
    kernel = check_kernel(kernel)
    if mask is None:
        return kernel
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(kernel.shape):
        raise ValueError(
            f"`mask` must have the kernel's shape {tuple(kernel.shape)}, got {tuple(mask.shape)}."
        )
    return kernel * mask.astype(kernel.dtype)


def _rank_deficient(s: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    # NumPy's matrix_rank tolerance; ``s`` sorted descending. Works on NumPy and JAX arrays.
    tol = s[0] * max(shape) * float(np.finfo(dtype).eps)
    return (s[-1] <= tol) | (s[0] == 0)


def _compute_dtype(dtype: Any) -> Any:
    # LAPACK-style SVD has no half-precision kernels; bf16/fp16 kernels are promoted to fp32.
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Exact quantities.
# ----------------------------------------------------------------------------------------------


def as_matrix(kernel: Any) -> Array:
    """Views a kernel as a ``(fan_in, fan_out)`` matrix: all axes but the last fold into fan_in.

    Args:
      kernel: array of ndim >= 2. Dense ``(in, out)`` is returned as is, Conv ``(kh, kw, c_in,
        c_out)`` becomes ``(kh * kw * c_in, c_out)``.

    Returns:
      The matrix view (a reshape, no copy under ``jit``).

    Raises:
      ValueError: if ``kernel.ndim < 2``.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(
            f"`kernel` must have ndim >= 2 (a Dense (in, out) or Conv (..., c_in, c_out) kernel), "
            f"got shape {tuple(kernel.shape)}."
        )
    return kernel.reshape(-1, kernel.shape[-1])


def singular_values(kernel: Any, mask: Any | None = None) -> Array:
    """Singular values of ``as_matrix(kernel * mask)``, in descending order.

    Args:
      kernel: floating array of ndim >= 2.
      mask: optional array of the kernel's shape; the pruned kernel ``kernel * mask`` is used.

    Returns:
      Array of shape ``(min(fan_in, fan_out),)`` in the kernel's dtype promoted to at least
      float32. Differentiable; the gradient of ``sigma_i`` is ``u_i v_i^T`` (finite also for
      repeated or zero singular values).
    """
    m = as_matrix(masked_kernel(kernel, mask))
    m = m.astype(_compute_dtype(m.dtype))
    return jnp.linalg.svd(m, full_matrices=False, compute_uv=False)


def live_singular_value_count(
    kernel: Any, mask: Any | None = None, *, structural: bool = True
) -> Array:
    """Number of singular values of the (pruned) kernel that are not zero by its structure.

    ``M = as_matrix(kernel * mask)`` with ``p`` rows and ``q`` columns that hold a non-zero entry
    (its *live* rows and columns) is, up to a permutation, the ``p x q`` live block padded with
    zeros, so at most ``min(p, q)`` of its singular values are non-zero; the other
    ``min(fan_in, fan_out) - min(p, q)`` are exact zeros. A sparse live block can be rank
    deficient by its pattern alone, too (two live rows whose only weights sit in the same
    column): its rank for *every* choice of values on the pattern is at most the pattern's
    *structural rank*, the size of a maximum matching between live rows and columns. Those
    zeros come from the pattern, not from the values: under a fixed mask no update can lift
    them, and their singular vectors are arbitrary.

    With ``structural=True`` (default) this returns the structural rank, computed as the
    numerical rank (NumPy's ``matrix_rank`` tolerance) of the pattern filled with fixed
    pseudo-random values in ``[1, 2]``, which equals it with probability 1; a kernel without a
    single zero entry skips that SVD (``lax.cond``) and returns ``min(fan_in, fan_out)``. With
    ``structural=False`` it returns ``min(p, q)``. Either way a traced int32 scalar (static
    shapes, no Python branch on values): the length of the prefix of the descending
    :func:`singular_values` that is the live spectrum. No gradient flows through it.
    """
    m = jax.lax.stop_gradient(as_matrix(masked_kernel(kernel, mask)))
    m = m.astype(_compute_dtype(m.dtype))
    nonzero = m != 0
    rows = jnp.sum(jnp.any(nonzero, axis=1), dtype=jnp.int32)
    cols = jnp.sum(jnp.any(nonzero, axis=0), dtype=jnp.int32)
    bound = jnp.minimum(rows, cols)
    if not structural:
        return bound

    def generic_rank(nz):
        values = jax.random.uniform(jax.random.key(0), nz.shape, m.dtype, 1.0, 2.0)
        s = jnp.linalg.svd(jnp.where(nz, values, 0.0), compute_uv=False)
        tol = s[0] * max(nz.shape) * jnp.finfo(m.dtype).eps
        return jnp.minimum(jnp.sum(s > tol, dtype=jnp.int32), bound)

    return jax.lax.cond(jnp.all(nonzero), lambda nz: bound, generic_rank, nonzero)


def host_structural_rank(pattern: np.ndarray) -> int:
    """Structural rank of a boolean matrix pattern (float64 NumPy, host): the numerical rank of
    the pattern filled with fixed pseudo-random values in ``[1, 2]``; see
    :func:`live_singular_value_count`."""
    pattern = np.asarray(pattern, bool)
    if not pattern.any():
        return 0
    values = np.random.default_rng(0).uniform(1.0, 2.0, pattern.shape)
    return int(np.linalg.matrix_rank(np.where(pattern, values, 0.0)))


def smooth_log_range(
    s: Array, *, temperature: Any, delta: Any, keep: Array | None = None
) -> Array:
    r"""``tau * logsumexp(l / tau) + tau * logsumexp(-l / tau)`` with ``l = log(s + delta)``.

    The CNC surrogate of a given set of singular values ``s`` (any order), shared by
    :func:`smooth_log_condition_number` and the tracked estimator. With a boolean ``keep`` of
    ``s``'s shape only the kept entries enter both log-sum-exps (a ``where``: shapes stay static,
    and the left-out entries get an exactly zero gradient, also when ``s + delta`` is 0 there).
    No kept entry at all (an all-zero kernel) counts as keeping ``s[0]`` alone, whose range is 0
    with a zero gradient.
    """
    s = jnp.asarray(s)
    tau = jnp.asarray(temperature, s.dtype)
    delta = jnp.asarray(delta, s.dtype)
    if keep is None:
        logs = jnp.log(s + delta)
        return tau * jax.nn.logsumexp(logs / tau) + tau * jax.nn.logsumexp(-logs / tau)
    keep = keep | ((jnp.arange(s.shape[0]) == 0) & ~jnp.any(keep))
    logs = jnp.log(jnp.where(keep, s, 1.0) + delta)
    soft_max = tau * jax.nn.logsumexp(jnp.where(keep, logs / tau, -jnp.inf))
    soft_min = -tau * jax.nn.logsumexp(jnp.where(keep, -logs / tau, -jnp.inf))
    return soft_max - soft_min


def condition_number(kernel: Any, mask: Any | None = None) -> Array:
    """Exact condition number ``sigma_max / sigma_min`` of the (pruned) kernel's matrix.

    Returns ``inf`` when the matrix is numerically rank deficient by NumPy's ``matrix_rank`` rule
    (``sigma_min <= sigma_max * max(fan_in, fan_out) * finfo(dtype).eps``), which covers the
    all-zero matrix. This is a metric, not a loss: use :func:`smooth_log_condition_number` for a
    differentiable penalty. Computed in the kernel's dtype: in float32, kappa above ~1e6 is
    unreliable; :func:`tree_condition_numbers` reports in float64.
    """
    m = as_matrix(masked_kernel(kernel, mask))
    s = singular_values(m)
    smax, smin = s[0], s[-1]
    singular = _rank_deficient(s, m.shape, s.dtype)
    return jnp.where(singular, jnp.inf, smax / jnp.where(singular, 1.0, smin))


def tree_condition_numbers(
    params: Any,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
) -> dict[str, float]:
    """Condition numbers of every kernel in ``params``, as float64 host values (for reporting).

    The SVD runs in NumPy float64 on the host, whatever the parameters' dtype, so ill-conditioned
    kernels are reported accurately (float32 SVD loses ``sigma_min`` below ~1e-7 ``sigma_max``).
    Numerically rank-deficient kernels (see :func:`condition_number`) report ``inf``.

    Args:
      params: a pytree of parameters.
      masks: optional masks tree (see :mod:`tscnc_jax.tree_utils`); pruned kernels are measured.
      filter_fn: ``(path, leaf) -> bool``; default :func:`tscnc_jax.tree_utils.is_kernel`.

    Returns:
      ``{"path/to/kernel": kappa}`` in pytree order.
    """
    spectra = tree_singular_values(params, masks, filter_fn)
    return {name: host_condition_number(s, shape) for name, (s, shape) in spectra.items()}


def host_condition_number(s: np.ndarray, shape: tuple[int, int]) -> float:
    """``s[0] / s[-1]`` of descending float64 singular values; ``inf`` if rank deficient."""
    return float("inf") if _rank_deficient(s, shape, np.float64) else float(s[0] / s[-1])


def tree_singular_values(
    params: Any,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Host float64 singular values of every (pruned) kernel: ``{path: (s, matrix_shape)}``.

    The one SVD per kernel behind :func:`tree_condition_numbers` and spectral reports (``s[0]`` is
    the kernel's spectral norm), in pytree order.
    """
    return {name: (np.linalg.svd(m, compute_uv=False), m.shape)
            for name, m in _host_matrices(params, masks, filter_fn)}


def _host_matrices(params, masks, filter_fn):
    """``(path, as_matrix(kernel * mask))`` in NumPy float64 for every selected kernel.

    Raises ``ValueError`` naming a kernel with NaN or infinite entries (no spectrum exists)."""
    for name, leaf, mask in tree_utils.named_leaves(params, masks, filter_fn):
        w = np.asarray(jax.device_get(leaf), dtype=np.float64)
        if mask is not None:
            w = w * np.asarray(jax.device_get(mask), dtype=np.float64)
        check_finite_kernel(name, w)
        yield name, w.reshape(-1, w.shape[-1])


def check_finite_kernel(name: str, w: np.ndarray) -> None:
    """Raises ``ValueError`` naming ``name`` and counting the non-finite entries of ``w``."""
    bad = ~np.isfinite(w)
    if bad.any():
        raise ValueError(f"kernel {name!r} has {int(np.isnan(w).sum())} NaN and "
                         f"{int(np.isinf(w).sum())} infinite entries of {w.size}: its "
                         f"singular values are undefined (the training diverged?).")


def tree_live_condition_numbers(
    params: Any,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
) -> dict[str, dict[str, float]]:
    """Condition number of every kernel's *live* part (float64, host), for heavily pruned nets.

    At 99 % sparsity whole rows of ``as_matrix(kernel * mask)`` (inputs no unit reads) or columns
    (units with no inputs) can be all zero. Each one makes the matrix rank deficient, so
    :func:`tree_condition_numbers` reports ``inf``, which says nothing about how the remaining
    weights are conditioned. This drops the all-zero rows and columns and measures the rest: its
    non-zero singular values are exactly the full matrix's, and its condition number is ``inf``
    only if the live part is itself rank deficient (or empty).

    A sparse live block can still be rank deficient by its pattern alone (its *structural rank*
    ``live_rank`` below ``min(live_rows, live_cols)``, see :func:`live_singular_value_count`):
    those zeros are structural as well, and ``kappa`` is ``sigma_1 / sigma_{live_rank}``.

    Returns:
      ``{path: {"kappa", "live_rows", "live_cols", "live_rank", "rows", "cols"}}`` in pytree
      order (``rows`` = fan_in, ``cols`` = fan_out of the full matrix).
    """
    out = {}
    for name, m in _host_matrices(params, masks, filter_fn):
        live = m[np.any(m != 0, axis=1)][:, np.any(m != 0, axis=0)]
        rank = host_structural_rank(live != 0)
        kappa = float("inf")
        if rank:
            s = np.linalg.svd(live, compute_uv=False)[:rank]
            kappa = host_condition_number(s, live.shape)
        out[name] = {"kappa": kappa, "live_rows": int(live.shape[0]),
                     "live_cols": int(live.shape[1]), "live_rank": rank,
                     "rows": int(m.shape[0]), "cols": int(m.shape[1])}
    return out


# ----------------------------------------------------------------------------------------------
# Smooth surrogates (losses).
# ----------------------------------------------------------------------------------------------


def smooth_log_condition_number(
    kernel: Any,
    *,
    temperature: float | Array,
    delta: float | Array,
    mask: Any | None = None,
    live: bool = True,
) -> Array:
    r"""Smooth upper bound of the log condition number (the CNC penalty of one kernel).

    With ``s_i = log(sigma_i + delta)`` and temperature ``tau > 0``::

        R(M) = tau * logsumexp(s / tau) + tau * logsumexp(-s / tau)
             = softmax_tau(s) - softmin_tau(s)

    Since ``max s <= softmax_tau(s) <= max s + tau log r`` (and symmetrically for the soft-min),

        log kappa(M + delta) <= R(M) <= log kappa(M + delta) + 2 tau log r
                                      <= log kappa(M) + 2 tau log r

    where ``kappa(M + delta) = (sigma_1 + delta) / (sigma_r + delta)`` is the condition number of
    the shifted spectrum, and ``R -> log kappa(M + delta)`` as ``tau -> 0``. When all singular
    values are equal (e.g. orthogonal ``M``), ``R = 2 tau log r`` (the upper end) and its gradient
    is zero: these matrices are the minimisers. ``delta > 0`` keeps ``R`` and its gradient finite
    on rank-deficient (heavily pruned) kernels, where ``R <= log((sigma_1 + delta) / delta) + 2 tau
    log r``. Unlike ``kappa`` itself, ``R`` is not scale invariant when ``delta > 0``: choose
    ``delta`` small relative to the kernels' typical ``sigma_max``.

    Args:
      kernel: floating array of ndim >= 2 (see :func:`as_matrix`).
      temperature: ``tau > 0``. Smaller is tighter but less smooth (the gradient concentrates on
        the extreme singular values); ``0.1``-``1`` is a practical range.
      delta: ``>= 0`` shift of the singular values; ``delta = 0`` is only safe for full-rank
        kernels.
      mask: optional pruning mask of the kernel's shape.
      live: ``True`` (default): the surrogate of the *live spectrum* only. The singular values
        that are zero by the kernel's structure (all-zero rows and columns of ``kernel * mask``,
        from the mask or from exact zeros in the kernel, and a sparse pattern's structural rank
        deficiency; :func:`live_singular_value_count`) are left out of both log-sum-exps.
        Otherwise they sit at ``log(delta)``, own the soft-min, and the smallest live singular
        value ``sigma`` gets a gradient weight of only about ``(delta / sigma)^(1 / tau)``
        (``3e-10`` against ``-76`` for a 64x32 kernel with 8 dead columns): the penalty would
        reduce to a weak spectral-norm penalty on exactly the pruned
        kernels it is meant for. The value and gradient equal those of the penalty of the
        extracted live block (of its structurally non-zero singular values); kernels without a
        zero entry are unaffected. ``False``:
        every singular value, as if the structural zeros could be revived.

    Returns:
      A scalar in the kernel's compute dtype (at least float32).

    References:
      Feng et al., "Lipschitz Constant Meets Condition Number", arXiv 2503.20454 (2025).
    """
    check_nonnegative("temperature", temperature, strict=True)
    check_nonnegative("delta", delta)
    s = singular_values(kernel, mask)
    keep = None
    if live:  # the descending spectrum's first num_live entries are the live block's
        keep = jnp.arange(s.shape[0]) < live_singular_value_count(kernel, mask)
    return smooth_log_range(s, temperature=temperature, delta=delta, keep=keep)


def log_det_condition_penalty(kernel: Any, *, eps: float = 1e-5, mask: Any | None = None) -> Array:
    r"""The "condition" loss of the TSCNC authors' code: ``[log(eps + det(W^T W / n_out))]^2``.

    ``W = as_matrix(kernel)`` has shape ``(n_in, n_out)``; ``W^T W`` is the ``n_out x n_out`` Gram
    matrix and its determinant is computed by LU factorisation (``jnp.linalg.det``), exactly as in
    the authors' code, which applies it with weight 1 to the final Dense classifier only. It equals
    ``(sum_i log(sigma_i^2 / n_out))^2`` when ``det >> eps``: it drives the *geometric mean* of the
    normalised squared singular values to 1, a volume constraint rather than a bound on
    ``sigma_max / sigma_min``.

    Known behaviour, kept for faithful comparison (``docs/method.md`` section 3): when ``n_out >
    n_in`` the Gram matrix is singular and the term is the constant ``log(eps)^2``; for many
    outputs (e.g. 100 classes) the determinant underflows to 0 in float32 and the term is again
    constant with zero gradient. Prefer :func:`smooth_log_condition_number`.

    Args:
      kernel: floating array of ndim >= 2.
      eps: ``>= 0`` added to the determinant (not to the eigenvalues).
      mask: optional pruning mask of the kernel's shape.

    Returns:
      A scalar.
    """
    check_nonnegative("eps", eps)
    w = as_matrix(masked_kernel(kernel, mask))
    w = w.astype(_compute_dtype(w.dtype))
    gram = w.T @ w / w.shape[1]
    return jnp.square(jnp.log(jnp.asarray(eps, w.dtype) + jnp.linalg.det(gram)))


# ----------------------------------------------------------------------------------------------
# Convolutions as operators.
# ----------------------------------------------------------------------------------------------


def _conv_kernel_on_grid(kernel: Any, input_shape: Any) -> tuple[Any, tuple[int, int]]:
    kernel = check_kernel(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"`kernel` must be a 2-D convolution kernel (kh, kw, c_in, c_out), got "
                         f"shape {tuple(kernel.shape)}.")
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (2, 3) or min(shape[:2]) < 1:
        raise ValueError(f"`input_shape` must be the input's (height, width) or (height, width, "
                         f"channels), got {input_shape!r}.")
    if len(shape) == 3 and shape[2] != kernel.shape[2]:
        raise ValueError(f"`input_shape` has {shape[2]} channels but the kernel reads "
                         f"{kernel.shape[2]} (shape {tuple(kernel.shape)}).")
    return kernel, shape[:2]


def _fold_taps(k: Any, h: int, w: int, xp: Any) -> Any:
    # Circular convolution on an h x w grid: tap (a, b) acts at offset (a mod h, b mod w), so a
    # kernel larger than the grid (VGG's 3x3 convs on 2x2 maps) wraps onto it. Zero-pad the tap
    # axes to multiples of (h, w) and sum the wraps.
    kh, kw = k.shape[:2]
    nh, nw = -(-kh // h), -(-kw // w)
    k = xp.pad(k, ((0, nh * h - kh), (0, nw * w - kw), (0, 0), (0, 0)))
    return k.reshape(nh, h, nw, w, *k.shape[2:]).sum(axis=(0, 2))


def conv_operator_singular_values(
    kernel: Any, input_shape: Any, mask: Any | None = None
) -> Array:
    r"""Singular values of the stride-1, circularly padded convolution *operator* of a kernel.

    The reshaped kernel of :func:`as_matrix` (``(kh * kw * c_in, c_out)``) is not the linear map a
    convolution layer applies. For stride 1 with circular padding on an ``h x w`` input, that map
    (``h w c_in -> h w c_out``) is block-doubly-circulant, and the 2-D DFT block-diagonalises it:
    its singular values are the union, over the ``h w`` frequencies ``(u, v)``, of the singular
    values of the ``c_in x c_out`` matrices

        P(u, v) = sum_{a, b} K[a, b, :, :] exp(-2 pi i (u a / h + v b / w))

    (Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019, Theorem 6),
    i.e. of the 2-D FFT of the kernel over the input's grid. A kernel larger than the grid wraps
    onto it. Zero ("SAME") padding gives a different, Toeplitz, operator whose spectrum the
    circular one approximates away from the border; its top singular value is a standard upper
    bound estimate of the layer's Lipschitz constant.

    Args:
      kernel: ``(kh, kw, c_in, c_out)`` convolution kernel (Flax layout).
      input_shape: the layer input's ``(height, width)`` (a trailing channel count is checked
        against ``c_in``).
      mask: optional pruning mask of the kernel's shape.

    Returns:
      The ``h * w * min(c_in, c_out)`` singular values in descending order, in the kernel's
      real compute dtype (at least float32). Differentiable.
    """
    kernel, (h, w) = _conv_kernel_on_grid(kernel, input_shape)
    k = masked_kernel(kernel, mask)
    k = k.astype(_compute_dtype(k.dtype))
    transfer = jnp.fft.fft2(_fold_taps(k, h, w, jnp), axes=(0, 1))  # (h, w, c_in, c_out)
    s = jnp.linalg.svd(transfer, compute_uv=False).reshape(-1)
    return jnp.sort(s)[::-1]


def host_conv_operator_condition_number(
    kernel: Any, input_shape: Any, mask: Any | None = None, *, live: bool = True
) -> dict[str, Any]:
    """Condition number of a conv's circular operator (float64 on the host), for reports.

    See :func:`conv_operator_singular_values`. With ``live=True`` (default) the input channels
    that no weight reads and the output channels with no weight are dropped first (their
    operator singular values are zero by the kernel's structure, at every frequency, as with the
    all-zero rows and columns of :func:`tree_live_condition_numbers`); the live operator is rank
    deficient, and its ``kappa`` infinite, only if its own transfer matrices are. A sparse
    channel pattern (which input channels each filter reads through any tap) can also cap the
    rank of every transfer matrix, whatever the weights: each frequency then keeps only its
    ``live_rank`` largest singular values, ``live_rank`` the pattern's structural rank
    (:func:`host_structural_rank`). Rank deficiency of what is kept uses NumPy's ``matrix_rank``
    tolerance on the operator's shape.

    Returns:
      ``{"kappa", "sigma_max", "live_in", "live_out", "live_rank"}`` (``live_*``: the channels
      kept, and the rank kept per frequency).
    """
    kernel, (h, w) = _conv_kernel_on_grid(kernel, input_shape)
    k = np.asarray(jax.device_get(kernel), np.float64)
    if mask is not None:
        k = k * np.asarray(jax.device_get(mask), np.float64)
    check_finite_kernel("conv kernel", k)
    if live:
        k = k[:, :, np.any(k != 0, axis=(0, 1, 3))][..., np.any(k != 0, axis=(0, 1, 2))]
    c_in, c_out = k.shape[2:]
    rank = host_structural_rank(np.any(k != 0, axis=(0, 1))) if live else min(c_in, c_out)
    if not k.size or not rank:
        return {"kappa": float("inf"), "sigma_max": 0.0, "live_in": int(c_in),
                "live_out": int(c_out), "live_rank": int(rank)}
    per_frequency = np.linalg.svd(np.fft.fft2(_fold_taps(k, h, w, np), axes=(0, 1)),
                                  compute_uv=False)  # (h, w, min(c_in, c_out)), descending
    s = np.sort(per_frequency[..., :rank].ravel())[::-1]
    return {"kappa": host_condition_number(s, (h * w * c_in, h * w * c_out)),
            "sigma_max": float(s[0]), "live_in": int(c_in), "live_out": int(c_out),
            "live_rank": int(rank)}
