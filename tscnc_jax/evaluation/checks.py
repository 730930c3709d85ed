"""Diagnostics of an evaluation: AutoAttack's checks for common evaluation mistakes
(:func:`autoattack_checks`, run before the attacks), and the gradient-masking diagnostics run
after them (:func:`_masking_diagnostics`: a black-box attack breaking what the white-box ones did
not, a PGD loss that does not grow, accuracy above 0 where the ball covers the whole box)."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax import _validation
from tscnc_jax import attacks as _attacks
from tscnc_jax.attacks._common import TINY as _TINY
from tscnc_jax.attacks._common import apgd_start as _apgd_start
from tscnc_jax.evaluation._batches import _check_data, _chunks, _collect, _predict_all
from tscnc_jax.evaluation._compile import LogitsFn, _fixed_draw, _Jits, _split_model, _unwrap_jit

# Members treated as black-box (score-based) by the gradient-masking check.
_BLACK_BOX_PREFIXES = ("square",)


def _masking_diagnostics(
    jits: _Jits,
    x_all,
    y_all,
    clean_correct,
    member_robust,
    n_broken,
    names,
    cascade,
    *,
    eps,
    norm,
    bounds,
    key,
    batch_size,
) -> list[str]:
    notes = []
    # 1. A black-box attack breaking points that the white-box attacks before it did not.
    is_bb = [any(nm.startswith(p) for p in _BLACK_BOX_PREFIXES) for nm in names]
    white = [nm for nm, bb in zip(names, is_bb, strict=True) if not bb]
    for nm, bb in zip(names, is_bb, strict=True):
        if not bb or not white:
            continue
        if cascade:
            pos = names.index(nm)
            if not any(not b for b in is_bb[:pos]):
                continue
            extra = n_broken[nm]
        else:
            white_robust = np.logical_and.reduce([member_robust[w] for w in white])
            extra = int((white_robust & ~member_robust[nm]).sum())
        if extra > 0:
            notes.append(
                f"possible gradient masking: black-box {nm!r} broke {extra} example(s) that the "
                f"white-box attacks ({', '.join(white)}) did not; on such a model a second Square "
                "run on the survivors (attacks=AutoAttackConfig(square_restarts=2)) may break "
                "more."
            )

    idx = np.flatnonzero(clean_correct)[:batch_size]
    if len(idx) == 0:
        return notes
    part, n_valid = next(_chunks(idx, batch_size))
    xb, yb = jnp.asarray(x_all[part]), jnp.asarray(y_all[part])
    k_curve, k_big = jax.random.split(key)
    # A stochastic model: the diagnostics attack one draw of its randomness (a fixed function).
    mk = None if jits.draws is None else jax.random.fold_in(key, 1)

    # 2. The PGD-CE loss should grow with the steps.
    steps = 20

    def make_curve(apply):
        def curve(arrays, xb, yb, k, e, mk):
            return _attacks.pgd_loss_curve(_fixed_draw(apply, arrays, mk), xb, yb, key=k, eps=e,
                                           norm=norm, bounds=bounds, steps=steps)[1]

        return curve

    curve = functools.partial(jits.get("pgd_loss_curve", steps, make_curve), jits.model.arrays)
    eps_arr = np.asarray(eps, x_all.dtype)
    trace = np.asarray(curve(xb, yb, k_curve, eps_arr, mk))[:, :n_valid].mean(axis=1)
    if eps > 0 and not trace[-1] > trace[0] + 1e-6 * max(1.0, abs(trace[0])):
        notes.append(
            f"possible gradient masking: the mean PGD-{steps} cross-entropy did not increase "
            f"({trace[0]:.4g} at the start, {trace[-1]:.4g} after {steps} steps)."
        )

    # 3. Accuracy should reach 0 when the ball covers the whole box.
    n_features = math.prod(x_all.shape[1:])
    big = (bounds[1] - bounds[0]) * (1.0 if norm == "linf" else math.sqrt(n_features))

    def make_big(apply):
        def attack_big(arrays, xb, yb, k, e, mk):
            logits_fn = _fixed_draw(apply, arrays, mk)
            x_big = _attacks.pgd(logits_fn, xb, yb, key=k, eps=e, norm=norm, bounds=bounds,
                                 steps=20)
            return jnp.argmax(logits_fn(x_big), axis=-1)

        return attack_big

    attack_big = functools.partial(jits.get("pgd_big_eps", 20, make_big), jits.model.arrays)
    pred = np.asarray(attack_big(xb, yb, k_big, np.asarray(big, x_all.dtype), mk))[:n_valid]
    acc_big = float(np.mean(pred == y_all[idx]))
    if acc_big > 0:
        notes.append(
            f"possible gradient masking: PGD-20 leaves {acc_big:.1%} of {n_valid} examples "
            f"correctly classified at eps = {big:.4g}, where the ball covers the whole input box."
        )
    return notes


# ----------------------------------------------------------------------------------------------
# AutoAttack's checks for common evaluation mistakes.
# ----------------------------------------------------------------------------------------------

# Thresholds of the reference, fra31/auto-attack ``autoattack/checks.py``:
_RANDOM_CALLS = 5  # check_randomized: calls on the first batch (n = 5)
_RANDOM_TOL = 1e-4  # ... and its alpha: L2 distance between per-example L2-normalised outputs
_SOFTMAX_TOL = 1e-5  # check_range_output's alpha
# Ours: the share of the examples with a zero gradient that makes a warning. The reference
# (check_zero_gradients) warns on a single example; but a ReLU network has exactly zero gradients
# wherever every unit of a layer is off, which a few examples reach at APGD's start when eps is
# large (the start then lies at the corners of the box), and one example is then a false alarm.
_ZERO_GRAD_FRACTION = 0.1
# JAX's differentiation entry points (public and internal), spotted by name in ``jax`` modules
# while the model is traced: the analogue of check_dynamic's watch on torch's grad/backward.
_DIFFERENTIATION = frozenset({"grad", "value_and_grad", "vjp", "jvp", "linearize",
                              "backward_pass", "jacrev", "jacfwd", "hessian"})


def _eager(logits_fn: Callable) -> Callable:
    """``logits_fn`` without its ``jax.jit`` wrappers (also under a partial): a randomised model
    whose randomness is Python-side (NumPy, a counter) shows it only when run op by op; under
    ``jit`` it is frozen at trace time."""
    fn = _unwrap_jit(logits_fn)
    if isinstance(fn, functools.partial):
        fn = functools.partial(_unwrap_jit(fn.func), *fn.args, **fn.keywords)
    return fn


def _outputs_vary(outs: Sequence[np.ndarray], y: np.ndarray) -> bool:
    """The reference's criterion: the number of correct predictions differs between calls, or
    two calls' per-example L2-normalised outputs differ by more than ``_RANDOM_TOL`` in L2."""
    normed = [o / (np.linalg.norm(o, axis=1, keepdims=True) + 1e-10)
              for o in (np.asarray(o, np.float64) for o in outs)]
    n_correct = {int(np.sum(np.argmax(o, axis=1) == y)) for o in normed}
    diff = max(float(np.linalg.norm(a - b, axis=1).max())
               for i, a in enumerate(normed) for b in normed[i + 1:])
    return len(n_correct) > 1 or diff > _RANDOM_TOL


def _looks_like_probabilities(out: np.ndarray) -> bool:
    """check_range_output: every entry in ``(-tol, 1 + tol)`` and every row summing to 1 within
    ``tol``, with ``tol = 1e-5`` (the reference), or a few ulps of a coarser output dtype."""
    tol = max(_SOFTMAX_TOL, 8 * float(jnp.finfo(out.dtype).eps))
    o = np.asarray(out, np.float64)
    return bool(o.max() < 1 + tol and o.min() > -tol and np.all(np.abs(o.sum(axis=1) - 1) < tol))


def _differentiation_calls(fn: Callable, *args) -> list[str]:
    """Names of JAX's differentiation functions called while ``fn(*args)`` is traced (abstractly,
    nothing runs). A fresh wrapper is traced, so that ``jax.eval_shape``'s cache of ``fn``
    cannot hide its Python; a function ``fn`` calls that JAX has traced and cached before is
    still not re-run (a limit of the check)."""
    seen: list[str] = []

    def hook(frame, event, arg):
        del arg
        if (event == "call" and frame.f_code.co_name in _DIFFERENTIATION
                and str(frame.f_globals.get("__name__", "")).startswith("jax")):
            seen.append(frame.f_code.co_name)

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        jax.eval_shape(lambda *a: fn(*a), *args)
    finally:
        sys.setprofile(previous)
    return seen


def _n_classes_note(attacks: Any, n_classes: int) -> str | None:
    """check_n_classes: the members an AutoAttack version loses, or the targets it cannot have,
    with ``n_classes`` classes (``autoattack_members`` leaves them out rather than failing)."""
    if isinstance(attacks, _attacks.AutoAttackConfig):
        cfg, label = attacks, "this AutoAttack configuration"
    elif isinstance(attacks, str) and attacks in _attacks.AUTOATTACK_VERSIONS:
        cfg, label = _attacks.AUTOATTACK_VERSIONS[attacks], f"AutoAttack's {attacks!r} version"
    else:
        return None
    lost = []
    if cfg.apgd_dlr_restarts > 0 and n_classes < 3:
        lost.append("APGD-DLR is left out (the DLR loss needs 3 classes)")
    if cfg.apgd_t_targets > 0 and n_classes < 4:
        lost.append("APGD-T is left out (the targeted DLR loss needs 4 classes)")
    elif cfg.apgd_t_targets > n_classes - 1:
        lost.append(f"APGD-T attacks {n_classes - 1} target classes, not {cfg.apgd_t_targets}")
    if cfg.fab_t_targets > n_classes - 1:
        lost.append(f"FAB-T attacks {n_classes - 1} target classes, not {cfg.fab_t_targets}")
    if not lost:
        return None
    return (
        f"with {n_classes} classes {label} runs a reduced ensemble: {'; '.join(lost)}. Its robust "
        "accuracy is an upper bound that the full ensemble might lower (AutoAttack's "
        "n_classes check)."
    )


def _autoattack_checks(jits: _Jits, logits_fn, x_all, y_all, clean_correct, attacks, n_classes,
                       *, eps, norm, bounds, key, batch_size) -> list[str]:
    """The notes of :func:`autoattack_checks` (see there), on the first batch."""
    notes = []
    stochastic = jits.draws is not None
    fn = _eager(logits_fn)
    xb = jnp.asarray(x_all[:batch_size])
    yb = y_all[:batch_size]
    k_draw, k_grad = jax.random.split(key)
    ref = "fra31/auto-attack, autoattack/checks.py"

    # 1. Randomness (check_randomized).
    if not stochastic:
        outs = [np.asarray(fn(xb)) for _ in range(_RANDOM_CALLS)]
        if _outputs_vary(outs, yb):
            notes.append(
                f"the model's outputs differ between {_RANDOM_CALLS} calls on the same inputs "
                f"(AutoAttack's randomness check, {ref}): a randomised defence? The deterministic "
                "ensemble is not the right evaluation for it, and under jax.jit its Python-side "
                "randomness is frozen at trace time. Give the model its randomness as a key, "
                "logits_fn(x, key), and evaluate it with stochastic=True and attacks='rand' "
                "(AutoAttack's version for randomised defences: APGD with Expectation over "
                "Transformation)."
            )
    else:
        same = [np.asarray(fn(xb, k_draw)) for _ in range(2)]
        outs = [same[0]] + [np.asarray(fn(xb, jax.random.fold_in(k_draw, d)))
                            for d in range(1, _RANDOM_CALLS)]
        if _outputs_vary(same, yb):
            notes.append(
                "the model's outputs differ between two calls with the same key (AutoAttack's "
                f"randomness check, {ref}): part of its randomness does not come from the key "
                "(a NumPy or Python RNG?), so the attacks, which run under jax.jit, freeze it at "
                "trace time and the evaluation's fresh draws miss it. Draw all of it from the key."
            )
        if not _outputs_vary(outs, yb):
            notes.append(
                f"the model's outputs do not depend on its key ({_RANDOM_CALLS} keys on the same "
                "inputs agree): it looks deterministic, and stochastic=True with EoT only "
                "multiplies the cost. Evaluate it as a deterministic model (attacks='standard')."
            )

    # 2. Probabilities instead of logits (check_range_output).
    if _looks_like_probabilities(outs[0]):
        notes.append(
            "the model's outputs look like probabilities (in [0, 1], each row summing to 1; "
            f"AutoAttack's output-range check, {ref}): the attacks expect logits. On "
            "probabilities the cross-entropy and DLR losses are computed on the wrong scale and "
            "their gradients vanish where the softmax saturates; return the logits (the "
            "pre-softmax outputs)."
        )

    # 3. A forward pass that differentiates (check_dynamic).
    struct = jax.ShapeDtypeStruct(xb.shape, xb.dtype)
    calls = (_differentiation_calls(fn, struct, k_draw) if stochastic
             else _differentiation_calls(fn, struct))
    if calls:
        notes.append(
            "the model's forward pass differentiates "
            f"({', '.join(sorted(set(calls)))} called while it is traced; AutoAttack's "
            f"dynamic-defence check, {ref}): a defence that optimises "
            "at inference time? The attacks here may be insufficient against it; it needs an "
            "adaptive attack (Tramer et al. 2020, arXiv 2002.08347)."
        )

    # 4. Zero input gradients (check_zero_gradients), on the clean-correct examples of the first
    # batch (those the first attack faces), at APGD's random start.
    idx = np.flatnonzero(clean_correct)[:batch_size]
    if len(idx):
        part, n_valid = next(_chunks(idx, batch_size))
        mk = None if not stochastic else k_draw
        zero_ce, zero_margin = _zero_gradients(jits, n_classes)(
            jits.model.arrays, jnp.asarray(x_all[part]), jnp.asarray(y_all[part]), k_grad,
            np.asarray(eps, x_all.dtype), mk)
        n_ce = int(np.asarray(zero_ce)[:n_valid].sum())
        n_margin = int(np.asarray(zero_margin)[:n_valid].sum())
        margin = "DLR" if n_classes >= 3 else "margin"
        where = (f"at APGD's random start for {{}} of {n_valid} correctly classified examples of "
                 f"the first batch (AutoAttack's zero-gradient check, {ref})")
        if n_margin and n_margin >= _ZERO_GRAD_FRACTION * n_valid:
            notes.append(
                f"possible gradient masking: the input gradient of the {margin} loss is zero "
                + where.format(n_margin) + f", and that of the cross-entropy for {n_ce}. "
                "Gradient-based attacks make no progress from such points: a non-differentiable "
                "step (an input quantiser, a stop_gradient) masks the gradient. Approximate it by "
                "a differentiable one (BPDA, Athalye et al. 2018) or rely on black-box attacks "
                "(Square)."
            )
        elif n_ce and n_ce >= _ZERO_GRAD_FRACTION * n_valid:
            notes.append(
                "possible gradient masking: the input gradient of the cross-entropy is zero "
                + where.format(n_ce) + f", while that of the {margin} loss is not: the softmax "
                "saturates (very large logits), which stalls APGD-CE and PGD; the DLR-based "
                "members are unaffected by the scale of the logits."
            )

    # 5. Too few classes for the version's members (check_n_classes).
    note = _n_classes_note(attacks, n_classes)
    if note:
        notes.append(note)
    return notes


def _zero_gradients(jits: _Jits, n_classes: int) -> Callable:
    """Jitted ``(arrays, x, y, key, eps, model_key) -> (zero_ce_B, zero_margin_B)``: whether the
    input gradient of the cross-entropy and of the DLR loss (the CW margin below 3 classes) is
    zero at APGD's starting point. Zero is what the attack's step sees: every coordinate exactly
    0 for L-inf (``sign`` gives no direction), an L2 norm below the 1e-12 guard of the L2 step
    for L2 (the normalised step vanishes)."""
    norm, bounds = jits.norm, jits.bounds
    margin_loss = _attacks.dlr_loss if n_classes >= 3 else _attacks.margin_loss

    def is_zero(g):
        if norm == "linf":
            return jnp.all(g.reshape(g.shape[0], -1) == 0, axis=1)
        return _attacks.perturbation_norm(g, "l2") <= _TINY

    def make(apply):
        def zero_grads(arrays, x, y, k, e, mk):
            x0 = _apgd_start(k, x, e, norm, bounds)
            logits, pullback = jax.vjp(_fixed_draw(apply, arrays, mk), x0)
            grads = [
                pullback(jax.grad(lambda z, f=f: jnp.sum(f(z, y)))(logits))[0]
                for f in (_attacks.cross_entropy_loss, margin_loss)
            ]
            return is_zero(grads[0]), is_zero(grads[1])

        return zero_grads

    return jits.get("zero_gradients", n_classes >= 3, make)


def autoattack_checks(
    logits_fn: LogitsFn | _attacks.StochasticLogitsFn,
    x: Any,
    y: Any,
    *,
    eps: float,
    attacks: Any = "standard",
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    key: jax.Array | None = None,
    stochastic: bool = False,
) -> tuple[str, ...]:
    """AutoAttack's checks for common evaluation mistakes, on one batch ``(x, y)``; returns their
    notes (empty when all is well). :func:`evaluate_robustness` runs them on its first batch when
    ``sanity_checks`` is set, before the attacks, and issues each note as an
    :class:`AutoAttackCheckWarning`.

    After ``fra31/auto-attack`` (Croce and Hein 2020), ``autoattack/checks.py``, which its
    ``flags_doc.md`` explains; thresholds are the reference's unless said otherwise:

    1. Randomness (``check_randomized``): 5 calls of ``logits_fn`` on the batch, run op by op
       (without ``jax.jit``, which would freeze Python-side randomness); flagged when the number
       of correct predictions differs, or two calls' per-example L2-normalised outputs differ by
       more than 1e-4 in L2. The note points to ``stochastic=True`` and ``attacks="rand"``. The
       reference skips this check for its "rand" version; for a stochastic model
       (``stochastic=True``) we instead check that two calls with the same key agree (all its
       randomness comes from the key) and that 5 keys do not all agree (else it is deterministic
       and EoT only costs).
    2. Softmax outputs (``check_range_output``): every output in ``(-1e-5, 1 + 1e-5)`` and every
       row summing to 1 within 1e-5 (for an output dtype coarser than float32, 8 of its ulps).
    3. Dynamic defence (``check_dynamic``): the reference watches, with ``sys.settrace``, for
       torch's ``grad``/``backward`` being called during a forward pass. Here ``sys.setprofile``
       watches for JAX's differentiation functions (``grad``, ``value_and_grad``, ``vjp``,
       ``jvp``, ``linearize``, ...) being called while the model is traced once (a
       differentiation inside a function JAX traced and cached earlier is not re-run, so not
       seen).
    4. Zero gradients (``check_zero_gradients``, run by the reference inside APGD on the DLR
       loss's gradient at its random start, averaged over EoT): the input gradients of the
       cross-entropy and of the DLR loss (the CW margin below 3 classes) at APGD's random start,
       for the batch's correctly classified examples (one draw of a stochastic model's
       randomness). Flagged when the DLR gradient is zero for at least 10 % of them (gradient
       masking: a quantiser, a ``stop_gradient``), or when the cross-entropy gradient is zero
       for at least 10 % while the DLR gradient is not (a saturated softmax). The reference
       flags a single example with a zero DLR gradient; but a ReLU network has exactly zero
       gradients wherever all units of a layer are off, which a few examples reach at APGD's
       start when ``eps`` is large, so a single example is not a signal here. Zero is what the
       attack step sees: all coordinates exactly 0 for L-inf, an L2 norm <= 1e-12 for L2.
    5. Classes (``check_n_classes``): for an AutoAttack version or config, the members it loses
       (APGD-DLR below 3 classes, APGD-T below 4) or the targets it cannot have (more than
       ``K - 1``); the reference warns on the same cases (its members would fail; ours are left
       out or get fewer targets).

    Left out: ``check_square_sr`` (Square lowering the white-box attacks' robust accuracy by more
    than 0.2 %) is :func:`evaluate_robustness`'s own black-box diagnostic, which is stricter (one
    example is enough) and runs after the attacks. A TensorFlow-model flag has no counterpart.

    Args:
      logits_fn: the model, as for :func:`evaluate_robustness`.
      x: one batch of inputs inside ``bounds``.
      y: its integer labels.
      eps: radius of the threat model (APGD's starting points).
      attacks: the ``attacks`` argument of :func:`evaluate_robustness` (check 5).
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs.
      key: PRNG key; default ``jax.random.key(0)``.
      stochastic: ``logits_fn(x, key)`` is a randomised model.

    Returns:
      The notes, one per flagged check.
    """
    norm = _validation.check_choice("norm", norm, _attacks.NORMS)
    lo, hi = _attacks.check_bounds(bounds)
    _attacks.check_eps(eps)
    key = jax.random.key(0) if key is None else key
    x_all, y_all, batch_size = _collect([(x, y)])
    draws = 1 if stochastic else None
    jits = _Jits(_split_model(logits_fn), norm, (lo, hi), draws)
    n_classes = _check_data(jits, x_all, y_all, batch_size, (lo, hi))
    k_clean, k_checks = jax.random.split(key)
    predict = functools.partial(jits.predict(), jits.model.arrays)
    clean_correct = _predict_all(predict, x_all, batch_size, y_all,
                                 k_clean if stochastic else None) == y_all
    return tuple(_autoattack_checks(jits, logits_fn, x_all, y_all, clean_correct, attacks,
                                    n_classes, eps=float(eps), norm=norm, bounds=(lo, hi),
                                    key=k_checks, batch_size=batch_size))
