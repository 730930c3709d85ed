"""What every attack shares: argument checks, threat-model geometry, losses and the per-example
best point. A private module of :mod:`tscnc_jax.attacks`: its public names are re-exported there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax._validation import check_choice, check_int, is_tracer

LogitsFn = Callable[[jax.Array], jax.Array]
# A randomised model (a randomised defence, dropout at test time, input noise) with its randomness
# made explicit: ``logits_fn(x, key) -> logits``, a fresh ``key`` for every fresh draw. Attacks that
# support it take ``stochastic=True`` (APGD: :func:`tscnc_jax.attacks.apgd`).
StochasticLogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# An attack: ``attack(logits_fn, x, y, *, key, eps, norm, bounds) -> x_adv`` (other options bound,
# e.g. with ``functools.partial(pgd, steps=20)``).
AttackFn = Callable[..., jax.Array]

NORMS = ("linf", "l2")
PGD_LOSSES = ("ce", "cw", "dlr", "kl")
APGD_LOSSES = ("ce", "cw", "dlr", "dlr-targeted")
INITS = ("uniform", "normal", "none")

# Denominator guard of the DLR losses (Croce and Hein 2020).
DLR_TINY = 1e-12
# Guard for normalising gradients / perturbations.
TINY = 1e-12


# ----------------------------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------------------------










def check_bounds(bounds: Any) -> tuple[float, float]:
    """Returns ``(lo, hi)`` as floats; ``ValueError`` unless they are finite with ``lo < hi``."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"`bounds` must be a pair (lo, hi) of floats; got {bounds!r}.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"`bounds` must be finite with lo < hi; got {bounds!r}.")
    return lo, hi


def check_eps(eps: Any, name: str = "eps") -> None:
    """``ValueError`` if a concrete ``eps`` is negative, not finite or not a scalar."""
    if is_tracer(eps):
        if jnp.ndim(eps) != 0:
            raise ValueError(f"`{name}` must be a scalar; got shape {jnp.shape(eps)}.")
        return
    arr = np.asarray(eps)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"`{name}` must be a real scalar; got {eps!r}.")
    if not np.isfinite(arr) or arr < 0:
        raise ValueError(f"`{name}` must be finite and >= 0; got {eps!r}.")


def check_inputs(
    logits_fn: LogitsFn, x: jax.Array, y: jax.Array, bounds: tuple[float, float]
) -> int:
    """Checks shapes, dtypes and (when concrete) the data; returns the number of classes."""
    if not hasattr(x, "shape") or jnp.ndim(x) < 2:
        raise ValueError(f"`x` must be a batch of shape (B, ...); got {getattr(x, 'shape', x)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"`x` must be floating point; got dtype {x.dtype}.")
    if not hasattr(y, "shape") or tuple(y.shape) != (x.shape[0],):
        raise ValueError(
            f"`y` must have shape (B,) = ({x.shape[0]},); got {getattr(y, 'shape', y)}."
        )
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"`y` must hold integer labels; got dtype {y.dtype}.")
    out = jax.eval_shape(logits_fn, x)
    if len(out.shape) != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 2:
        raise ValueError(
            f"`logits_fn(x)` must return logits of shape (B, n_classes >= 2) = ({x.shape[0]}, K); "
            f"got {out.shape}."
        )
    n_classes = int(out.shape[1])
    lo, hi = bounds
    if not is_tracer(x):
        x_np = np.asarray(x)
        if x_np.size and not np.all(np.isfinite(x_np)):
            raise ValueError("`x` contains NaN or inf.")
        if x_np.size and (x_np.min() < lo or x_np.max() > hi):
            raise ValueError(
                f"`x` must lie inside bounds [{lo}, {hi}]; got values in "
                f"[{x_np.min()}, {x_np.max()}]. Pass matching `bounds=`."
            )
    if not is_tracer(y):
        y_np = np.asarray(y)
        if y_np.size and (y_np.min() < 0 or y_np.max() >= n_classes):
            raise ValueError(
                f"labels `y` must be in [0, {n_classes}) (n_classes from logits_fn); got values "
                f"in [{y_np.min()}, {y_np.max()}]."
            )
    return n_classes


def check_common(logits_fn, x, y, eps, norm, bounds) -> tuple[str, float, float, int]:
    norm = check_choice("norm", norm, NORMS)
    lo, hi = check_bounds(bounds)
    check_eps(eps)
    n_classes = check_inputs(logits_fn, x, y, (lo, hi))
    return norm, lo, hi, n_classes


# ----------------------------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------------------------


def bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example vector ``v_B`` to broadcast against ``x_Bx...``."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
    """Per-example ``||delta_b||`` (``"linf"`` or ``"l2"``) of a batch ``delta_Bx...``."""
    norm = check_choice("norm", norm, NORMS)
    d = jnp.reshape(delta, (delta.shape[0], -1))
    if norm == "linf":
        return jnp.max(jnp.abs(d), axis=1)
    return jnp.sqrt(jnp.sum(d * d, axis=1))


def project(
    x_adv: jax.Array, x: jax.Array, eps: Any, norm: str, bounds: tuple[float, float]
) -> jax.Array:
    """Projects ``x_adv`` onto the ``eps``-ball around ``x`` (per example), then into ``bounds``.

    For L-inf this is the exact Euclidean projection onto the intersection. For L2 the radial
    projection is followed by clipping; clipping into a box that contains ``x`` only shrinks
    ``|x_adv - x|`` coordinate-wise, so the result stays in both sets.
    """
    lo, hi = bounds
    if norm == "linf":
        x_adv = jnp.clip(x_adv, x - eps, x + eps)
    else:
        delta = x_adv - x
        n = perturbation_norm(delta, "l2")
        factor = jnp.minimum(1.0, eps / jnp.maximum(n, TINY))
        x_adv = x + delta * bcast(factor, x).astype(x.dtype)
    return jnp.clip(x_adv, lo, hi).astype(x.dtype)


def ascent_direction(g: jax.Array, norm: str) -> jax.Array:
    """Steepest-ascent direction of unit ``norm``: ``sign(g)`` or ``g / ||g||_2``."""
    if norm == "linf":
        return jnp.sign(g)
    return g / bcast(perturbation_norm(g, "l2") + TINY, g)


def random_start(key, x, eps, norm, bounds, init: str) -> jax.Array:
    """Starting point of PGD: uniform in the ball, TRADES' ``0.001 N(0, I)``, or ``x`` itself."""
    if init == "none":
        return x
    if init == "normal":  # Zhang et al. 2019 (TRADES) start from x + 0.001 * N(0, I).
        noise = 0.001 * jax.random.normal(key, x.shape, x.dtype)
        return project(x + noise, x, eps, norm, bounds)
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    else:  # Uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d).
        k_dir, k_rad = jax.random.split(key)
        g = jax.random.normal(k_dir, x.shape, x.dtype)
        d = math.prod(x.shape[1:])
        r = eps * jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d)
        delta = g / bcast(perturbation_norm(g, "l2") + TINY, g) * bcast(r, g)
    return project(x + delta, x, eps, norm, bounds)


def check_x_init(x_init: Any, x: jax.Array) -> None:
    if x_init is None:
        return
    if getattr(x_init, "shape", None) != x.shape or x_init.dtype != x.dtype:
        raise ValueError(
            f"`x_init` must have the shape and dtype of x {x.shape} / {x.dtype}; got "
            f"{getattr(x_init, 'shape', x_init)} / {getattr(x_init, 'dtype', None)}."
        )


def first_start(x_init, x0, r, x, eps, norm, bounds) -> jax.Array:
    """``x_init`` (projected) for run 0 when given, else ``x0``."""
    if x_init is None:
        return x0
    return jnp.where(r == 0, project(x_init, x, eps, norm, bounds), x0)


def apgd_start(key, x, eps, norm, bounds) -> jax.Array:
    """APGD's start (Croce and Hein 2020): ``x + eps * t / ||t||`` with ``t`` uniform (L-inf) or
    Gaussian (L2), i.e. on the sphere of the ball, then clipped into ``bounds``."""
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
    t = t / bcast(perturbation_norm(t, norm) + TINY, t)
    return project(x + eps * t, x, eps, norm, bounds)


# ----------------------------------------------------------------------------------------------
# Losses (per example, to be maximised).
# ----------------------------------------------------------------------------------------------


def as_float(logits: jax.Array) -> jax.Array:
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def label_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=1)[:, 0]


def max_other_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
    is_y = jax.nn.one_hot(y, logits.shape[1], dtype=jnp.bool_)
    return jnp.max(jnp.where(is_y, -jnp.inf, logits), axis=1)


def cross_entropy_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example cross-entropy ``logsumexp(z) - z_y``."""
    logits = as_float(logits)
    return jax.nn.logsumexp(logits, axis=1) - label_logit(logits, y)


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example CW margin ``max_{j != y} z_j - z_y`` (> 0 iff misclassified, ties aside)."""
    logits = as_float(logits)
    return max_other_logit(logits, y) - label_logit(logits, y)


def dlr_loss(logits: jax.Array, y: jax.Array, target: jax.Array | None = None) -> jax.Array:
    """Per-example DLR loss of Croce and Hein 2020 (untargeted, or targeted at ``target``).

    Untargeted: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` (needs >= 3 classes).
    Targeted: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (needs >= 4 classes).
    The loss is invariant to shifting and (positive) scaling of the logits.
    """
    logits = as_float(logits)
    z_y = label_logit(logits, y)
    if target is None:
        top = jax.lax.top_k(logits, 3)[0]
        return -(z_y - max_other_logit(logits, y)) / (top[:, 0] - top[:, 2] + DLR_TINY)
    top = jax.lax.top_k(logits, 4)[0]
    z_t = label_logit(logits, target)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + DLR_TINY)


def kl_loss(logits: jax.Array, clean_logits: jax.Array) -> jax.Array:
    """Per-example ``KL(softmax(clean_logits) || softmax(logits))`` (TRADES' inner loss)."""
    logp_clean = jax.nn.log_softmax(as_float(clean_logits), axis=1)
    logp = jax.nn.log_softmax(as_float(logits), axis=1)
    return jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp), axis=1)


def loss_value(loss: str, logits, y, target=None, clean_logits=None) -> jax.Array:
    if loss == "ce":
        return cross_entropy_loss(logits, y)
    if loss == "cw":
        return margin_loss(logits, y)
    if loss == "dlr":
        return dlr_loss(logits, y)
    if loss == "dlr-targeted":
        return dlr_loss(logits, y, target)
    if loss == "kl":
        return kl_loss(logits, clean_logits)
    raise ValueError(f"unknown loss {loss!r}")


def target_class_count(n_target_classes: int | None, n_classes: int) -> int:
    """The target classes of a targeted attack: ``n_target_classes``, or AutoAttack's
    ``min(9, n_classes - 1)`` when ``None``; at most ``n_classes - 1``."""
    if n_target_classes is None:
        n_target_classes = min(9, n_classes - 1)
    n_target_classes = check_int("n_target_classes", n_target_classes)
    if n_target_classes > n_classes - 1:
        raise ValueError(
            f"`n_target_classes` must be <= n_classes - 1 = {n_classes - 1}; "
            f"got {n_target_classes}."
        )
    return n_target_classes


def check_loss_classes(loss: str, n_classes: int) -> None:
    need = {"dlr": 3, "dlr-targeted": 4}.get(loss, 2)
    if n_classes < need:
        raise ValueError(f"loss={loss!r} needs at least {need} classes; logits_fn has {n_classes}.")


def make_value_and_grad(logits_fn, loss: str, y, clean_logits=None):
    """Returns ``vg(x_adv, target) -> (loss_B, logits_BxK, grad)``."""

    def total(x_adv, target):
        logits = logits_fn(x_adv)
        per_ex = loss_value(loss, logits, y, target, clean_logits)
        return jnp.sum(per_ex), (per_ex, logits)

    grad_fn = jax.value_and_grad(total, has_aux=True)

    def vg(x_adv, target=None):
        (_, (per_ex, logits)), g = grad_fn(x_adv, target)
        return per_ex, logits, g

    return vg


def misclassified(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=1) != y


def make_eot_value_and_grad(logits_fn, loss: str, y, eot_iter: int, stochastic: bool):
    """Expectation over Transformation (Athalye, Engstrom, Ilyas, Kwok 2018, "Synthesizing robust
    adversarial examples"; AutoAttack's ``eot_iter``): ``vg(x_adv, target, key) -> (loss_B, adv_B,
    grad)`` averaged over ``eot_iter`` forward/backward passes of a stochastic ``logits_fn(x,
    key)``, pass ``j`` with the key ``fold_in(key, j)``.

    ``loss_B`` and ``grad`` are the means over the passes; ``adv_B`` marks the examples that a
    strict majority of the passes misclassify. (The reference, ``fra31/auto-attack``
    ``autopgd_base.py``, averages the gradient the same way but keeps the loss and the prediction
    of the last pass: the mean loss is a less noisy estimate of the expected loss that APGD's step
    size control compares, and a majority keeps a run from stopping early on a point that a fresh
    draw would most likely classify correctly.) With ``stochastic=False`` the model is called as
    ``logits_fn(x)`` and ``key`` is ignored; every pass would be the same, so one pass is made.
    """
    if not stochastic:
        base = make_value_and_grad(logits_fn, loss, y)

        def vg_plain(x_adv, target=None, key=None):
            del key
            per_ex, logits, g = base(x_adv, target)
            return per_ex, misclassified(logits, y), g

        return vg_plain

    def total(x_adv, target, k):
        logits = logits_fn(x_adv, k)
        per_ex = loss_value(loss, logits, y, target)
        return jnp.sum(per_ex), (per_ex, logits)

    grad_fn = jax.value_and_grad(total, has_aux=True)

    def vg(x_adv, target=None, key=None):
        def one(carry, j):
            loss_sum, n_wrong, g_sum = carry
            (_, (per_ex, logits)), g = grad_fn(x_adv, target, jax.random.fold_in(key, j))
            return (
                loss_sum + as_float(per_ex).astype(jnp.float32),
                n_wrong + misclassified(logits, y).astype(jnp.int32),
                g_sum + g,
            ), None

        b = x_adv.shape[0]
        init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32), jnp.zeros_like(x_adv))
        (loss_sum, n_wrong, g_sum), _ = jax.lax.scan(one, init, jnp.arange(eot_iter))
        return loss_sum / eot_iter, 2 * n_wrong > eot_iter, (g_sum / eot_iter).astype(x_adv.dtype)

    return vg


def predict_under_draws(logits_fn, x, y, key, n_draws: int) -> jax.Array:
    """The class a stochastic ``logits_fn(x, key)`` is charged with over ``n_draws`` independent
    draws (keys ``fold_in(key, d)``): ``y`` where every draw predicts ``y``, else the first other
    class a draw predicts. ``predict_under_draws(...) == y`` is "correctly classified by every
    draw", the criterion under which a randomised model counts as robust on a point."""
    preds = jax.lax.map(
        lambda d: jnp.argmax(logits_fn(x, jax.random.fold_in(key, d)), axis=-1).astype(y.dtype),
        jnp.arange(n_draws),
    )
    wrong = preds != y[None]
    first = jnp.argmax(wrong, axis=0)
    return jnp.where(jnp.any(wrong, axis=0), jnp.take_along_axis(preds, first[None], 0)[0], y)


# ----------------------------------------------------------------------------------------------
# Per-example best point.
# ----------------------------------------------------------------------------------------------


class Best(NamedTuple):
    x: jax.Array  # best point so far
    adv: jax.Array  # bool_B: is it misclassified
    loss: jax.Array  # its loss (the ranking among equally-misclassified points)


def empty_best(x: jax.Array) -> Best:
    b = x.shape[0]
    return Best(x, jnp.zeros((b,), jnp.bool_), jnp.full((b,), -jnp.inf, jnp.float32))


def update_best(best: Best, x_new, adv_new, loss_new) -> Best:
    """Misclassified beats correctly classified; then higher loss wins (NaN never wins)."""
    loss_new = loss_new.astype(best.loss.dtype)
    better = (adv_new & ~best.adv) | ((adv_new == best.adv) & (loss_new > best.loss))
    return Best(
        jnp.where(bcast(better, x_new), x_new, best.x),
        best.adv | adv_new,
        jnp.where(better, loss_new, best.loss),
    )


def run_restarts(n_runs: int, key, init: Best, run_fn) -> Best:
    """Runs ``run_fn(key_r, r) -> Best`` for r < n_runs, merged per example; a run is skipped
    when every example is already misclassified."""

    def body(r, best):
        def do(b):
            new = run_fn(jax.random.fold_in(key, r), r)
            return update_best(b, new.x, new.adv, new.loss)

        return jax.lax.cond(jnp.all(best.adv), lambda b: b, do, best)

    return jax.lax.fori_loop(0, n_runs, body, init)
