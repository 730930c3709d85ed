"""Adversarial attacks as pure functions over a ``logits_fn(x) -> logits``.

Every attack has the signature ``attack(logits_fn, x, y, *, key, eps, norm, bounds, ...)`` and
returns adversarial inputs of the shape and dtype of ``x``. Hyperparameters that change the shape of
the computation (steps, restarts, targets, queries, the loss and the norm) are static Python values;
``eps`` may be a traced scalar. Nothing is jitted here: callers jit, e.g.::

    attack = jax.jit(lambda x, y, key: apgd(logits_fn, x, y, key=key, eps=8 / 255))
    x_adv = attack(x_BxHxWxC, y_B, jax.random.key(0))

Conventions shared by all attacks:

* Threat models: ``norm="linf"`` (``||x_adv - x||_inf <= eps``) and ``norm="l2"``
  (``||x_adv - x||_2 <= eps``, per example), always intersected with the box
  ``bounds = (lo, hi)``.
* Iterations run in ``lax.scan`` / ``lax.fori_loop`` / ``lax.while_loop``; bookkeeping is per
  example with ``jnp.where``. Each attack returns, per example, the best point it evaluated: a
  misclassified point if it found one (the one of highest loss), otherwise the point of highest
  loss. Restarts only matter for points no restart has broken yet, and are skipped once the whole
  batch is broken; an APGD or Square run also stops as soon as every example of the batch is
  broken (nothing it could still find changes the robust accuracy).
* ``logits_fn`` must treat examples independently (no batch statistics): gradients are taken of the
  sum of per-example losses.
* Argument checks: static arguments are checked eagerly (``ValueError`` naming the argument). The
  data checks (``x`` inside ``bounds``, labels in ``[0, n_classes)``, ``eps >= 0``) run when the
  values are concrete and are skipped under tracing;
  :func:`tscnc_jax.evaluation.evaluate_robustness` checks its data eagerly before jitting.

Losses (all maximised by the attacker, per example; ``z`` are the logits, ``y`` the label):

* ``"ce"``: cross-entropy ``logsumexp(z) - z_y``.
* ``"cw"``: Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (Carlini and Wagner 2017).
* ``"dlr"``: difference of logits ratio ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``,
  with ``z_pi1 >= z_pi2 >= ...`` the sorted logits (Croce and Hein 2020).
* ``"dlr-targeted"``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` for a target ``t``.
* ``"kl"``: ``KL(softmax(z_clean) || softmax(z))`` to the clean prediction, the inner loss of TRADES
  (Zhang et al. 2019).

References:

* Goodfellow, Shlens, Szegedy 2015, "Explaining and harnessing adversarial examples" (FGSM).
* Madry et al. 2018, "Towards deep learning models resistant to adversarial attacks" (PGD).
* Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", arXiv 2003.01690 (APGD, DLR loss, AutoAttack).
* Andriushchenko, Croce, Flammarion, Hein 2020, "Square Attack: a query-efficient black-box
  adversarial attack via random search", arXiv 1912.00049.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array], jax.Array]
# An attack: ``attack(logits_fn, x, y, *, key, eps, norm, bounds) -> x_adv`` (other options bound,
# e.g. with ``functools.partial(pgd, steps=20)``).
AttackFn = Callable[..., jax.Array]

NORMS = ("linf", "l2")
PGD_LOSSES = ("ce", "cw", "dlr", "kl")
APGD_LOSSES = ("ce", "cw", "dlr", "dlr-targeted")
INITS = ("uniform", "normal", "none")

# Denominator guard of the DLR losses (Croce and Hein 2020).
_DLR_TINY = 1e-12
# Guard for normalising gradients / perturbations.
_TINY = 1e-12


# ----------------------------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------------------------


def _is_tracer(v: Any) -> bool:
    return isinstance(v, jax.core.Tracer)


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"`{name}` must be a Python int >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")
    return value.lower()


def _check_positive_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive float; got {value!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive finite float; got {value!r}.")
    return v


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
    if _is_tracer(eps):
        if jnp.ndim(eps) != 0:
            raise ValueError(f"`{name}` must be a scalar; got shape {jnp.shape(eps)}.")
        return
    arr = np.asarray(eps)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"`{name}` must be a real scalar; got {eps!r}.")
    if not np.isfinite(arr) or arr < 0:
        raise ValueError(f"`{name}` must be finite and >= 0; got {eps!r}.")


def _check_inputs(
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
    if not _is_tracer(x):
        x_np = np.asarray(x)
        if x_np.size and not np.all(np.isfinite(x_np)):
            raise ValueError("`x` contains NaN or inf.")
        if x_np.size and (x_np.min() < lo or x_np.max() > hi):
            raise ValueError(
                f"`x` must lie inside bounds [{lo}, {hi}]; got values in "
                f"[{x_np.min()}, {x_np.max()}]. Pass matching `bounds=`."
            )
    if not _is_tracer(y):
        y_np = np.asarray(y)
        if y_np.size and (y_np.min() < 0 or y_np.max() >= n_classes):
            raise ValueError(
                f"labels `y` must be in [0, {n_classes}) (n_classes from logits_fn); got values "
                f"in [{y_np.min()}, {y_np.max()}]."
            )
    return n_classes


def _check_common(logits_fn, x, y, eps, norm, bounds) -> tuple[str, float, float, int]:
    norm = _check_choice("norm", norm, NORMS)
    lo, hi = check_bounds(bounds)
    check_eps(eps)
    n_classes = _check_inputs(logits_fn, x, y, (lo, hi))
    return norm, lo, hi, n_classes


# ----------------------------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------------------------


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example vector ``v_B`` to broadcast against ``x_Bx...``."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
    """Per-example ``||delta_b||`` (``"linf"`` or ``"l2"``) of a batch ``delta_Bx...``."""
    norm = _check_choice("norm", norm, NORMS)
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
        factor = jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))
        x_adv = x + delta * _bcast(factor, x).astype(x.dtype)
    return jnp.clip(x_adv, lo, hi).astype(x.dtype)


def _ascent_direction(g: jax.Array, norm: str) -> jax.Array:
    """Steepest-ascent direction of unit ``norm``: ``sign(g)`` or ``g / ||g||_2``."""
    if norm == "linf":
        return jnp.sign(g)
    return g / _bcast(perturbation_norm(g, "l2") + _TINY, g)


def _random_start(key, x, eps, norm, bounds, init: str) -> jax.Array:
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
        delta = g / _bcast(perturbation_norm(g, "l2") + _TINY, g) * _bcast(r, g)
    return project(x + delta, x, eps, norm, bounds)


def _check_x_init(x_init: Any, x: jax.Array) -> None:
    if x_init is None:
        return
    if getattr(x_init, "shape", None) != x.shape or x_init.dtype != x.dtype:
        raise ValueError(
            f"`x_init` must have the shape and dtype of x {x.shape} / {x.dtype}; got "
            f"{getattr(x_init, 'shape', x_init)} / {getattr(x_init, 'dtype', None)}."
        )


def _first_start(x_init, x0, r, x, eps, norm, bounds) -> jax.Array:
    """``x_init`` (projected) for run 0 when given, else ``x0``."""
    if x_init is None:
        return x0
    return jnp.where(r == 0, project(x_init, x, eps, norm, bounds), x0)


def _apgd_start(key, x, eps, norm, bounds) -> jax.Array:
    """APGD's start (Croce and Hein 2020): ``x + eps * t / ||t||`` with ``t`` uniform (L-inf) or
    Gaussian (L2), i.e. on the sphere of the ball, then clipped into ``bounds``."""
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
    t = t / _bcast(perturbation_norm(t, norm) + _TINY, t)
    return project(x + eps * t, x, eps, norm, bounds)


# ----------------------------------------------------------------------------------------------
# Losses (per example, to be maximised).
# ----------------------------------------------------------------------------------------------


def _as_float(logits: jax.Array) -> jax.Array:
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _label_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=1)[:, 0]


def _max_other_logit(logits: jax.Array, y: jax.Array) -> jax.Array:
    is_y = jax.nn.one_hot(y, logits.shape[1], dtype=jnp.bool_)
    return jnp.max(jnp.where(is_y, -jnp.inf, logits), axis=1)


def cross_entropy_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example cross-entropy ``logsumexp(z) - z_y``."""
    logits = _as_float(logits)
    return jax.nn.logsumexp(logits, axis=1) - _label_logit(logits, y)


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example CW margin ``max_{j != y} z_j - z_y`` (> 0 iff misclassified, ties aside)."""
    logits = _as_float(logits)
    return _max_other_logit(logits, y) - _label_logit(logits, y)


def dlr_loss(logits: jax.Array, y: jax.Array, target: jax.Array | None = None) -> jax.Array:
    """Per-example DLR loss of Croce and Hein 2020 (untargeted, or targeted at ``target``).

    Untargeted: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` (needs >= 3 classes).
    Targeted: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (needs >= 4 classes).
    The loss is invariant to shifting and (positive) scaling of the logits.
    """
    logits = _as_float(logits)
    z_y = _label_logit(logits, y)
    if target is None:
        top = jax.lax.top_k(logits, 3)[0]
        return -(z_y - _max_other_logit(logits, y)) / (top[:, 0] - top[:, 2] + _DLR_TINY)
    top = jax.lax.top_k(logits, 4)[0]
    z_t = _label_logit(logits, target)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_TINY)


def kl_loss(logits: jax.Array, clean_logits: jax.Array) -> jax.Array:
    """Per-example ``KL(softmax(clean_logits) || softmax(logits))`` (TRADES' inner loss)."""
    logp_clean = jax.nn.log_softmax(_as_float(clean_logits), axis=1)
    logp = jax.nn.log_softmax(_as_float(logits), axis=1)
    return jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp), axis=1)


def _loss_value(loss: str, logits, y, target=None, clean_logits=None) -> jax.Array:
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


def _check_loss_classes(loss: str, n_classes: int) -> None:
    need = {"dlr": 3, "dlr-targeted": 4}.get(loss, 2)
    if n_classes < need:
        raise ValueError(f"loss={loss!r} needs at least {need} classes; logits_fn has {n_classes}.")


def _make_value_and_grad(logits_fn, loss: str, y, clean_logits=None):
    """Returns ``vg(x_adv, target) -> (loss_B, logits_BxK, grad)``."""

    def total(x_adv, target):
        logits = logits_fn(x_adv)
        per_ex = _loss_value(loss, logits, y, target, clean_logits)
        return jnp.sum(per_ex), (per_ex, logits)

    grad_fn = jax.value_and_grad(total, has_aux=True)

    def vg(x_adv, target=None):
        (_, (per_ex, logits)), g = grad_fn(x_adv, target)
        return per_ex, logits, g

    return vg


def _misclassified(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=1) != y


# ----------------------------------------------------------------------------------------------
# Per-example best point.
# ----------------------------------------------------------------------------------------------


class _Best(NamedTuple):
    x: jax.Array  # best point so far
    adv: jax.Array  # bool_B: is it misclassified
    loss: jax.Array  # its loss (the ranking among equally-misclassified points)


def _empty_best(x: jax.Array) -> _Best:
    b = x.shape[0]
    return _Best(x, jnp.zeros((b,), jnp.bool_), jnp.full((b,), -jnp.inf, jnp.float32))


def _update_best(best: _Best, x_new, adv_new, loss_new) -> _Best:
    """Misclassified beats correctly classified; then higher loss wins (NaN never wins)."""
    loss_new = loss_new.astype(best.loss.dtype)
    better = (adv_new & ~best.adv) | ((adv_new == best.adv) & (loss_new > best.loss))
    return _Best(
        jnp.where(_bcast(better, x_new), x_new, best.x),
        best.adv | adv_new,
        jnp.where(better, loss_new, best.loss),
    )


def _runs(n_runs: int, key, init: _Best, run_fn) -> _Best:
    """Runs ``run_fn(key_r, r) -> _Best`` for r < n_runs, merged per example; a run is skipped
    when every example is already misclassified."""

    def body(r, best):
        def do(b):
            new = run_fn(jax.random.fold_in(key, r), r)
            return _update_best(b, new.x, new.adv, new.loss)

        return jax.lax.cond(jnp.all(best.adv), lambda b: b, do, best)

    return jax.lax.fori_loop(0, n_runs, body, init)


# ----------------------------------------------------------------------------------------------
# FGSM and PGD.
# ----------------------------------------------------------------------------------------------


def fgsm(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array | None = None,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    loss: str = "ce",
) -> jax.Array:
    """Fast gradient (sign) method (Goodfellow et al. 2015): one step of length ``eps``.

    ``x_adv = clip(x + eps * sign(grad_x L(x, y)))`` for L-inf, ``x + eps * g / ||g||_2`` for L2.

    Args:
      logits_fn: maps a batch ``x_Bx...`` to logits ``B x K``.
      x: clean inputs inside ``bounds``.
      y: integer labels ``B``.
      key: unused (FGSM is deterministic); accepted for a uniform attack signature.
      eps: radius of the threat model.
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs.
      loss: one of ``PGD_LOSSES`` (``"kl"`` has zero gradient at ``x``; avoid it here).

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    del key
    norm, lo, hi, n_classes = _check_common(logits_fn, x, y, eps, norm, bounds)
    loss = _check_choice("loss", loss, PGD_LOSSES)
    _check_loss_classes(loss, n_classes)
    clean = jax.lax.stop_gradient(logits_fn(x)) if loss == "kl" else None
    vg = _make_value_and_grad(logits_fn, loss, y, clean)
    _, _, g = vg(x)
    return project(x + eps * _ascent_direction(g, norm), x, eps, norm, (lo, hi))


def _pgd_run(vg, fwd, x, y, x0, eps, norm, bounds, steps, step_size):
    """One PGD run from ``x0``; returns (best, loss trace ``(steps + 1) x B`` of the iterates)."""

    def step(carry, _):
        x_cur, best = carry
        loss, logits, g = vg(x_cur)
        best = _update_best(best, x_cur, _misclassified(logits, y), loss)
        x_next = project(x_cur + step_size * _ascent_direction(g, norm), x, eps, norm, bounds)
        return (x_next, best), loss.astype(jnp.float32)

    (x_last, best), trace = jax.lax.scan(step, (x0, _empty_best(x)), None, length=steps)
    loss, logits = fwd(x_last)
    best = _update_best(best, x_last, _misclassified(logits, y), loss)
    return best, jnp.concatenate([trace, loss.astype(jnp.float32)[None]], axis=0)


def _pgd_setup(logits_fn, x, y, eps, norm, bounds, steps, restarts, step_size, loss, init):
    norm, lo, hi, n_classes = _check_common(logits_fn, x, y, eps, norm, bounds)
    steps = _check_int("steps", steps)
    restarts = _check_int("restarts", restarts)
    loss = _check_choice("loss", loss, PGD_LOSSES)
    init = _check_choice("init", init, INITS)
    _check_loss_classes(loss, n_classes)
    if step_size is None:
        # Madry et al.'s rule of thumb: steps * step_size = 2.5 * eps, so that the iterate can
        # cross the ball from a random start and still move along its boundary.
        step_size = 2.5 * eps / steps
    else:
        check_eps(step_size, "step_size")
    clean = jax.lax.stop_gradient(logits_fn(x)) if loss == "kl" else None
    vg = _make_value_and_grad(logits_fn, loss, y, clean)

    def fwd(x_adv):
        logits = logits_fn(x_adv)
        return _loss_value(loss, logits, y, None, clean), logits

    return norm, (lo, hi), steps, restarts, step_size, init, vg, fwd


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    steps: int = 10,
    restarts: int = 1,
    step_size: Any = None,
    loss: str = "ce",
    init: str = "uniform",
    x_init: jax.Array | None = None,
) -> jax.Array:
    """Projected gradient ascent (Madry et al. 2018) with random restarts.

    ``x_{t+1} = P(x_t + step_size * d(grad L(x_t)))`` with ``d = sign`` (L-inf) or the unit-L2
    gradient (L2) and ``P`` the projection onto the ``eps``-ball and ``bounds``. Every iterate
    (including the last) is scored; each example returns its best one: a misclassified iterate if
    any (the one of highest loss), otherwise the iterate of highest loss, over all restarts.

    Args:
      logits_fn: maps a batch ``x_Bx...`` to logits ``B x K``.
      x: clean inputs inside ``bounds``.
      y: integer labels ``B``.
      key: PRNG key for the random starts.
      eps: radius of the threat model (may be traced).
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs.
      steps: gradient steps per restart (static).
      restarts: independent runs (static); later runs are skipped once all examples are broken.
      step_size: step length; default ``2.5 * eps / steps``.
      loss: ``"ce"``, ``"cw"`` (margin), ``"dlr"`` or ``"kl"`` (to the clean prediction, TRADES).
      init: ``"uniform"`` (in the ball), ``"normal"`` (``x + 0.001 N(0, I)``, TRADES) or ``"none"``.
      x_init: optional starting point of the first restart (projected onto the ball and bounds),
        e.g. per-example random starts drawn by the caller; later restarts use ``init``.

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    norm, bounds, steps, restarts, step_size, init, vg, fwd = _pgd_setup(
        logits_fn, x, y, eps, norm, bounds, steps, restarts, step_size, loss, init
    )
    _check_x_init(x_init, x)

    def run(k, r):
        x0 = _random_start(k, x, eps, norm, bounds, init)
        x0 = _first_start(x_init, x0, r, x, eps, norm, bounds)
        return _pgd_run(vg, fwd, x, y, x0, eps, norm, bounds, steps, step_size)[0]

    return _runs(restarts, key, _empty_best(x), run).x


def pgd_loss_curve(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    steps: int = 10,
    step_size: Any = None,
    loss: str = "ce",
    init: str = "uniform",
    x_init: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One PGD run (as :func:`pgd`, one restart) that also returns the loss of every iterate.

    Returns:
      ``(x_adv, losses)`` with ``losses`` of shape ``(steps + 1) x B``: the loss at the start and
      after each step. A loss that does not grow with the steps is a sign of gradient masking.
    """
    norm, bounds, steps, _, step_size, init, vg, fwd = _pgd_setup(
        logits_fn, x, y, eps, norm, bounds, steps, 1, step_size, loss, init
    )
    _check_x_init(x_init, x)
    x0 = _first_start(
        x_init, _random_start(key, x, eps, norm, bounds, init), 0, x, eps, norm, bounds
    )
    best, trace = _pgd_run(vg, fwd, x, y, x0, eps, norm, bounds, steps, step_size)
    return best.x, trace


# ----------------------------------------------------------------------------------------------
# APGD (Croce and Hein 2020).
# ----------------------------------------------------------------------------------------------


def apgd_checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """APGD's checkpoints for ``steps`` iterations.

    Checkpoints are ``w_j = ceil(p_j * steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce and Hein 2020, Sec. 3.2); as in the
    authors' implementation the interval lengths are ``int(0.22 n)``, decreasing by ``int(0.03 n)``
    down to ``int(0.06 n)`` (each at least 1).

    Returns:
      ``(is_checkpoint, window)``: boolean array of length ``steps`` marking the iterations that end
      an interval, and the length of the interval they end (0 elsewhere).
    """
    steps = _check_int("steps", steps)
    k = max(int(0.22 * steps), 1)
    k_min = max(int(0.06 * steps), 1)
    k_decr = max(int(0.03 * steps), 1)
    is_ckpt = np.zeros(steps, np.bool_)
    window = np.zeros(steps, np.int32)
    i = k - 1
    while i < steps:
        is_ckpt[i] = True
        window[i] = k
        k = max(k - k_decr, k_min)
        i += k
    return is_ckpt, window


class _APGDState(NamedTuple):
    x_cur: jax.Array
    x_prev: jax.Array
    grad: jax.Array
    step: jax.Array  # B
    x_best: jax.Array  # highest-loss point of this run (restart point after halving)
    grad_best: jax.Array
    loss_best: jax.Array
    loss_prev: jax.Array
    n_increase: jax.Array  # B, successful increases since the last checkpoint
    loss_best_ckpt: jax.Array  # best loss at the last checkpoint
    reduced_ckpt: jax.Array  # bool B, step halved at the last checkpoint
    out: _Best


def _apgd_run(vg, x, y, x0, eps, norm, bounds, steps, rho, target):
    """One APGD run from ``x0`` (Algorithm 1 of Croce and Hein 2020)."""
    is_ckpt_np, window_np = apgd_checkpoints(steps)
    is_ckpt = jnp.asarray(is_ckpt_np)
    window = jnp.asarray(window_np)
    loss0, logits0, g0 = vg(x0, target)
    loss0 = loss0.astype(jnp.float32)
    b = x.shape[0]
    state = _APGDState(
        x_cur=x0,
        x_prev=x0,
        grad=g0,
        step=jnp.full((b,), 2.0, jnp.float32) * eps,  # eta^(0) = 2 eps
        x_best=x0,
        grad_best=g0,
        loss_best=loss0,
        loss_prev=loss0,
        n_increase=jnp.zeros((b,), jnp.int32),
        loss_best_ckpt=loss0,
        reduced_ckpt=jnp.ones((b,), jnp.bool_),
        out=_update_best(_empty_best(x), x0, _misclassified(logits0, y), loss0),
    )

    def body(i, s: _APGDState) -> _APGDState:
        alpha = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)  # momentum; none on the first step
        step = _bcast(s.step, x).astype(x.dtype)
        z = project(s.x_cur + step * _ascent_direction(s.grad, norm), x, eps, norm, bounds)
        x_new = project(
            s.x_cur + alpha * (z - s.x_cur) + (1 - alpha) * (s.x_cur - s.x_prev),
            x,
            eps,
            norm,
            bounds,
        )
        loss, logits, g = vg(x_new, target)
        loss = loss.astype(jnp.float32)
        out = _update_best(s.out, x_new, _misclassified(logits, y), loss)
        n_increase = s.n_increase + (loss > s.loss_prev).astype(jnp.int32)
        improved = loss > s.loss_best
        imp_x = _bcast(improved, x)
        x_best = jnp.where(imp_x, x_new, s.x_best)
        grad_best = jnp.where(imp_x, g, s.grad_best)
        loss_best = jnp.where(improved, loss, s.loss_best)

        # Checkpoint: halve the step and restart from the best point if (1) the loss increased in
        # at most a fraction rho of the steps since the last checkpoint (non-strict, as in the
        # authors' code), or (2) the step was not halved at the last checkpoint and the best loss
        # has not improved since.
        ckpt = is_ckpt[i]
        cond1 = n_increase.astype(jnp.float32) <= rho * window[i].astype(jnp.float32)
        cond2 = ~s.reduced_ckpt & (s.loss_best_ckpt >= loss_best)
        reduce = ckpt & (cond1 | cond2)
        red_x = _bcast(reduce, x)
        return _APGDState(
            x_cur=jnp.where(red_x, x_best, x_new),
            x_prev=s.x_cur,
            grad=jnp.where(red_x, grad_best, g),
            step=jnp.where(reduce, s.step / 2, s.step),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            loss_prev=loss,
            n_increase=jnp.where(ckpt, 0, n_increase),
            loss_best_ckpt=jnp.where(ckpt, loss_best, s.loss_best_ckpt),
            reduced_ckpt=jnp.where(ckpt, reduce, s.reduced_ckpt),
            out=out,
        )

    # Once every example is misclassified the run's outcome is settled: stop (a robust example
    # keeps the loop going for the full budget, so robust accuracy is unaffected).
    _, state = jax.lax.while_loop(
        lambda c: (c[0] < steps) & ~jnp.all(c[1].out.adv),
        lambda c: (c[0] + 1, body(c[0], c[1])),
        (jnp.int32(0), state),
    )
    return state.out


def apgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    n_target_classes: int | None = None,
    rho: float = 0.75,
    x_init: jax.Array | None = None,
) -> jax.Array:
    """Auto-PGD (Croce and Hein 2020, arXiv 2003.01690), untargeted or targeted (APGD-T).

    Each run starts on the sphere of the ball, takes a first step of length ``eta = 2 eps`` and then
    momentum steps ``z = P(x_k + eta d(grad)); x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k -
    x_{k-1}))``. At the checkpoints of :func:`apgd_checkpoints` the step is halved, and the iterate
    reset to the best point of the run, where the loss increased in at most ``rho`` of the steps
    since the last checkpoint, or where the step was not halved at the last checkpoint and the best
    loss has not improved since. A run stops early once every example of the batch is
    misclassified.

    With ``loss="dlr-targeted"`` (APGD-T) the attack runs once per target class (``restarts`` runs
    each): the 2nd, 3rd, ... ``(n_target_classes + 1)``-th highest clean logits.

    Args:
      logits_fn: maps a batch ``x_Bx...`` to logits ``B x K``.
      x: clean inputs inside ``bounds``.
      y: integer labels ``B``.
      key: PRNG key for the starting points.
      eps: radius of the threat model (may be traced).
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs.
      steps: iterations per run (static).
      restarts: runs (per target for APGD-T), skipped once every example is broken.
      loss: ``"ce"`` (APGD-CE), ``"dlr"``, ``"cw"`` or ``"dlr-targeted"`` (APGD-T).
      n_target_classes: targets of APGD-T; default ``min(9, K - 1)`` (AutoAttack uses 9).
      rho: threshold of condition 1 (0.75).
      x_init: optional starting point of the first run (projected onto the ball and bounds);
        the other runs start at random on the sphere.

    Returns:
      Adversarial inputs, shape and dtype of ``x``: per example the first-found misclassified point
      of highest loss, else the highest-loss point of all runs.
    """
    norm, lo, hi, n_classes = _check_common(logits_fn, x, y, eps, norm, bounds)
    steps = _check_int("steps", steps)
    restarts = _check_int("restarts", restarts)
    loss = _check_choice("loss", loss, APGD_LOSSES)
    _check_loss_classes(loss, n_classes)
    rho = float(rho)
    if not 0.0 < rho < 1.0:
        raise ValueError(f"`rho` must be in (0, 1); got {rho}.")
    bounds = (lo, hi)
    _check_x_init(x_init, x)
    vg = _make_value_and_grad(logits_fn, loss, y)

    if loss == "dlr-targeted":
        if n_target_classes is None:
            n_target_classes = min(9, n_classes - 1)
        n_target_classes = _check_int("n_target_classes", n_target_classes)
        if n_target_classes > n_classes - 1:
            raise ValueError(
                f"`n_target_classes` must be <= n_classes - 1 = {n_classes - 1}; "
                f"got {n_target_classes}."
            )
        clean_logits = jax.lax.stop_gradient(logits_fn(x))
        # Targets: the 2nd, 3rd, ... highest clean logits.
        targets = jax.lax.top_k(clean_logits, n_target_classes + 1)[1][:, 1:].astype(y.dtype)
        n_runs = n_target_classes * restarts
    else:
        targets = None
        n_runs = restarts

    def run(k, r):
        target = None if targets is None else jnp.take(targets, r // restarts, axis=1)
        x0 = _first_start(x_init, _apgd_start(k, x, eps, norm, bounds), r, x, eps, norm, bounds)
        return _apgd_run(vg, x, y, x0, eps, norm, bounds, steps, rho, target)

    return _runs(n_runs, key, _empty_best(x), run).x


apgd_ce = functools.partial(apgd, loss="ce")
apgd_ce.__doc__ = "APGD on the cross-entropy loss: ``apgd(..., loss='ce')``."
apgd_t = functools.partial(apgd, loss="dlr-targeted")
apgd_t.__doc__ = "APGD-T, targeted DLR over the top classes: ``apgd(..., loss='dlr-targeted')``."


# ----------------------------------------------------------------------------------------------
# Empirical local Lipschitz constant.
# ----------------------------------------------------------------------------------------------


def local_lipschitz(
    logits_fn: LogitsFn,
    x: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    steps: int = 20,
    step_size: Any = None,
) -> jax.Array:
    """Per-example empirical local Lipschitz constant of ``logits_fn`` around ``x``.

    ``L_b = max ||f(x'_b) - f(x_b)||_2 / ||x'_b - x_b||_2`` over the iterates of a projected
    gradient ascent on ``log`` of that ratio, with ``x'`` in the ``eps``-ball (``norm``) around
    ``x`` and in ``bounds``, started uniformly in the ball (the search of Yang et al. 2020, "A
    closer look at accuracy vs. robustness", with L2 norms on both sides so that it is directly
    comparable with the product of the layers' spectral norms). Every evaluated ``x'`` is a
    witness, so ``L_b`` is a lower bound of the Lipschitz constant of ``f`` on the ball: for a
    network of Dense layers and 1-Lipschitz activations it never exceeds the product of the
    kernels' ``sigma_max``, and for a linear map it approaches ``sigma_max`` when the top right
    singular direction fits in the ball.

    Args:
      logits_fn: maps a batch ``x_Bx...`` to outputs ``B x K``; examples must be independent.
      x: clean inputs inside ``bounds``.
      key: PRNG key of the random starts.
      eps: radius of the search ball (> 0; may be traced).
      norm: ball of the search, ``"linf"`` or ``"l2"``; the ratio always uses L2 norms.
      bounds: ``(lo, hi)`` box of valid inputs.
      steps: ascent steps (static); ``steps + 1`` points are evaluated.
      step_size: default ``eps / 4`` (sign steps for L-inf, unit-L2 steps for L2).

    Returns:
      ``L_B``, one estimate per example, in the outputs' float dtype (at least float32).
    """
    norm = _check_choice("norm", norm, NORMS)
    bounds = check_bounds(bounds)
    check_eps(eps)
    if not _is_tracer(eps) and float(eps) <= 0:
        raise ValueError(f"`eps` must be > 0 for a Lipschitz estimate; got {eps!r}.")
    steps = _check_int("steps", steps)
    if not hasattr(x, "shape") or jnp.ndim(x) < 2:
        raise ValueError(f"`x` must be a batch of shape (B, ...); got {getattr(x, 'shape', x)}.")
    if step_size is None:
        step_size = eps / 4
    else:
        check_eps(step_size, "step_size")
    fx = jax.lax.stop_gradient(_as_float(logits_fn(x)))

    def log_ratio(x_new):
        num = jnp.sum(jnp.square(_as_float(logits_fn(x_new)) - fx), axis=1)
        den = jnp.sum(jnp.square(jnp.reshape(x_new - x, (x.shape[0], -1))), axis=1)
        den = den.astype(num.dtype)
        # 0.5 log(num / den), guarded where x' = x (a start clipped onto x by the box).
        return 0.5 * (jnp.log(num + _TINY**2) - jnp.log(jnp.maximum(den, _TINY**2)))

    vg = jax.value_and_grad(lambda z: jnp.sum(log_ratio(z)))

    def step(carry, _):
        x_cur, best = carry
        best = jnp.maximum(best, log_ratio(x_cur))
        _, g = vg(x_cur)
        x_next = project(x_cur + step_size * _ascent_direction(g, norm), x, eps, norm, bounds)
        return (x_next, best), None

    x0 = _random_start(key, x, eps, norm, bounds, "uniform")
    init = jnp.full((x.shape[0],), -jnp.inf, fx.dtype)
    (x_last, best), _ = jax.lax.scan(step, (x0, init), None, length=steps)
    best = jnp.maximum(best, log_ratio(x_last))
    return jnp.exp(best)


# ----------------------------------------------------------------------------------------------
# Square attack (Andriushchenko et al. 2020).
# ----------------------------------------------------------------------------------------------


def square_p_schedule(n_queries: int, p_init: float = 0.8, rescale: bool = True) -> np.ndarray:
    """Fraction ``p`` of pixels changed at each iteration of the Square attack.

    ``p`` starts at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 (Andriushchenko et al. 2020, schedule designed for 10000 queries). With ``rescale`` the
    iteration index is first mapped to ``int(i / n_queries * 10000)`` so that the whole schedule is
    used within ``n_queries``; AutoAttack's standard version does not rescale (5000 queries).
    """
    n_queries = _check_int("n_queries", n_queries)
    thresholds = np.array([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000])
    it = np.arange(n_queries)
    if rescale:
        it = (it / n_queries * 10000).astype(np.int64)
    n_halvings = np.sum(it[:, None] > thresholds[None, :], axis=1)
    return p_init / 2.0**n_halvings


def _as_image(x: jax.Array) -> tuple[int, int, int]:
    """``(H, W, C)`` seen by Square: NHWC as is, ``B x H x W`` one channel, ``B x D`` one row."""
    if x.ndim == 4:
        return x.shape[1], x.shape[2], x.shape[3]
    if x.ndim == 3:
        return x.shape[1], x.shape[2], 1
    if x.ndim == 2:
        return 1, x.shape[1], 1
    raise ValueError(
        f"square needs inputs of shape (B, H, W, C), (B, H, W) or (B, D); got {x.shape}"
    )


def _square_windows(n_queries, p_init, rescale, h, w, c) -> tuple[np.ndarray, np.ndarray]:
    """Window height and width per iteration: squares of side ``round(sqrt(p * H * W))`` for images
    (at least 1, at most the image), segments of ``round(p * D)`` features for flat inputs."""
    p = square_p_schedule(n_queries, p_init, rescale)
    del c  # the side is sqrt(p * n_features / C): the window spans all channels
    if h == 1:  # flat inputs: a window is a contiguous run of p * D features
        side_w = np.clip(np.round(p * w), 1, w).astype(np.int32)
        return np.ones_like(side_w), side_w
    side = np.clip(np.round(np.sqrt(p * h * w)), 1, min(h, w)).astype(np.int32)
    return side, side


def square(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    n_queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    rescale_schedule: bool = True,
) -> jax.Array:
    """Square attack (Andriushchenko et al. 2020, arXiv 1912.00049), score-based, L-inf only.

    Uses only forward passes of ``logits_fn`` (no gradients). It starts from vertical stripes
    ``x + eps * s`` with a random sign per column and channel, then repeats: pick a random square
    window (side from :func:`square_p_schedule`), set it to ``x +/- eps`` with one random sign per
    channel, and keep the proposal when it lowers the margin ``z_y - max_{j != y} z_j``. An example
    stops being updated once misclassified; the loop exits early when the whole batch is.
    Windows and signs are drawn independently per example.

    Args:
      logits_fn: maps a batch to logits ``B x K``.
      x: clean inputs inside ``bounds``; ``B x H x W x C`` (NHWC), ``B x H x W`` or ``B x D``.
      y: integer labels ``B``.
      key: PRNG key.
      eps: L-inf radius (may be traced).
      norm: must be ``"linf"`` (the L2 variant is not implemented).
      bounds: ``(lo, hi)`` box of valid inputs.
      n_queries: iterations (one forward pass each) per restart, after the initial query.
      p_init: initial fraction of pixels changed (0.8 in AutoAttack's standard version).
      restarts: independent runs, skipped once every example is broken.
      rescale_schedule: map the 10000-query p-schedule onto ``n_queries``.

    Returns:
      Adversarial inputs, shape and dtype of ``x``.
    """
    norm, lo, hi, _ = _check_common(logits_fn, x, y, eps, norm, bounds)
    if norm != "linf":
        raise ValueError("square: only norm='linf' is implemented; use apgd/pgd for L2.")
    n_queries = _check_int("n_queries", n_queries)
    restarts = _check_int("restarts", restarts)
    p_init = _check_positive_float("p_init", p_init)
    if p_init > 1:
        raise ValueError(f"`p_init` must be in (0, 1]; got {p_init}.")
    bounds = (lo, hi)
    h, w, c = _as_image(x)
    b = x.shape[0]
    img_shape = (b, h, w, c)
    win_h_np, win_w_np = _square_windows(n_queries, p_init, rescale_schedule, h, w, c)
    win_h = jnp.asarray(win_h_np)
    win_w = jnp.asarray(win_w_np)
    x_img = jnp.reshape(x, img_shape)
    rows = jnp.arange(h)
    cols = jnp.arange(w)

    def margin(x_img_adv):
        return -margin_loss(logits_fn(jnp.reshape(x_img_adv, x.shape)), y)

    def proj(v):
        return project(v, x_img, eps, "linf", bounds)

    def run(k, r):
        del r
        k_init, k_loop = jax.random.split(k)
        stripes = jax.random.rademacher(k_init, (b, 1, w, c), x.dtype)
        x_best = proj(x_img + eps * stripes)
        m_best = margin(x_best)

        def cond(state):
            i, _, m = state
            return (i < n_queries) & jnp.any(m > 0)

        def body(state):
            i, xb, m = state
            k_h, k_w, k_s = jax.random.split(jax.random.fold_in(k_loop, i), 3)
            sh, sw = win_h[i], win_w[i]
            top = jax.random.randint(k_h, (b,), 0, h - sh + 1)
            left = jax.random.randint(k_w, (b,), 0, w - sw + 1)
            in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + sh)[:, None])
            in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + sw)[:, None])
            window = in_rows[:, :, None, None] & in_cols[:, None, :, None]
            signs = jax.random.rademacher(k_s, (b, 1, 1, c), x.dtype)
            x_new = proj(jnp.where(window, xb + 2 * eps * signs, xb))
            m_new = margin(x_new)
            accept = (m > 0) & ((m_new < m) | (m_new <= 0))
            xb = jnp.where(accept[:, None, None, None], x_new, xb)
            return i + 1, xb, jnp.where(accept, m_new, m)

        _, x_best, m_best = jax.lax.while_loop(cond, body, (jnp.int32(0), x_best, m_best))
        # ``margin <= 0`` may be a tie; the returned flag uses argmax like every other attack.
        adv = _misclassified(logits_fn(jnp.reshape(x_best, x.shape)), y)
        return _Best(jnp.reshape(x_best, x.shape), adv, -m_best.astype(jnp.float32))

    return _runs(restarts, key, _empty_best(x), run).x


# ----------------------------------------------------------------------------------------------
# AutoAttack-style ensemble.
# ----------------------------------------------------------------------------------------------

# Indices of ``AutoAttackResult.broken_by`` (fixed, whatever the version runs).
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-t", "square")


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
    """Budgets of the AutoAttack ensemble (Croce and Hein 2020).

    ``AutoAttackConfig()`` is the reference "standard" version: APGD-CE (100 iterations, 1 restart),
    APGD-T (100 iterations, 9 target classes, 1 restart each), Square (5000 queries, ``p_init =
    0.8``, schedule not rescaled). FAB-T is not implemented. Square is L-inf only and is skipped for
    L2, where the ensemble is APGD-CE + APGD-T.
    """

    apgd_ce_steps: int = 100
    apgd_ce_restarts: int = 1
    apgd_t_steps: int = 100
    apgd_t_targets: int = 9
    apgd_t_restarts: int = 1
    square_queries: int = 5000
    square_p_init: float = 0.8
    square_restarts: int = 1
    square_rescale_schedule: bool = False
    rho: float = 0.75

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                _check_int(f.name, v)


AUTOATTACK_STANDARD = AutoAttackConfig()
# For CI and per-checkpoint monitoring: ~8x cheaper than standard on points that survive.
AUTOATTACK_FAST = AutoAttackConfig(
    apgd_ce_steps=25,
    apgd_t_steps=25,
    apgd_t_targets=3,
    square_queries=250,
    square_rescale_schedule=True,
)
AUTOATTACK_VERSIONS = {"standard": AUTOATTACK_STANDARD, "fast": AUTOATTACK_FAST}


def _autoattack_config(version: str | AutoAttackConfig) -> AutoAttackConfig:
    if isinstance(version, AutoAttackConfig):
        return version
    return AUTOATTACK_VERSIONS[_check_choice("version", version, tuple(AUTOATTACK_VERSIONS))]


def autoattack_members(
    version: str | AutoAttackConfig = "standard", *, n_classes: int, norm: str = "linf"
) -> list[tuple[str, AttackFn]]:
    """The attacks of an AutoAttack version, in order, as ``(name, attack)`` pairs.

    Each ``attack(logits_fn, x, y, *, key, eps, norm, bounds)`` returns adversarial inputs. APGD-T
    uses ``min(apgd_t_targets, n_classes - 1)`` targets and is left out below 4 classes (the
    targeted DLR loss needs 4); Square is left out for L2.
    """
    cfg = _autoattack_config(version)
    norm = _check_choice("norm", norm, NORMS)
    n_classes = _check_int("n_classes", n_classes, 2)
    members: list[tuple[str, AttackFn]] = [
        (
            "apgd-ce",
            functools.partial(
                apgd, loss="ce", steps=cfg.apgd_ce_steps, restarts=cfg.apgd_ce_restarts, rho=cfg.rho
            ),
        )
    ]
    if n_classes >= 4:
        members.append(
            (
                "apgd-t",
                functools.partial(
                    apgd,
                    loss="dlr-targeted",
                    steps=cfg.apgd_t_steps,
                    restarts=cfg.apgd_t_restarts,
                    n_target_classes=min(cfg.apgd_t_targets, n_classes - 1),
                    rho=cfg.rho,
                ),
            )
        )
    if norm == "linf":
        members.append(
            (
                "square",
                functools.partial(
                    square,
                    n_queries=cfg.square_queries,
                    p_init=cfg.square_p_init,
                    restarts=cfg.square_restarts,
                    rescale_schedule=cfg.square_rescale_schedule,
                ),
            )
        )
    return members


class AutoAttackResult(NamedTuple):
    """Output of :func:`auto_attack`.

    Attributes:
      x_adv: adversarial inputs (``x`` itself where nothing broke the example).
      robust: bool ``B``: correctly classified on ``x`` and on every attack's output.
      clean_correct: bool ``B``: correctly classified on ``x``.
      broken_by: int32 ``B``: index in ``AUTOATTACK_ATTACKS`` of the first attack whose output is
        misclassified; ``-1`` if no attack broke the example, i.e. it is robust or was already
        misclassified on ``x`` (tell the two apart with ``clean_correct``).
    """

    x_adv: jax.Array
    robust: jax.Array
    clean_correct: jax.Array
    broken_by: jax.Array


def auto_attack(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: Any,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    version: str | AutoAttackConfig = "standard",
) -> AutoAttackResult:
    """AutoAttack-style worst case over APGD-CE, APGD-T and Square (Croce and Hein 2020).

    The attacks run in that order; an example counts as broken by the first attack whose output is
    misclassified (checked here with ``argmax logits_fn(x_adv) != y``), and later attacks only
    matter for the examples still robust. Shapes are fixed, so each attack processes the whole
    batch; an attack is skipped (``lax.cond``) when no example is left. For cost-efficient
    evaluation of a data set, :func:`tscnc_jax.evaluation.evaluate_robustness` instead re-batches
    the surviving examples between attacks.

    Args:
      logits_fn: maps a batch to logits ``B x K``.
      x: clean inputs inside ``bounds``.
      y: integer labels ``B``.
      key: PRNG key (attack ``i`` uses ``fold_in(key, i)``).
      eps: radius of the threat model.
      norm: ``"linf"`` or ``"l2"`` (L2: no Square).
      bounds: ``(lo, hi)`` box of valid inputs.
      version: ``"standard"``, ``"fast"`` or an :class:`AutoAttackConfig`.

    Returns:
      An :class:`AutoAttackResult`.
    """
    norm, lo, hi, n_classes = _check_common(logits_fn, x, y, eps, norm, bounds)
    members = autoattack_members(version, n_classes=n_classes, norm=norm)
    clean_correct = ~_misclassified(logits_fn(x), y)
    state = (x, clean_correct, jnp.full(y.shape, -1, jnp.int32))
    for name, attack in members:
        idx = AUTOATTACK_ATTACKS.index(name)

        def run(s, attack=attack, idx=idx):
            x_adv, robust, broken_by = s
            x_m = attack(
                logits_fn,
                x,
                y,
                key=jax.random.fold_in(key, idx),
                eps=eps,
                norm=norm,
                bounds=(lo, hi),
            )
            newly = robust & _misclassified(logits_fn(x_m), y)
            return (
                jnp.where(_bcast(newly, x), x_m, x_adv),
                robust & ~newly,
                jnp.where(newly, idx, broken_by),
            )

        state = jax.lax.cond(jnp.any(state[1]), run, lambda s: s, state)
    x_adv, robust, broken_by = state
    return AutoAttackResult(x_adv, robust, clean_correct, broken_by)


# ----------------------------------------------------------------------------------------------
# Registry used by the evaluation driver.
# ----------------------------------------------------------------------------------------------

ATTACKS: dict[str, AttackFn] = {
    "fgsm": fgsm,
    "pgd": functools.partial(pgd, steps=20),
    "pgd-cw": functools.partial(pgd, steps=20, loss="cw"),
    "apgd-ce": functools.partial(apgd, loss="ce", steps=100),
    "apgd-dlr": functools.partial(apgd, loss="dlr", steps=100),
    "apgd-t": functools.partial(apgd, loss="dlr-targeted", steps=100),
    "square": functools.partial(square, n_queries=5000, rescale_schedule=False),
}
"""Named attacks with reference budgets: ``"pgd"`` is PGD-20 (CE), ``"apgd-*"`` 100 iterations,
``"apgd-t"`` ``min(9, K - 1)`` targets, ``"square"`` 5000 queries."""


def get_attack(name: str) -> AttackFn:
    """Returns the attack registered under ``name`` in :data:`ATTACKS` (``ValueError`` if none)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}.")
    return ATTACKS[name]
