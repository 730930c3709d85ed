"""The members of an ensemble: the ``attacks`` argument resolved into named attacks (each checked
against the model's kind, deterministic or stochastic), and one member's run over the examples
still to attack, in chunks (:func:`_run_member`) or, for Square, in segments that re-batch the
examples still active (:func:`_run_square`), recording its breaks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax import attacks as _attacks
from tscnc_jax._progress import progress_bar
from tscnc_jax.attacks.square import SquareState
from tscnc_jax.evaluation._batches import (
    _chunks,
    _pad_labels,
    _Placement,
    _predict_all,
    _smaller_bucket,
)
from tscnc_jax.evaluation._compile import _Jits, _square_options, _unwrap_jit
from tscnc_jax.evaluation.report import check_adversarial


def _resolve_attacks(attacks: Any, n_classes: int, norm: str,
                     stochastic: bool = False) -> list[tuple[str, Callable]]:
    if isinstance(attacks, str | _attacks.AutoAttackConfig):
        if isinstance(attacks, str) and attacks not in _attacks.AUTOATTACK_VERSIONS:
            members = [(attacks, _attacks.get_attack(attacks))]
        else:
            members = _attacks.autoattack_members(attacks, n_classes=n_classes, norm=norm,
                                                  stochastic=stochastic)
    elif isinstance(attacks, Mapping):
        members = list(attacks.items())
    elif isinstance(attacks, Sequence):
        members = []
        for a in attacks:
            if isinstance(a, str):
                members.append((a, _attacks.get_attack(a)))
            elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str):
                members.append(a)
            else:
                raise ValueError(
                    f"`attacks` entries must be names or (name, attack) pairs; got {a!r}."
                )
    else:
        raise ValueError(
            "`attacks` must be 'standard', 'fast', 'rand', an AutoAttackConfig, a sequence of "
            f"names or (name, attack) pairs, or a mapping name -> attack; got {attacks!r}."
        )
    if not members:
        raise ValueError("`attacks` is empty.")
    names = [m[0] for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must be unique; got {names}.")
    for name, fn in members:
        if not callable(fn):
            raise ValueError(f"attack {name!r} is not callable.")
        _check_stochastic_support(name, fn, stochastic)
    return members


# Library attacks that only take deterministic models.
_DETERMINISTIC_ONLY = (_attacks.fab, _attacks.square, _attacks.pgd, _attacks.fgsm)


def _check_stochastic_support(name: str, attack: Callable, stochastic: bool) -> None:
    """``ValueError`` for an attack that cannot take the model: one with a ``stochastic``
    parameter not bound to the model's kind, or a library attack without one given a stochastic
    model. Any other callable is trusted (a stochastic model reaches it as
    ``logits_fn(x, key)``)."""
    fn, keywords = attack, {}
    if isinstance(attack, functools.partial):
        fn, keywords = attack.func, dict(attack.keywords)
    fn = _unwrap_jit(fn)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if "stochastic" in params:
        bound = bool(keywords.get("stochastic", params["stochastic"].default))
        if bound != stochastic:
            raise ValueError(
                f"attack {name!r} is bound with stochastic={bound} but the model is "
                f"{'stochastic' if stochastic else 'deterministic'}: bind stochastic={stochastic} "
                "(e.g. functools.partial(apgd, stochastic=True, eot_iter=20)) or pass "
                f"stochastic={bound} to evaluate_robustness."
            )
    elif stochastic and fn in _DETERMINISTIC_ONLY:
        raise ValueError(
            f"attack {name!r} does not support stochastic models; APGD does (stochastic=True, "
            "eot_iter), e.g. attacks='rand'."
        )


class _Context(NamedTuple):
    """What every member's run needs."""

    jits: _Jits
    x_all: np.ndarray
    y_all: np.ndarray
    n_classes: int
    eps_arr: np.ndarray  # eps in the inputs' dtype: passed to the jitted attacks as data
    eps: float
    batch_size: int
    compact: bool
    progress: bool
    place: _Placement
    # A stochastic model: each example's last attack output and its attack's index.
    x_last: np.ndarray | None = None
    last_by: np.ndarray | None = None


def _record(ctx: _Context, name, i, idx, xa, pred, this_robust, broken_by, x_adv) -> None:
    """Checks attack ``i``'s outputs ``xa`` for the examples ``idx`` and records its breaks."""
    check_adversarial(ctx.x_all[idx], xa, eps=ctx.eps, norm=ctx.jits.norm,
                      bounds=ctx.jits.bounds, name=f"attack {name!r}")
    fooled = pred != ctx.y_all[idx]
    if ctx.x_last is not None:
        ctx.x_last[idx] = xa
        ctx.last_by[idx] = i
    this_robust[idx[fooled]] = False
    first = fooled & (broken_by[idx] < 0)
    broken_by[idx[first]] = i
    x_adv[idx[first]] = xa[first]


def _run_member(ctx: _Context, name, i, attack, todo, clean_correct, broken_by, x_adv,
                key) -> np.ndarray:
    """Attack ``i`` on the examples ``todo``; returns which clean-correct examples it left
    robust, and records in ``broken_by`` / ``x_adv`` the examples it is the first to break."""
    run = functools.partial(ctx.jits.member(attack), ctx.jits.model.arrays)
    this_robust = clean_correct.copy()
    bar = progress_bar(len(todo), desc=name, unit="example", enabled=ctx.progress, leave=False)
    put, multiple = ctx.place.put, ctx.place.multiple
    for j, (part, m) in enumerate(_chunks(todo, ctx.batch_size, ctx.compact, multiple)):
        y_part = _pad_labels(ctx.y_all[part], m, ctx.n_classes)
        xa, pred = run(put(ctx.x_all[part]), put(y_part),
                       jax.random.fold_in(key, j), ctx.eps_arr)
        idx = part[:m]
        _record(ctx, name, i, idx, np.asarray(xa)[:m], np.asarray(pred)[:m], this_robust,
                broken_by, x_adv)
        bar.update(m)
    bar.close()
    return this_robust


def _run_square(ctx: _Context, name, i, attack, todo, clean_correct, broken_by, x_adv,
                key) -> np.ndarray:
    """A Square member in segments: the examples still active are re-batched (compacted) after
    every segment; each keeps its own state, key and query count (same contract as
    :func:`_run_member`)."""
    opts = _square_options(attack)
    init, steps = ctx.jits.square(opts)
    arrays, n_queries, bs = ctx.jits.model.arrays, opts["n_queries"], ctx.batch_size
    put, multiple = ctx.place.put, ctx.place.multiple
    this_robust = clean_correct.copy()
    bar = progress_bar(len(todo), desc=name, unit="example", enabled=ctx.progress, leave=False)
    rows = todo
    for r in range(opts["restarts"]):
        if not len(rows):
            break
        xs = np.empty((len(rows),) + ctx.x_all.shape[1:], ctx.x_all.dtype)
        margins: np.ndarray | None = None
        queries = np.zeros(len(rows), np.int32)

        def call(fn, pos, m, *extra, rows=rows, r=r):
            """``fn`` on the rows at positions ``pos`` (the first ``m`` valid)."""
            g = rows[pos]
            y_part = _pad_labels(ctx.y_all[g], m, ctx.n_classes)
            return fn(arrays, put(ctx.x_all[g]), put(y_part), key, put(g.astype(np.int32)),
                      jnp.int32(r), *extra)

        for pos, m in _chunks(np.arange(len(rows)), bs, ctx.compact, multiple):
            st = call(init, pos, m, ctx.eps_arr)
            margins = (np.empty(len(rows), st.margin.dtype) if margins is None else margins)
            xs[pos[:m]], margins[pos[:m]] = np.asarray(st.x_adv)[:m], np.asarray(st.margin)[:m]
        while True:
            active = np.flatnonzero((margins > 0) & (queries < n_queries))
            if r == 0:  # the bar counts the examples done with their first run
                bar.update(len(rows) - len(active) - bar.n)
            if not len(active):
                break
            for pos, m in _chunks(active, bs, ctx.compact, multiple):
                q = queries[pos].copy()
                q[m:] = n_queries  # padding: out of queries, never active
                stop = _smaller_bucket(len(pos), bs, multiple) if ctx.compact else 0
                st = call(steps, pos, m, SquareState(put(xs[pos]), put(margins[pos]), put(q)),
                          ctx.eps_arr, jnp.int32(stop))
                xs[pos[:m]], margins[pos[:m]] = np.asarray(st.x_adv)[:m], np.asarray(st.margin)[:m]
                queries[pos[:m]] = np.asarray(st.queries)[:m]
        # Only examples with margin <= 0 can be misclassified; argmax decides (ties).
        pred = ctx.y_all[rows].copy()
        maybe = np.flatnonzero(margins <= 0)
        if len(maybe):
            pred[maybe] = _predict_all(functools.partial(ctx.jits.predict(), arrays), xs[maybe],
                                       bs, place=ctx.place)
        _record(ctx, name, i, rows, xs, pred, this_robust, broken_by, x_adv)
        rows = rows[pred == ctx.y_all[rows]]
    bar.close()
    return this_robust
