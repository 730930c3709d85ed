"""FAB (Croce and Hein 2020, arXiv 1907.02044): the fast adaptive boundary attack, a minimum-norm
attack that steps onto the linearised decision boundary, untargeted or targeted (FAB-T, as in
AutoAttack).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tscnc_jax._validation import check_choice, check_int, check_positive_float
from tscnc_jax.attacks._common import (
    NORMS,
    Best,
    LogitsFn,
    apgd_start,
    as_float,
    bcast,
    check_bounds,
    check_common,
    check_eps,
    check_inputs,
    label_logit,
    misclassified,
    perturbation_norm,
    project,
    run_restarts,
    target_class_count,
)

# Floor of the step norms in the bias ``alpha`` (as in the authors' code): keeps ``a / (a + b)``
# defined when the current point already lies on the linearised boundary.
_NORM_FLOOR = 1e-8
# Guard of the distance ``|f| / ||g||_q`` used to pick the closest class (untargeted FAB).
_DIST_TINY = 1e-12

# ----------------------------------------------------------------------------------------------
# Projection onto a hyperplane intersected with the box.
# ----------------------------------------------------------------------------------------------


def hyperplane_box_step(
    p: jax.Array, w: jax.Array, c: jax.Array, bounds: tuple[float, float], norm: str
) -> jax.Array:
    """Per row, the smallest step ``d`` in ``norm`` with ``<w, d> = c`` and ``lo <= p + d <= hi``.

    This is FAB's projection onto the hyperplane ``{z : <w, z> = <w, p> + c}`` intersected with the
    box (Croce and Hein 2020, arXiv 1907.02044), solved exactly. With ``c >= 0`` (flip ``w`` and
    ``c`` otherwise) the step moves coordinate ``i`` by ``sign(w_i) m_i(t)``, at most the room
    ``r_i`` left in the box in that direction: ``m_i(t) = min(t |w_i|, r_i)`` for L2 (``t`` the KKT
    multiplier; the Euclidean projection, unique) and ``m_i(t) = min(t, r_i)`` for L-inf (``t`` the
    radius; of the minimisers of the L-inf norm, the one that moves every coordinate as far as the
    radius allows, as in the authors' code). ``h(t) = <w, d(t)>`` is nondecreasing and piecewise
    linear with kinks where coordinates saturate: sorting the kinks and cumulating the saturated
    and the free parts gives ``h`` at every kink, hence the piece on which ``h(t) = c`` and ``t`` in
    closed form, in ``O(D log D)`` per row. Where even the full room falls short (the hyperplane
    misses the box) the step goes as far as the box allows, ``d_i = sign(w_i) r_i``: the box point
    closest to the hyperplane along ``w``.

    Args:
      p: points ``N x D`` inside ``bounds``.
      w: normals ``N x D``.
      c: targets ``N`` of ``<w, d>``.
      bounds: ``(lo, hi)``.
      norm: ``"linf"`` or ``"l2"``.

    Returns:
      The steps ``d``, ``N x D``.
    """
    lo, hi = bounds
    flip = jnp.where(c < 0, -1.0, 1.0).astype(w.dtype)
    w = w * flip[:, None]
    c = c * flip
    aw = jnp.abs(w)
    room = jnp.where(w > 0, hi - p, jnp.where(w < 0, p - lo, 0.0))
    room = jnp.maximum(room, 0.0)
    if norm == "linf":
        kink, slope = room, aw  # m_i = min(t, r_i): slope |w_i| until t = r_i
    else:
        kink = jnp.where(aw > 0, room / jnp.where(aw > 0, aw, 1.0), jnp.inf)
        slope = aw * aw  # m_i = min(t |w_i|, r_i): slope w_i^2 until t = r_i / |w_i|
    order = jnp.argsort(kink, axis=1)
    kink_s = jnp.take_along_axis(kink, order, axis=1)
    slope_s = jnp.take_along_axis(slope, order, axis=1)
    full_s = jnp.take_along_axis(aw * room, order, axis=1)  # |w_i| r_i once saturated
    zero = jnp.zeros_like(c)[:, None]
    # Over the kinks in increasing order: the saturated part up to and including kink k, the
    # slope of the coordinates still free from kink k on, and h at every kink.
    saturated = jnp.cumsum(full_s, axis=1)
    free_from = jnp.concatenate([jnp.cumsum(slope_s[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    free_after = free_from[:, 1:]
    h_at_kink = saturated + jnp.where(free_after > 0, kink_s * free_after, 0.0)
    k = jnp.sum(h_at_kink < c[:, None], axis=1)  # kinks passed before h reaches c
    # Between kinks k - 1 and k: h(t) = saturated[k - 1] + t * free_from[k].
    sat_prev = jnp.take_along_axis(jnp.concatenate([zero, saturated], 1), k[:, None], 1)[:, 0]
    free_prev = jnp.take_along_axis(free_from, k[:, None], 1)[:, 0]
    t = (c - sat_prev) / jnp.maximum(free_prev, jnp.finfo(w.dtype).tiny)
    t = jnp.where(k < w.shape[1], jnp.maximum(t, 0.0), jnp.inf)  # unreachable: full room
    if norm == "linf":
        move = jnp.minimum(t[:, None], room)
    else:
        move = jnp.where(aw > 0, jnp.minimum(t[:, None] * aw, room), 0.0)
    return jnp.sign(w) * move


# ----------------------------------------------------------------------------------------------
# One FAB run.
# ----------------------------------------------------------------------------------------------


class _FABState(NamedTuple):
    i: jax.Array
    x_cur: jax.Array  # current iterate
    x_best: jax.Array  # smallest-norm misclassified point of the run (x where none)
    norm_best: jax.Array  # its norm, inf where none


def _boundary_fn(logits_fn, y, target, norm):
    """``boundary(x_cur) -> (f_B, g_BxD)``: the linearisation ``f + <g, z - x_cur>`` of the
    decision function whose zero set FAB steps onto, ``z_t - z_y`` for a target ``t`` or, without
    one, of the class ``j != y`` with the closest linearised boundary, ``|f_j| / ||g_j||_q``
    (``q`` the dual norm)."""
    if target is not None:

        def diff(z):
            logits = as_float(logits_fn(z))
            f = label_logit(logits, target) - label_logit(logits, y)
            return jnp.sum(f), f

        grad_fn = jax.grad(diff, has_aux=True)

        def targeted(x_cur):
            g, f = grad_fn(x_cur)
            return f, g.reshape(g.shape[0], -1)

        return targeted

    def untargeted(x_cur):
        logits, vjp = jax.vjp(logits_fn, x_cur)
        b, k = logits.shape
        cot = jnp.broadcast_to(jnp.eye(k, dtype=logits.dtype)[:, None, :], (k, b, k))
        (jac,) = jax.vmap(vjp)(cot)  # K x B x ...: the gradient of every logit
        jac = jnp.moveaxis(jac.reshape(k, b, -1), 0, 1)  # B x K x D
        logits = as_float(logits)
        jac = jac.astype(logits.dtype)
        f_all = logits - label_logit(logits, y)[:, None]
        g_all = jac - jnp.take_along_axis(jac, y[:, None, None].astype(jnp.int32), axis=1)
        dual = jnp.sum(jnp.abs(g_all), -1) if norm == "linf" else jnp.linalg.norm(g_all, axis=-1)
        dist = jnp.abs(f_all) / (dual + _DIST_TINY)
        dist = jnp.where(jax.nn.one_hot(y, k, dtype=jnp.bool_), jnp.inf, dist)
        j = jnp.argmin(dist, axis=1)
        f = jnp.take_along_axis(f_all, j[:, None], axis=1)[:, 0]
        g = jnp.take_along_axis(g_all, j[:, None, None], axis=1)[:, 0]
        return f, g

    return untargeted


def _fab_run(logits_fn, x, y, target, x_start, *, norm, bounds, steps, alpha_max, eta, beta,
             stop_below) -> tuple[jax.Array, jax.Array]:
    """One FAB run from ``x_start`` (Croce and Hein 2020, arXiv 1907.02044): ``(x_best,
    norm_best)``, the smallest misclassified point of the run and its norm (``x``, ``inf`` where
    none; ``x``, 0 where ``x`` is misclassified).

    Stops early once every example has a misclassified point of norm ``<= stop_below``.
    """
    lo, hi = bounds
    b = x.shape[0]
    boundary = _boundary_fn(logits_fn, y, target, norm)
    ct = jnp.promote_types(x.dtype, jnp.float32)
    x0 = x.reshape(b, -1).astype(ct)
    clean_adv = misclassified(logits_fn(x), y)

    def body(s: _FABState) -> _FABState:
        f, g = boundary(s.x_cur)
        w = jax.lax.stop_gradient(g).astype(ct)
        f = jax.lax.stop_gradient(f).astype(ct)
        xc = s.x_cur.reshape(b, -1).astype(ct)
        # The boundary f + <w, z - x_cur> = 0, reached from x_cur by <w, d> = -f and from the
        # clean point by <w, d> = -f - <w, x0 - x_cur>.
        c_cur = -f
        c_orig = -f + jnp.sum(w * (xc - x0), axis=1)
        d = hyperplane_box_step(
            jnp.concatenate([xc, x0]), jnp.concatenate([w, w]),
            jnp.concatenate([c_cur, c_orig]), (lo, hi), norm)
        d_cur, d_orig = d[:b], d[b:]
        a = jnp.maximum(perturbation_norm(d, norm), _NORM_FLOOR)
        a_cur, a_orig = a[:b], a[b:]
        # Biased step: the farther the boundary from x_cur relative to x0, the more weight on the
        # projection of x0, which keeps the perturbation small.
        alpha = jnp.clip(a_cur / (a_cur + a_orig), 0.0, alpha_max)[:, None]
        x_new = (1 - alpha) * (xc + eta * d_cur) + alpha * (x0 + eta * d_orig)
        x_new = jnp.clip(x_new, lo, hi).reshape(x.shape).astype(x.dtype)
        adv = misclassified(logits_fn(x_new), y)
        n_new = perturbation_norm(x_new - x, norm).astype(s.norm_best.dtype)
        better = adv & (n_new < s.norm_best)
        # Once past the boundary, step back towards the clean point (stays in the box: convex).
        x_back = (x + beta * (x_new - x)).astype(x.dtype)
        return _FABState(
            i=s.i + 1,
            x_cur=jnp.where(bcast(adv, x), x_back, x_new),
            x_best=jnp.where(bcast(better, x), x_new, s.x_best),
            norm_best=jnp.where(better, n_new, s.norm_best),
        )

    state = _FABState(
        i=jnp.int32(0),
        x_cur=x_start,
        x_best=x,
        norm_best=jnp.where(clean_adv, 0.0, jnp.inf).astype(ct),
    )
    state = jax.lax.while_loop(
        lambda s: (s.i < steps) & ~jnp.all(s.norm_best <= stop_below), body, state
    )
    return state.x_best, state.norm_best


# ----------------------------------------------------------------------------------------------
# Public attacks.
# ----------------------------------------------------------------------------------------------


def _check_fab_args(steps, restarts, alpha_max, eta, beta) -> tuple[int, int, float, float, float]:
    steps = check_int("steps", steps)
    restarts = check_int("restarts", restarts)
    alpha_max = check_positive_float("alpha_max", alpha_max)
    if alpha_max > 1:
        raise ValueError(f"`alpha_max` must be in (0, 1]; got {alpha_max}.")
    eta = check_positive_float("eta", eta)
    if eta < 1:
        raise ValueError(f"`eta` (overshoot) must be >= 1; got {eta}.")
    beta = check_positive_float("beta", beta)
    if beta >= 1:
        raise ValueError(f"`beta` (backward step) must be in (0, 1); got {beta}.")
    return steps, restarts, alpha_max, eta, beta


def _targets(logits_fn, x, y, targeted, n_target_classes, n_classes):
    """``(targets_BxT or None, T)``: the 2nd, 3rd, ... highest clean logits (AutoAttack)."""
    if not targeted:
        return None, 1
    n_target_classes = target_class_count(n_target_classes, n_classes)
    clean_logits = jax.lax.stop_gradient(logits_fn(x))
    targets = jax.lax.top_k(clean_logits, n_target_classes + 1)[1][:, 1:].astype(y.dtype)
    return targets, n_target_classes


def _run_start(key, r, restarts, x, radius, norm, bounds):
    """The first run of each target starts at ``x``, later ones on the sphere of ``radius``."""
    if restarts == 1:
        return x
    return jnp.where(r % restarts == 0, x, apgd_start(key, x, radius, norm, bounds))


def fab(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array, eps: Any,
        norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), steps: int = 100,
        restarts: int = 1, n_target_classes: int | None = None, targeted: bool = True,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> jax.Array:
    """FAB, the fast adaptive boundary attack (Croce and Hein 2020, arXiv 1907.02044), in the
    threat model ``||x_adv - x|| <= eps``; FAB-T (``targeted=True``) as in AutoAttack.

    FAB looks for the smallest perturbation that changes the decision. At the iterate ``x_k`` it
    linearises the decision function (``z_t - z_y`` for a target ``t``; untargeted: of the class
    whose linearised boundary is closest), projects both ``x_k`` and the clean ``x`` onto that
    hyperplane intersected with the box (:func:`hyperplane_box_step`, exact), giving steps ``d_k``
    and ``d_0``, and moves to

        ``x_{k+1} = clip((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_0))``,
        ``alpha = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max)``,

    the overshoot ``eta`` crossing the boundary, the bias ``alpha`` keeping the point close to
    ``x``. Once ``x_{k+1}`` is misclassified it is recorded if it is the smallest so far, and the
    iterate steps back to ``x + beta (x_{k+1} - x)``. The first run of each target starts at ``x``;
    further ``restarts`` start on the sphere of radius ``eps / 2`` (AutoAttack's choice). FAB-T runs
    once per target (``restarts`` runs each): the 2nd, 3rd, ... ``(n_target_classes + 1)``-th
    highest clean logits. A run stops early once every example has a misclassified point within
    ``eps``, and runs are skipped once every example is broken.

    The result honours the threat model: per example the smallest misclassified point found,
    projected onto the ``eps``-ball (a FAB point slightly outside is kept only if its projection
    is still misclassified), else ``x`` itself. Each iteration costs one forward + input-gradient
    pass (untargeted: one per class) and one forward pass.

    Args:
      logits_fn, x, y, eps, norm, bounds: the attacks' shared arguments (:mod:`tscnc_jax.attacks`).
      key: PRNG key for the random restarts.
      steps: iterations per run (static; AutoAttack: 100).
      restarts: runs per target (AutoAttack's FAB-T: 1).
      n_target_classes: targets of FAB-T; default ``min(9, K - 1)`` (AutoAttack uses 9). Ignored
        when ``targeted=False``.
      targeted: FAB-T (the default) or untargeted FAB.
      alpha_max: largest bias towards the clean point (0.1).
      eta: overshoot, ``>= 1`` (1.05).
      beta: backward step, in ``(0, 1)`` (0.9).

    Returns:
      Adversarial inputs, shape and dtype of ``x``: per example the smallest-norm misclassified
      point found (projected onto the ball), else ``x``.

    References:
      Croce and Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
      attack", ICML, arXiv 1907.02044. Croce and Hein 2020, "Reliable evaluation of adversarial
      robustness with an ensemble of diverse parameter-free attacks", arXiv 2003.01690 (FAB-T).
    """
    norm, lo, hi, n_classes = check_common(logits_fn, x, y, eps, norm, bounds)
    steps, restarts, alpha_max, eta, beta = _check_fab_args(steps, restarts, alpha_max, eta, beta)
    bounds = (lo, hi)
    targets, n_targets = _targets(logits_fn, x, y, targeted, n_target_classes, n_classes)

    def run(k, r):
        target = None if targets is None else jnp.take(targets, r // restarts, axis=1)
        x_start = _run_start(k, r, restarts, x, eps / 2, norm, bounds)
        x_best, _ = _fab_run(logits_fn, x, y, target, x_start, norm=norm, bounds=bounds,
                             steps=steps, alpha_max=alpha_max, eta=eta, beta=beta,
                             stop_below=eps)
        # Into the threat model; kept only if still misclassified there.
        x_in = project(x_best, x, eps, norm, bounds)
        adv = misclassified(logits_fn(x_in), y)
        loss = jnp.where(adv, -perturbation_norm(x_in - x, norm), -jnp.inf)
        return Best(jnp.where(bcast(adv, x), x_in, x), adv, loss.astype(jnp.float32))

    return run_restarts(n_targets * restarts, key, _clean_best(logits_fn, x, y), run).x


def _clean_best(logits_fn, x, y) -> Best:
    """Start of the merge: ``x`` itself, already adversarial (norm 0) where misclassified."""
    adv = misclassified(logits_fn(x), y)
    return Best(x, adv, jnp.where(adv, 0.0, -jnp.inf).astype(jnp.float32))


def fab_min_norm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, key: jax.Array,
                 norm: str = "linf", bounds: tuple[float, float] = (0.0, 1.0), steps: int = 100,
                 restarts: int = 1, n_target_classes: int | None = None, targeted: bool = True,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 start_radius: Any = None) -> tuple[jax.Array, jax.Array]:
    """FAB as a minimum-norm attack: the smallest misclassified point it finds, and its norm.

    The iteration of :func:`fab` with no radius: every run uses its full budget and no run is
    skipped, and nothing is projected. One call gives the robust accuracy at every radius
    (``norms > eps`` counts the robust examples at ``eps``, up to FAB's strength).

    Args:
      logits_fn, x, y, key, norm, bounds, steps, n_target_classes, targeted, alpha_max, eta,
        beta: as in :func:`fab`.
      restarts: runs per target; the first starts at ``x``, the others on the sphere of radius
        ``start_radius`` around it.
      start_radius: radius of the random starts (required when ``restarts > 1``; :func:`fab` uses
        ``eps / 2``).

    Returns:
      ``(x_adv, norms)``: per example the misclassified point of smallest ``norm`` distance to
      ``x`` found by any run (``x`` itself, norm 0, where ``x`` is misclassified) and that
      distance; ``x`` and ``inf`` where no run found one.
    """
    norm = check_choice("norm", norm, NORMS)
    lo, hi = check_bounds(bounds)
    bounds = (lo, hi)
    n_classes = check_inputs(logits_fn, x, y, bounds)
    steps, restarts, alpha_max, eta, beta = _check_fab_args(steps, restarts, alpha_max, eta, beta)
    if restarts > 1:
        if start_radius is None:
            raise ValueError("`start_radius` is required when `restarts` > 1.")
        check_eps(start_radius, "start_radius")
    targets, n_targets = _targets(logits_fn, x, y, targeted, n_target_classes, n_classes)

    def body(r, carry):
        x_min, n_min = carry
        target = None if targets is None else jnp.take(targets, r // restarts, axis=1)
        x_start = _run_start(jax.random.fold_in(key, r), r, restarts, x, start_radius, norm,
                             bounds)
        x_r, n_r = _fab_run(logits_fn, x, y, target, x_start, norm=norm, bounds=bounds,
                            steps=steps, alpha_max=alpha_max, eta=eta, beta=beta, stop_below=-1.0)
        better = n_r < n_min
        return jnp.where(bcast(better, x), x_r, x_min), jnp.where(better, n_r, n_min)

    ct = jnp.promote_types(x.dtype, jnp.float32)
    n0 = jnp.full((x.shape[0],), jnp.inf, ct)
    return jax.lax.fori_loop(0, n_targets * restarts, body, (x, n0))
