r"""A scalable CNC: extreme singular values tracked across steps instead of an SVD per step.

:func:`tscnc_jax.add_condition_number_penalty` differentiates the exact smooth surrogate

    R(M) = tau * logsumexp(s / tau) + tau * logsumexp(-s / tau),   s_i = log(sigma_i + delta)

through a full SVD of every kernel matrix ``M`` (``(fan_in, fan_out)``, see
:func:`tscnc_jax.as_matrix`) at every step: 0.11-0.17 s for one 4608x512 VGG kernel on a CPU
core, and SVDs are slow on accelerators too. Both log-sum-exps weight singular value ``i`` by
``((sigma_i + delta) / (sigma_extreme + delta))^(+-1 / tau)``, so the extremes dominate when
they are separated from the rest. This module keeps ``k`` singular triplets at each end of every
kernel's spectrum in the optimizer state, refines them with a few warm-started iterations per
step and evaluates the surrogate on the tracked set ``T`` (the ``k`` largest and the ``k``
smallest singular values):

    R_k(M) = tau * logsumexp(s_T / tau) + tau * logsumexp(-s_T / tau)

Kernels with ``2 k >= r = min(fan_in, fan_out)`` are tracked whole (refreshed by an exact SVD
each step, they are small), where ``R_k = R`` (:func:`block_sizes`).

**Numerical method** (per kernel, per step). Let ``A`` be ``M`` or ``M^T``, whichever is tall, so
that ``A`` is ``p x q`` with ``p >= q = r`` and its Gram matrix ``G = A^T A`` is the *small* side
(512x512 for a 3x3x512x512 conv). ``G`` is formed once per step (one matmul, ``2 p q^2`` flops,
the dominant cost), normalised by its trace (scale-free shifts, no overflow), then

* *top block*: orthogonal (subspace) iteration ``X <- qr(G X)``, warm-started from the previous
  step's right singular vectors. The angle to the ``i``-th right singular vector shrinks by
  ``(sigma_{k+1} / sigma_i)^2`` per iteration. For ``k = 1`` this is the warm-started power
  iteration of spectral normalisation (Miyato et al. 2018).
* *bottom block*: inverse orthogonal iteration ``Y <- qr((G + mu I)^{-1} Y)`` with the Cholesky
  factor of ``G + mu I`` (one ``q^3 / 3`` factorisation, then two triangular solves per
  iteration), warm-started likewise. The angle to the ``i``-th smallest right singular vector
  shrinks by ``(sigma_{r-i+1}^2 + mu) / (sigma_{r-k}^2 + mu)`` per iteration: fast exactly where
  the condition number is large. Inverse iteration is chosen over a shifted power iteration on
  ``sigma_max^2 I - G``, whose rate ``(sigma_1^2 - sigma_{r-k}^2) / (sigma_1^2 - sigma_r^2)`` is
  ``1 - O(kappa^-2)`` (it practically stalls on ill-conditioned kernels, the case that matters),
  and over Lanczos / conjugate gradients on ``G``, whose convergence degrades with ``kappa(G) =
  kappa(A)^2``.
* *shift*: ``mu = c * eps * lambda_1(G)`` with ``c = CHOLESKY_SHIFT`` (10) and ``eps`` the compute
  dtype's machine epsilon. The computed Gram matrix of a rank-deficient kernel (pruned kernels,
  zero columns, duplicated filters) is only positive *semi*-definite, and rounding leaves
  eigenvalues down to about ``-eps * lambda_1`` (measured: ``-9e-8 lambda_1`` in float32, where
  ``c = 1`` already sufficed), on which Cholesky breaks down; the shift restores definiteness. It
  does not change the eigenvectors, only slows convergence among singular values below
  ``sqrt(mu) ~ 1e-3 sigma_1`` (float32), which ``delta`` flattens anyway. Should the factorisation
  still fail (non-finite factor), it is recomputed with a 1000x larger shift; should a block be
  non-finite after that (non-finite parameters), its previous vectors are kept.
* *Rayleigh-Ritz with A, not G*: each block ``X`` is rotated onto the Ritz vectors of ``A``
  (eigenvectors of the ``k x k`` matrix ``(A X)^T (A X)``) and each Ritz value is re-read as the
  norm ``||A x_i||`` of its own column, which also gives the left vector ``A x_i / ||A x_i||``.
  Reading values off ``A`` avoids squaring the condition number, and by Cauchy interlacing the
  tracked extremes always lie *inside* the spectrum (``sigma_top,i <= sigma_i``,
  ``sigma_bottom,i >= sigma_{r-i+1}``): the tracked ``log kappa`` and ``R_k`` never exceed their
  exact values (up to rounding). The estimator errs on the side of a smaller penalty.

*Float32 resolution.* ``G`` is formed in working precision, so its eigenvectors below ``~eps *
sigma_1^2`` are noise. Measured at convergence in float32 (576x64 and 4608x512 kernels with
log-spaced spectra): ``sigma_min`` to <= 4e-7 relative for ``kappa <= 100``, 2e-5..3e-4 at
``kappa = 1e3``, 1-2 % at ``3e3``, 25-45 % at ``1e4``; beyond that the tracked ``sigma_min`` is an
upper bound that saturates near ``6e-5 sigma_max``, i.e. the tracked ``kappa`` saturates at about
``2e4`` (in float64: 2e-3 relative at ``kappa = 1e8``, saturation near ``1e-9 sigma_max``). With
``delta = 1e-3`` and ``sigma_max ~ 1`` the penalty's sensitivity ends at a similar scale
(``sigma_min << delta`` all look alike); for accurate *reporting* of large condition
numbers use :func:`tscnc_jax.tree_condition_numbers` (float64 SVD on the host). Matmuls use
``precision=HIGHEST`` so that accelerators do not fall back to bfloat16 passes.

**Truncation error** (at convergence). With ``rho_top = (sigma_{k+1} + delta) / (sigma_1 +
delta)`` and ``rho_bottom = (sigma_r + delta) / (sigma_{r-k} + delta)``,

    0 <= R(M) - R_k(M) <= tau log(1 + (r - 2k) rho_top^(1/tau))
                          + tau log(1 + (r - 2k) rho_bottom^(1/tau))          (truncation_bound)

and ``R_k`` is itself a smooth upper bound of the tracked log condition number: ``log
kappa_T(M + delta) <= R_k(M) <= log kappa_T(M + delta) + 2 tau log(2 k)`` (tighter than ``R``'s
``2 tau log r`` slack), with ``kappa_T(M + delta) = (sigma_top,1 + delta) / (sigma_bottom,1 +
delta)``. The bound is small when the extremes are separated (``rho^10 = 0.39`` for a 10 % gap at
``tau = 0.1``) and vacuous on a flat spectrum.

**Gradient, and how large k must be.** With the tracked unit vectors held fixed
(``stop_gradient``), ``sigma_i = u_i^T M v_i`` has gradient ``u_i v_i^T``, which is ``d sigma_i
/ dM`` when ``(u_i, v_i)`` is a singular pair, so autodiff of ``R_k`` gives ``sum_{i in T}
dR_k/dsigma_i u_i v_i^T``. At convergence its cosine with the exact ``grad R`` depends only on the
spectrum, ``tau``, ``delta`` and ``k`` (:func:`converged_gradient_cosine`; :func:`minimal_k` gives
the smallest ``k`` reaching a target cosine for a model's kernels): ``R`` weights ``sigma_i`` by
``softmax(+-s / tau)_i``, so ``k`` must cover the singular values within a factor ``~exp(2 tau)``
(+-22 % at ``tau = 0.1``) of each extreme. Measured at ``tau = 0.1``: ``k = 1`` gives cosine
>= 0.99 for separated extremes (log-spaced spectra, square Gaussian matrices whose smallest
singular value is isolated), but He-initialised tall kernels have Marchenko-Pastur spectra whose
edges are packed: VGG-16's 4608x512 convs need ``k ~ 125`` (cosine 0.24 at ``k = 1``, 0.72 at 16,
0.95 at 64), the 1152x128 ones ``k ~ 31``, the SmallCNN's 3136x128 Dense ``k ~ 41``. There the
tracked penalty is a *different* (sharper) condition-number surrogate that pushes only the
extremes; it still drives ``kappa`` down (tests: 118 -> < 2 on a 64x64 matrix with ``k = 1``).
Small ``k`` also converges slowly on flat spectra: with ``k = 1`` and 2 iterations per step the
tracked ``log kappa`` of a kernel with ``kappa ~ 2`` lagged the exact one by up to 20 % in a
training run, with ``k = 4`` by < 0.1 %. Since the ``k`` a cosine needs varies by layer, ``k`` can
be given per kernel: ``add_tracked_condition_number_penalty(w, k=minimal_k(params))`` tracks
each kernel with its own smallest ``k`` for cosine 0.99 (the small CNN: 1, 10, 41, 4), at a
fraction of the cost of one large ``k`` everywhere (``benchmarks/results/run.md``).

Exactly zero singular values (an all-zero kernel, ``A x = 0`` exactly) get a zero left vector
and hence no gradient; numerically zero ones (a dead unit) get the normalised rounding noise of
``A x``, an arbitrary unit vector, as LAPACK's SVD gives the exact penalty. Under a pruning mask
both gradients are masked like the kernel.

**Resynchronisation.** On the first update and every ``resync_every`` updates the vectors are
re-seeded from an exact SVD (a :func:`jax.lax.cond` on the step count, so the step compiles once;
under :func:`jax.vmap` a ``cond`` becomes a select and both branches run every step).

Cost per step for a ``p x q`` kernel tracked with ``2 k < q``: ``2 p q^2`` (Gram) ``+ q^3 / 3``
(Cholesky) ``+ O(iterations q^2 k + p q k + p k^2)`` flops, against a full SVD's ``O(p q^2)`` with
a large constant and poor parallelism; the state holds ``2 k (p + q)`` numbers per kernel.

References:
  G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed. (2013): §8.2 (power, inverse and
  orthogonal iteration, Rayleigh-Ritz), §4.2 (Cholesky), §8.6 (the SVD and interlacing).
  T. Miyato, T. Kataoka, M. Koyama, Y. Yoshida, "Spectral Normalization for Generative
  Adversarial Networks", ICLR 2018 (arXiv 1802.05957): one warm-started power iteration per step.
  N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed. (2002), ch. 10
  (when Cholesky succeeds in floating point).
  Y. Feng, S.-H. J. Lin, B. Gao, X. Wei, arXiv 2503.20454 (2025): the CNC penalty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from tscnc_jax import _validation, defaults, penalties, spectral, transforms, tree_utils

Array = jax.Array

#: The Cholesky shift is ``CHOLESKY_SHIFT * eps * lambda_1(G)`` (see the module docstring).
CHOLESKY_SHIFT = 10.0
#: Factor applied to the shift when the first factorisation breaks down.
_FALLBACK_SHIFT_FACTOR = 1e3
_HIGHEST = lax.Precision.HIGHEST

#: ``k`` of the tracked CNC: one int for every kernel, or ``{kernel path: int}`` (e.g. from
#: :func:`minimal_k`), since the ``k`` a target gradient cosine needs varies by layer.
KSpec = int | Mapping[str, int]


class TrackedSingularVectors(NamedTuple):
    """Tracked extreme singular triplets of one kernel matrix ``M`` (``(fan_in, fan_out)``).

    Column ``i`` of ``u_top`` / ``v_top`` belongs to the ``(i+1)``-th largest singular value,
    column ``i`` of ``u_bottom`` / ``v_bottom`` to the ``(i+1)``-th smallest; ``sigma_i = u_i^T M
    v_i``. The blocks have ``(k_top, k_bottom) = block_sizes(M.shape, k)`` columns: ``(k, k)``,
    or ``(r, 0)`` when the whole spectrum is tracked.

    Attributes:
      u_top: ``(fan_in, k_top)`` left singular vectors of the largest singular values.
      v_top: ``(fan_out, k_top)`` right singular vectors of the largest singular values.
      u_bottom: ``(fan_in, k_bottom)`` left singular vectors of the smallest singular values.
      v_bottom: ``(fan_out, k_bottom)`` right singular vectors of the smallest singular values.
    """

    u_top: Array
    v_top: Array
    u_bottom: Array
    v_bottom: Array


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


def _check_k(k: Any) -> int | dict[str, int]:
    if isinstance(k, Mapping):
        if not k:
            raise ValueError("`k` is an empty mapping; give an int or one entry per kernel.")
        return {str(name): _validation.check_int(f"k[{name!r}]", v) for name, v in k.items()}
    return _validation.check_int("k", k)


def _ks_for(k: int | dict[str, int], names: list[str]) -> dict[str, int]:
    """``{name: k}`` for the selected kernels; a mapping must name exactly those kernels."""
    if not isinstance(k, dict):
        return dict.fromkeys(names, k)
    missing, extra = sorted(set(names) - set(k)), sorted(set(k) - set(names))
    if missing or extra:
        raise ValueError(
            f"`k` must map every selected kernel to an int: missing {missing}, unknown {extra} "
            f"(selected kernels: {names}); `minimal_k(params)` builds such a mapping."
        )
    return {name: k[name] for name in names}


def _check_surrogate(temperature: Any, delta: Any) -> None:
    _validation.check_nonnegative("temperature", temperature, strict=True)
    _validation.check_nonnegative("delta", delta)


# ----------------------------------------------------------------------------------------------
# One kernel.
# ----------------------------------------------------------------------------------------------


def _matrix(kernel: Any, mask: Any | None) -> Array:
    m = spectral.as_matrix(spectral.masked_kernel(kernel, mask))
    return m.astype(spectral._compute_dtype(m.dtype))


def block_sizes(shape: tuple[int, int], k: int) -> tuple[int, int]:
    """``(k_top, k_bottom)`` tracked for a ``shape`` matrix: ``(k, k)``, or ``(r, 0)`` (the
    whole spectrum, refreshed by an exact SVD) when ``2 k >= r = min(shape)``."""
    r = min(shape)
    return (r, 0) if 2 * k >= r else (k, k)


def _live_counts(m: Array, live: bool) -> tuple[Array, Array]:
    """``(bound, rank)``: ``min(live rows, live columns)`` of ``m`` and its structural rank
    (:func:`tscnc_jax.live_singular_value_count`); both ``min(fan_in, fan_out)`` when
    ``live=False``."""
    if not live:
        full = jnp.asarray(min(m.shape), jnp.int32)
        return full, full
    return (spectral.live_singular_value_count(m, structural=False),
            spectral.live_singular_value_count(m))


def _exact_vectors(m: Array, k_top: int, k_bottom: int,
                   bound: Array | None = None) -> TrackedSingularVectors:
    # The bottom block holds the smallest singular values of the live rows and columns: indices
    # bound - 1, bound - 2, ... of the descending SVD (the zeros of all-zero rows and columns
    # behind them are left out), where the refinement's iteration converges.
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    v = vt.T
    last = min(m.shape) if bound is None else bound
    idx = jnp.clip(last - 1 - jnp.arange(k_bottom), 0, min(m.shape) - 1)
    return TrackedSingularVectors(
        u_top=u[:, :k_top],
        v_top=v[:, :k_top],
        u_bottom=jnp.take(u, idx, axis=1),
        v_bottom=jnp.take(v, idx, axis=1),
    )


def _orthonormalize(x: Array, previous: Array) -> Array:
    """Orthonormal basis of span(``x``); ``previous`` if ``x`` vanished (a zero kernel)."""
    if x.shape[1] == 1:
        norm = jnp.linalg.norm(x)
        return jnp.where(norm > 0, x / jnp.where(norm > 0, norm, 1.0), previous)
    return jnp.linalg.qr(x)[0]


def _ritz(a: Array, x: Array) -> tuple[Array, Array]:
    """Rayleigh-Ritz of ``A`` on span(``x``) (orthonormal columns), ascending Ritz values.

    The Ritz vectors ``z`` are the eigenvectors of the ``k x k`` matrix ``W^T W`` with ``W = A
    x`` (cheaper than an SVD of ``W`` for large blocks); each Ritz value is then re-read as the
    norm of its own column ``W z_i``, which keeps the small ones accurate even when the block
    spans a wide range. Returns the left vectors ``W z_i / sigma_i`` and the rotated right
    vectors ``x z``. For an exactly zero Ritz value (``A x z_i = 0``, e.g. an all-zero kernel)
    the left vector is set to 0, so that value gets no gradient; a numerically zero one (a dead
    unit) gets the normalised rounding noise, an arbitrary unit vector as from LAPACK's SVD.
    """
    w = jnp.matmul(a, x, precision=_HIGHEST)
    _, z = jnp.linalg.eigh(jnp.matmul(w.T, w, precision=_HIGHEST))
    wz = jnp.matmul(w, z, precision=_HIGHEST)
    sigma = jnp.linalg.norm(wz, axis=0)
    left = jnp.where(sigma > 0, wz / jnp.where(sigma > 0, sigma, 1.0), 0.0)
    return left, jnp.matmul(x, z, precision=_HIGHEST)


def _normalized_gram(a: Array) -> Array:
    gram = jnp.matmul(a.T, a, precision=_HIGHEST)
    gram = 0.5 * (gram + gram.T)
    trace = jnp.trace(gram)
    return gram / jnp.where(trace > 0, trace, 1.0)  # eigenvalues in [0, 1], summing to 1


def _bottom_block(a: Array, x: Array, live_cols: Array, lam1: Array,
                  iterations: int) -> tuple[Array, Array]:
    """Inverse orthogonal iteration for the smallest singular values of ``a``'s live columns.

    ``a`` is ``p x q``; its dead (all-zero) columns are exact null directions ``e_j`` of the Gram
    matrix. They are lifted to eigenvalue 1 (the top of the trace-normalised spectrum, so the
    inverse iteration suppresses them) and projected out of the block after every solve, so the
    block converges to the smallest singular values of the live columns. Returns ``(left, right)``
    (Ritz pairs of ``a``, ascending).
    """
    q, dtype = a.shape[1], a.dtype
    live = live_cols.astype(dtype)[:, None]
    gram = _normalized_gram(a) + jnp.diag(1.0 - live[:, 0])
    eye = jnp.eye(q, dtype=dtype)
    shift = CHOLESKY_SHIFT * jnp.finfo(dtype).eps * lam1
    chol = jnp.linalg.cholesky(gram + shift * eye)
    chol = lax.cond(
        jnp.all(jnp.isfinite(chol)),
        lambda c: c,
        lambda c: jnp.linalg.cholesky(gram + _FALLBACK_SHIFT_FACTOR * shift * eye),
        chol,
    )

    def step(_, y):
        return _orthonormalize(live * jax.scipy.linalg.cho_solve((chol, True), y), y)

    new = lax.fori_loop(0, iterations, step, x)
    new = jnp.where(jnp.all(jnp.isfinite(new)), new, x)
    return _ritz(a, new)


def _refine_vectors(
    m: Array, vec: TrackedSingularVectors, iterations: int, live: bool = True
) -> TrackedSingularVectors:
    m = lax.stop_gradient(m)
    k_top, k_bottom = vec.u_top.shape[1], vec.u_bottom.shape[1]
    if k_bottom == 0:  # the whole spectrum is tracked: small kernel, exact SVD
        return _exact_vectors(m, k_top, 0)
    transposed = m.shape[0] < m.shape[1]
    a = m.T if transposed else m  # p x q with p >= q: the Gram matrix is q x q
    p, q = a.shape
    # A's sides: the right (q) side is iterated on, the left (p) side is the other one.
    right = (vec.u_top, vec.u_bottom) if transposed else (vec.v_top, vec.v_bottom)
    left = (vec.v_bottom,) if transposed else (vec.u_bottom,)
    x_top, x_bottom = (lax.stop_gradient(x) for x in right)
    y_bottom = lax.stop_gradient(left[0])

    gram = _normalized_gram(a)

    def top_step(_, x):
        return _orthonormalize(jnp.matmul(gram, x, precision=_HIGHEST), x)

    new_top = lax.fori_loop(0, iterations, top_step, x_top)
    new_top = jnp.where(jnp.all(jnp.isfinite(new_top)), new_top, x_top)
    # lambda_1(G) >= trace / q = 1 / q; the Rayleigh quotient of the top block is a lower bound.
    rayleigh = jnp.max(jnp.sum(new_top * jnp.matmul(gram, new_top, precision=_HIGHEST), axis=0))
    lam1 = jnp.maximum(rayleigh, 1.0 / q)

    if live:
        nonzero = a != 0
        live_p, live_q = jnp.any(nonzero, axis=1), jnp.any(nonzero, axis=0)
    else:
        live_p, live_q = jnp.ones(p, bool), jnp.ones(q, bool)

    def column_side(_):
        # At least as many live rows as live columns: the live spectrum is that of the live
        # columns' q x q Gram matrix, dead columns lifted out of the way.
        return _bottom_block(a, x_bottom, live_q, lam1, iterations)

    def row_side(_):
        # Fewer live rows than live columns (a wide live block inside a tall kernel): the Gram
        # matrix of the columns has non-structural null directions, so iterate on the rows'
        # instead. The live rows (< q of them) are gathered into q slots, padded with dead rows.
        idx = jnp.argsort(~live_p, stable=True)[:q]
        b_t = a[idx].T  # q x q; its columns are the gathered rows of A
        # b_t's left vectors are A's right ones, its right vectors A's left ones (in slots).
        v_side, u_slots = _bottom_block(b_t, y_bottom[idx], live_p[idx], lam1, iterations)
        return jnp.zeros((p, k_bottom), a.dtype).at[idx].set(u_slots), v_side

    rows_short = jnp.sum(live_p) < jnp.sum(live_q)
    left_bottom, right_bottom = lax.cond(rows_short, row_side, column_side, None)
    left_top, right_top = _ritz(a, new_top)
    left_top, right_top = left_top[:, ::-1], right_top[:, ::-1]  # descending
    if transposed:  # A = M^T: A's right vectors are M's left vectors
        return TrackedSingularVectors(right_top, left_top, right_bottom, left_bottom)
    return TrackedSingularVectors(left_top, right_top, left_bottom, right_bottom)


def _tracked_sigmas(m: Array, vec: TrackedSingularVectors) -> tuple[Array, Array]:
    vec = jax.tree.map(lambda x: lax.stop_gradient(x.astype(m.dtype)), vec)

    def sigmas(u, v):  # diag(U^T M V), differentiable in M only
        return jnp.sum(u * jnp.matmul(m, v, precision=_HIGHEST), axis=0)

    return sigmas(vec.u_top, vec.v_top), sigmas(vec.u_bottom, vec.v_bottom)


def _tracked_keep(k_top: int, k_bottom: int, bound: Array, rank: Array) -> Array:
    """Which tracked values are live and counted once.

    The top block's first ``rank`` entries. The bottom block converges to the smallest singular
    values of the live rows and columns (``bound`` of them), the first ``bound - rank`` of which
    are the structural zeros of a pattern-deficient live block: its entries ``bound - rank <= i
    < bound - k_top`` (the upper limit keeps a live spectrum shorter than ``k_top + k_bottom``
    from being counted twice). Without ``live``, ``bound = rank = min(fan_in, fan_out)``.
    """
    i = jnp.arange(k_bottom)
    return jnp.concatenate([jnp.arange(k_top) < rank,
                            (i >= bound - rank) & (i < bound - k_top)])


def _surrogate(m: Array, vec: TrackedSingularVectors, temperature: Any, delta: Any,
               live: bool) -> Array:
    # Both soft extremes over the union of the tracked values: with disjoint blocks this is the
    # exact surrogate restricted to the tracked singular values (exact when they cover all).
    top, bottom = _tracked_sigmas(m, vec)
    keep = _tracked_keep(top.shape[0], bottom.shape[0], *_live_counts(lax.stop_gradient(m), live))
    return spectral.smooth_log_range(jnp.concatenate([top, bottom]), temperature=temperature,
                                     delta=delta, keep=keep)


def _check_vectors(name: str, m: Array, vec: Any) -> TrackedSingularVectors:
    if not isinstance(vec, TrackedSingularVectors):
        raise ValueError(f"`vectors[{name!r}]` must be a TrackedSingularVectors, got {type(vec)}.")
    fan_in, fan_out = m.shape
    k_top = vec.u_top.shape[-1] if vec.u_top.ndim == 2 else -1
    k_bottom = vec.u_bottom.shape[-1] if vec.u_bottom.ndim == 2 else -1
    expected = ((fan_in, k_top), (fan_out, k_top), (fan_in, k_bottom), (fan_out, k_bottom))
    got = tuple(tuple(x.shape) for x in vec)
    if k_top < 1 or (k_top, k_bottom) != block_sizes((fan_in, fan_out), k_top) or got != expected:
        raise ValueError(
            f"`vectors[{name!r}]` has shapes {got}, which do not fit the {fan_in}x{fan_out} "
            "kernel matrix; build them with `init_tracked_vectors` for these parameters."
        )
    return vec


def _kernels_with_vectors(params, vectors, masks, filter_fn):
    leaves = tree_utils.named_leaves(params, masks, filter_fn)
    names = [name for name, _, _ in leaves]
    if not isinstance(vectors, dict) or sorted(vectors) != sorted(names):
        got = sorted(vectors) if isinstance(vectors, dict) else type(vectors)
        raise ValueError(
            f"`vectors` must have one entry per selected kernel {names}, got {got}; build them "
            "with `init_tracked_vectors` using the same `masks` and `filter_fn`."
        )
    out = []
    for name, kernel, mask in leaves:
        m = _matrix(kernel, mask)
        out.append((name, m, _check_vectors(name, m, vectors[name])))
    return out


# ----------------------------------------------------------------------------------------------
# Tree functions.
# ----------------------------------------------------------------------------------------------


def init_tracked_vectors(
    params: Any,
    *,
    k: KSpec = 1,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
    live: bool = True,
) -> dict[str, TrackedSingularVectors]:
    """Exact extreme singular vectors of every selected (pruned) kernel, from a thin SVD.

    Args:
      params: a pytree of parameters.
      k: number of singular triplets tracked at each end, an int for every kernel or
        ``{kernel path: int}`` naming every selected kernel (:func:`minimal_k`'s output);
        kernels with ``2 k >= min(fan_in, fan_out)`` track their whole spectrum (see
        :func:`block_sizes`).
      masks: optional masks tree (``None`` leaves are not pruned).
      filter_fn: ``(path, leaf) -> bool`` choosing the kernels; default
        :func:`tscnc_jax.tree_utils.is_kernel`.
      live: the bottom block takes the smallest *live* singular values (default), not the
        structural zeros of a pruned kernel (see :func:`tscnc_jax.live_singular_value_count`).

    Returns:
      ``{kernel path: TrackedSingularVectors}`` in the kernels' compute dtype (at least float32).
    """
    leaves = tree_utils.named_leaves(params, masks, filter_fn)
    ks = _ks_for(_check_k(k), [name for name, _, _ in leaves])
    return {
        name: _exact_vectors(m, *block_sizes(m.shape, ks[name]), _live_counts(m, live)[0])
        for name, m in ((n, _matrix(w, msk)) for n, w, msk in leaves)
    }


def _placeholder_vectors(params, k, masks, filter_fn) -> dict[str, TrackedSingularVectors]:
    out = {}
    leaves = tree_utils.named_leaves(params, masks, filter_fn)
    ks = _ks_for(k, [name for name, _, _ in leaves])
    for name, kernel, _ in leaves:
        _validation.check_kernel(kernel, name)
        fan_in, fan_out = spectral.as_matrix(kernel).shape
        k_top, k_bottom = block_sizes((fan_in, fan_out), ks[name])
        dtype = spectral._compute_dtype(kernel.dtype)
        out[name] = TrackedSingularVectors(
            jnp.eye(fan_in, k_top, dtype=dtype), jnp.eye(fan_out, k_top, dtype=dtype),
            jnp.eye(fan_in, k_bottom, dtype=dtype), jnp.eye(fan_out, k_bottom, dtype=dtype),
        )
    return out


def refine_tracked_vectors(
    params: Any,
    vectors: dict[str, TrackedSingularVectors],
    *,
    iterations: int = 2,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
    live: bool = True,
) -> dict[str, TrackedSingularVectors]:
    """Warm-started refinement of the tracked vectors for the current parameters.

    Per kernel: ``iterations`` steps of orthogonal iteration on the Gram matrix (top block) and
    of Cholesky-based inverse orthogonal iteration (bottom block), then a Rayleigh-Ritz step with
    the kernel matrix itself (see the module docstring). No gradient flows through the result.

    Args:
      params: a pytree of parameters.
      vectors: the previous vectors (from :func:`init_tracked_vectors` or an earlier refinement).
      iterations: iterations per block (``>= 1``).
      masks, filter_fn, live: as in :func:`init_tracked_vectors`. With ``live`` the bottom
        block converges to the smallest live singular values: the all-zero columns of the
        iterated side are lifted out of the way and projected out, and when the live block has
        fewer rows than columns the iteration runs on the rows' Gram matrix instead (see
        ``_refine_vectors``).

    Returns:
      Refined vectors with the structure of ``vectors``.
    """
    iterations = _validation.check_int("iterations", iterations)
    return {
        name: _refine_vectors(m, vec, iterations, live)
        for name, m, vec in _kernels_with_vectors(params, vectors, masks, filter_fn)
    }


def tracked_singular_values(
    params: Any,
    vectors: dict[str, TrackedSingularVectors],
    *,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
) -> dict[str, tuple[Array, Array]]:
    """``{path: (sigma_top, sigma_bottom)}`` with ``sigma_i = u_i^T M v_i`` (descending /
    ascending), differentiable in ``params`` with the vectors held fixed."""
    return {
        name: _tracked_sigmas(m, vec)
        for name, m, vec in _kernels_with_vectors(params, vectors, masks, filter_fn)
    }


def tracked_log_condition_numbers(
    params: Any,
    vectors: dict[str, TrackedSingularVectors],
    *,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
    live: bool = True,
) -> dict[str, Array]:
    """Tracked ``log kappa = log(sigma_top,1 / sigma_bottom,1)`` of every kernel (diagnostics).

    A lower bound of the exact ``log kappa`` when the vectors come from
    :func:`refine_tracked_vectors` (Rayleigh-Ritz values lie inside the spectrum); ``inf`` when
    the tracked smallest singular value is 0. No ``delta`` is involved. Works under ``jit``.
    With ``live`` (default) only the tracked values of the live spectrum count.
    """
    out = {}
    for name, m, vec in _kernels_with_vectors(params, vectors, masks, filter_fn):
        top, bottom = _tracked_sigmas(m, vec)
        keep = _tracked_keep(top.shape[0], bottom.shape[0], *_live_counts(m, live))
        keep = keep.at[0].set(True)
        union = jnp.concatenate([top, bottom])
        smax = jnp.max(jnp.where(keep, union, -jnp.inf))
        smin = jnp.min(jnp.where(keep, union, jnp.inf))
        out[name] = jnp.where(smin > 0, jnp.log(smax) - jnp.log(jnp.where(smin > 0, smin, 1.0)),
                              jnp.inf)
    return out


def tracked_condition_number_penalty(
    params: Any,
    vectors: dict[str, TrackedSingularVectors],
    *,
    temperature: float | Array = defaults.CNC_TEMPERATURE,
    delta: float | Array = defaults.CNC_DELTA,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
    reduce: Literal["mean", "sum"] = defaults.CNC_REDUCE,
    live: bool = True,
) -> Array:
    r"""The CNC surrogate over tracked extreme singular values, reduced over the kernels.

    Per kernel, ``R_k = tau * logsumexp(s_T / tau) + tau * logsumexp(-s_T / tau)`` with ``s_T =
    log(sigma + delta)`` over the tracked set (top and bottom blocks) and ``sigma_i = u_i^T M
    v_i`` for the fixed tracked vectors (see the module docstring for the truncation bound). The
    gradient is ``sum_i dR_k/dsigma_i u_i v_i^T`` per kernel (masked like the kernel). Pass
    vectors refined at these ``params`` (:func:`refine_tracked_vectors`); vectors of nearby
    parameters give the value to first order (``d sigma = u^T dM v``).

    Args:
      params: a pytree of parameters.
      vectors: ``{path: TrackedSingularVectors}`` for the selected kernels.
      temperature: ``tau > 0``.
      delta: singular-value shift ``>= 0``.
      masks: optional masks tree; pruned kernels ``M * mask`` are used.
      filter_fn: ``(path, leaf) -> bool`` choosing the kernels.
      reduce: ``"mean"`` (default) or ``"sum"`` over the kernels.
      live: only the tracked values of each kernel's live spectrum enter (default), as in
        :func:`tscnc_jax.smooth_log_condition_number`; tracked values beyond the live spectrum
        (a kernel with fewer than ``2 k`` live singular values) are left out, and none is
        counted twice.

    Returns:
      A scalar in the compute dtype (0 when no kernel is selected).
    """
    penalties.check_reduce(reduce)
    _check_surrogate(temperature, delta)
    terms = [
        _surrogate(m, vec, temperature, delta, live)
        for _, m, vec in _kernels_with_vectors(params, vectors, masks, filter_fn)
    ]
    return penalties.reduce_terms(terms, reduce)


# ----------------------------------------------------------------------------------------------
# Host-side analysis of the truncation (NumPy, float64).
# ----------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def _tracked_set(r: int, k: int) -> np.ndarray:
    k_top, k_bottom = block_sizes((r, r), k)
    return np.r_[0:k_top, r - k_bottom:r]


def truncation_bound(s: Any, *, k: int, temperature: float, delta: float) -> float:
    """Upper bound of ``R - R_k >= 0`` at convergence, for descending singular values ``s``.

    ``tau log(1 + (r - 2k) rho_top^(1/tau)) + tau log(1 + (r - 2k) rho_bottom^(1/tau))`` with
    ``rho_top = (sigma_{k+1} + delta) / (sigma_1 + delta)`` and ``rho_bottom = (sigma_r + delta)
    / (sigma_{r-k} + delta)``; 0 when ``2 k >= r`` (the whole spectrum is tracked).
    """
    s = np.asarray(s, np.float64)
    r, tau = s.size, float(temperature)
    if 2 * k >= r:
        return 0.0
    rho_top = (s[k] + delta) / (s[0] + delta)
    rho_bottom = (s[-1] + delta) / (s[-k - 1] + delta)
    return float(tau * np.log1p((r - 2 * k) * rho_top ** (1 / tau))
                 + tau * np.log1p((r - 2 * k) * rho_bottom ** (1 / tau)))


def converged_gradient_cosine(s: Any, *, k: int, temperature: float, delta: float) -> float:
    r"""Cosine between ``grad R_k`` (exact tracked triplets) and ``grad R`` for spectrum ``s``.

    Both gradients are combinations of the Frobenius-orthonormal matrices ``u_i v_i^T``: ``grad
    R`` with coefficients ``(p_i - q_i) / (sigma_i + delta)``, ``p = softmax(s / tau)`` and ``q =
    softmax(-s / tau)`` over all singular values, ``grad R_k`` with the same expression where
    both softmaxes run over the tracked set only (the ``k`` largest and ``k`` smallest) and
    untracked coefficients are 0. The cosine is therefore a function of the descending singular
    values ``s``, ``tau``, ``delta`` and ``k`` alone; it is 1 when ``2 k >= r`` and when both
    gradients vanish (all singular values equal). Masks are not modelled (they multiply both
    gradients elementwise).
    """
    s = np.asarray(s, np.float64)
    r = s.size
    if 2 * int(k) >= r:
        return 1.0
    tau = float(temperature)
    logs = np.log(s + delta)
    exact = (_softmax(logs / tau) - _softmax(-logs / tau)) / (s + delta)
    idx = _tracked_set(r, int(k))
    tracked = np.zeros(r)
    tracked[idx] = (_softmax(logs[idx] / tau) - _softmax(-logs[idx] / tau)) / (s[idx] + delta)
    n_exact, n_tracked = np.linalg.norm(exact), np.linalg.norm(tracked)
    negligible = 1e-12 / (s[-1] + delta)  # relative to the largest possible coefficient
    if n_exact <= negligible and n_tracked <= negligible:
        return 1.0  # (nearly) equal singular values: both gradients vanish
    if n_exact == 0.0 or n_tracked == 0.0:
        return 0.0
    return float(np.dot(exact, tracked) / (n_exact * n_tracked))


def minimal_k(
    params: Any,
    *,
    cosine: float = 0.99,
    temperature: float = defaults.CNC_TEMPERATURE,
    delta: float = defaults.CNC_DELTA,
    masks: Any | None = None,
    filter_fn: tree_utils.FilterFn | None = None,
    live: bool = True,
) -> dict[str, int]:
    """Smallest ``k`` per kernel whose converged gradient cosine reaches ``cosine``.

    Uses one host float64 SVD per kernel (:func:`tscnc_jax.spectral.tree_singular_values`) and
    :func:`converged_gradient_cosine`; a planning tool, not for use inside a training step. The
    result is a valid ``k`` for :func:`add_tracked_condition_number_penalty` and
    :func:`init_tracked_vectors`. It holds for the spectra of ``params``; training changes them
    (pruning in particular), so re-plan from a checkpoint when they have moved. With ``live``
    (default) each kernel's live spectrum is planned for, as the penalty uses it.
    """
    if not 0.0 < cosine <= 1.0:
        raise ValueError(f"`cosine` must be in (0, 1], got {cosine!r}.")
    out = {}
    spectra = spectral.tree_singular_values(params, masks, filter_fn)
    shapes = spectral.tree_live_condition_numbers(params, masks, filter_fn) if live else {}
    for name, (s, _) in spectra.items():
        if live:
            s = s[:max(1, min(shapes[name]["live_rows"], shapes[name]["live_cols"]))]
        r = s.size
        k = next((k for k in range(1, r + 1) if converged_gradient_cosine(
            s, k=k, temperature=temperature, delta=delta) >= cosine), r)
        out[name] = k
    return out


# ----------------------------------------------------------------------------------------------
# optax transformation.
# ----------------------------------------------------------------------------------------------


def add_tracked_condition_number_penalty(
    weight: optax.ScalarOrSchedule,
    *,
    temperature: float = defaults.CNC_TEMPERATURE,
    delta: float = defaults.CNC_DELTA,
    k: KSpec = 1,
    iterations: int = 2,
    resync_every: int | None = 100,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["mean", "sum"] = defaults.CNC_REDUCE,
    live: bool = True,
) -> optax.GradientTransformation:
    r"""Adds ``weight * grad R_k`` (the tracked CNC penalty) to the updates.

    A drop-in replacement for :func:`tscnc_jax.add_condition_number_penalty` (``form="smooth"``)
    for large kernels: per step and kernel, one Gram matmul, one Cholesky factorisation of the
    small side and ``iterations`` warm-started iterations replace the full SVD (see the module
    docstring for the method, its accuracy and the choice of ``k``). Each update

    1. re-seeds the vectors from an exact SVD if ``count % resync_every == 0`` (always on the
       first update), otherwise refines the previous ones (:func:`refine_tracked_vectors`);
    2. adds ``weight(count) * grad tracked_condition_number_penalty(params, vectors)``;
    3. stores the vectors, the unweighted value and ``count + 1``.

    All state is arrays (the step compiles once and runs under ``shard_map`` with
    replicated parameters). Inside :func:`tscnc_jax.sparsify` the penalty sees the pruned kernels.
    With :func:`optax.inject_hyperparams`, pass ``static_args=("k", "iterations",
    "resync_every", "filter_fn")``: those fix shapes and loop lengths.

    Args:
      weight: ``lambda_c >= 0``, a scalar or a schedule of the step count.
      temperature: surrogate temperature ``tau > 0``.
      delta: singular-value shift ``>= 0``.
      k: singular triplets tracked at each end of every kernel's spectrum (``>= 1``; clipped to
        ``min(fan_in, fan_out)``), or ``{kernel path: k}`` naming every selected kernel.
        :func:`minimal_k` gives, per kernel, the ``k`` needed for a target gradient cosine
        with the exact surrogate, in that form: ``k=minimal_k(params)``.
      iterations: warm-started iterations per block and step (``>= 1``).
      resync_every: re-seed from an exact SVD every this many updates (``>= 1``); ``None`` only
        on the first update.
      filter_fn: ``(path, leaf) -> bool`` choosing the kernels.
      masks: fixed masks tree (``None`` leaves are not pruned).
      reduce: ``"mean"`` (default) or ``"sum"`` over the kernels.
      live: track and penalise each kernel's live spectrum (default; the singular values that
        are zero by a pruned kernel's structure are skipped, as in the exact penalty).

    Returns:
      An :class:`optax.GradientTransformation` with state
      :class:`tscnc_jax.ConditionNumberPenaltyState`; its ``update`` requires ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from tscnc_jax import spectral_tracking
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 64, 128))}
      >>> tx = optax.chain(
      ...     spectral_tracking.add_tracked_condition_number_penalty(0.1, k=2),
      ...     optax.sgd(0.05))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
    """
    _validation.check_nonnegative("weight", weight)
    _check_surrogate(temperature, delta)
    penalties.check_reduce(reduce)
    k = _check_k(k)
    iterations = _validation.check_int("iterations", iterations)
    if resync_every is not None:
        resync_every = _validation.check_int("resync_every", resync_every)

    def init_fn(params):
        return transforms.ConditionNumberPenaltyState(
            count=jnp.zeros([], jnp.int32),
            value=jnp.zeros([], jnp.float32),
            vectors=_placeholder_vectors(params, k, masks, filter_fn),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "add_tracked_condition_number_penalty needs the current parameters: call "
                "`update(updates, state, params)`."
            )
        if resync_every is None:
            resync = state.count == 0
        else:
            resync = state.count % resync_every == 0
        vectors = lax.cond(
            resync,
            lambda p, v: init_tracked_vectors(p, k=k, masks=masks, filter_fn=filter_fn,
                                              live=live),
            lambda p, v: refine_tracked_vectors(
                p, v, iterations=iterations, masks=masks, filter_fn=filter_fn, live=live),
            params,
            state.vectors,
        )

        def penalty_fn(p):
            return tracked_condition_number_penalty(
                p, vectors, temperature=temperature, delta=delta, masks=masks,
                filter_fn=filter_fn, reduce=reduce, live=live,
            )

        value, grads = jax.value_and_grad(penalty_fn)(params)
        w = weight(state.count) if callable(weight) else weight
        updates = jax.tree.map(
            lambda u, g: (u + jnp.asarray(w, g.dtype) * g).astype(u.dtype), updates, grads
        )
        return updates, transforms.ConditionNumberPenaltyState(
            count=optax.safe_int32_increment(state.count),
            value=value.astype(jnp.float32),
            vectors=vectors,
        )

    return optax.GradientTransformation(init_fn, update_fn)


__all__ = [
    "CHOLESKY_SHIFT",
    "KSpec",
    "TrackedSingularVectors",
    "add_tracked_condition_number_penalty",
    "block_sizes",
    "converged_gradient_cosine",
    "init_tracked_vectors",
    "minimal_k",
    "refine_tracked_vectors",
    "tracked_condition_number_penalty",
    "tracked_log_condition_numbers",
    "tracked_singular_values",
    "truncation_bound",
]
