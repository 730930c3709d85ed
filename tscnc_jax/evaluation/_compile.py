"""The compile cache of :func:`~tscnc_jax.evaluation.evaluate_robustness`: jitted functions kept
across calls (least recently used out beyond 64 entries), keyed by what they close over (the
package docstring says when one is reused); a model split into code and data (:class:`_Model`);
one call's access to the jitted functions of its model (:class:`_Jits`); the budget of a Square
member, which the driver runs in segments (:func:`_square_options`)."""

from __future__ import annotations

import collections
import functools
import inspect
import types
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax import _validation
from tscnc_jax import attacks as _attacks
from tscnc_jax.attacks.square import square as _square
from tscnc_jax.attacks.square import square_init, square_steps

LogitsFn = Callable[[jax.Array], jax.Array]

# Entries of the module-level cache of jitted functions.
_CACHE_SIZE = 64
_COMPILED: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()


def clear_compile_cache() -> None:
    """Empties the module-level cache of jitted functions used by :func:`evaluate_robustness`."""
    _COMPILED.clear()


class _NotCacheable(Exception):
    """A value that cannot be keyed by value (arrays, mutable objects)."""


_STATIC_TYPES = (bool, int, float, complex, str, bytes, type(None), np.generic)
_MAX_DEPTH = 8


def _static_key(value: Any, depth: int = 0) -> Hashable:
    """A hashable key equal for values that behave the same: scalars, strings, tuples of them,
    and functions (see :func:`_function_key`); ``_NotCacheable`` for anything else."""
    if depth > _MAX_DEPTH:
        raise _NotCacheable
    if isinstance(value, _STATIC_TYPES):
        return (type(value), value)
    if isinstance(value, tuple):
        return ("tuple", tuple(_static_key(v, depth + 1) for v in value))
    if isinstance(value, nn.Module):
        return _module_key(value)
    if callable(value):
        return _function_key(value, depth + 1)
    raise _NotCacheable


def _unwrap_jit(fn: Any) -> Any:
    while isinstance(fn, jax.stages.Wrapped) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _function_key(fn: Any, depth: int = 0) -> Hashable:
    """A function keyed by what determines its behaviour: its code with the values of its
    defaults and closure (two closures made by one factory from equal values share a key); a
    ``functools.partial`` by its function and arguments; a bound method of a Flax module by the
    module's value (modules are immutable); a builtin by identity."""
    fn = _unwrap_jit(fn)
    if depth > _MAX_DEPTH:
        raise _NotCacheable
    if isinstance(fn, functools.partial):
        return ("partial", _function_key(fn.func, depth + 1),
                tuple(_static_key(a, depth + 1) for a in fn.args),
                tuple(sorted((k, _static_key(v, depth + 1)) for k, v in fn.keywords.items())))
    if isinstance(fn, types.FunctionType):
        try:
            cells = tuple(c.cell_contents for c in fn.__closure__ or ())
        except ValueError:  # an empty cell
            raise _NotCacheable from None
        return ("function", fn.__code__, _static_key(fn.__defaults__ or (), depth + 1),
                _static_key(tuple(sorted((fn.__kwdefaults__ or {}).items())), depth + 1),
                _static_key(cells, depth + 1))
    if inspect.ismethod(fn) and isinstance(fn.__self__, nn.Module):
        return ("method", fn.__func__, _module_key(fn.__self__))
    if isinstance(fn, types.BuiltinFunctionType):
        return ("builtin", fn)
    raise _NotCacheable


def _module_key(module: nn.Module) -> Hashable:
    """An unbound Flax module by value (its fields: modules are frozen dataclasses). A bound
    module (``module.bind(variables)``) carries its variables: not cacheable."""
    if getattr(module, "scope", None) is not None:
        raise _NotCacheable
    try:
        hash(module)
    except TypeError:
        raise _NotCacheable from None
    return ("module", type(module), module)


def _attack_key(attack: Callable) -> tuple[bool, Hashable]:
    """``(cacheable across calls, key)``; the key of an attack that is not cacheable is only
    valid within one call."""
    try:
        key = _function_key(attack)
        hash(key)
        return True, key
    except (_NotCacheable, TypeError):
        return False, ("id", id(attack))


class _Model(NamedTuple):
    """``logits_fn`` split into code and data: ``logits_fn(x) == apply(arrays, x)`` (a stochastic
    model: ``logits_fn(x, key) == apply(arrays, x, key)``)."""

    cacheable: bool
    key: Hashable
    apply: Callable[[Any, jax.Array], jax.Array]
    arrays: Any


def _apply_partial(func, treedef, statics, arrays, *inputs):
    """Calls ``func(*args, *inputs, **keywords)`` (``inputs``: ``x``, or ``x, key``) with the
    partial's arguments rebuilt from its static leaves and ``arrays`` (in the order of the array
    leaves)."""
    it = iter(arrays)
    leaves = [next(it) if s is _ARRAY else s for s in statics]
    args, keywords = jax.tree.unflatten(treedef, leaves)
    return func(*args, *inputs, **keywords)


_ARRAY = object()  # marks an array leaf among a partial's static leaves


def _split_model(logits_fn: LogitsFn) -> _Model:
    """Separates a ``functools.partial``'s arrays from its code so that the code can be cached
    across calls and the arrays passed as data; any other callable is opaque (per-call cache)."""
    fn = _unwrap_jit(logits_fn)
    if isinstance(fn, functools.partial):
        leaves, treedef = jax.tree.flatten((fn.args, fn.keywords))
        is_array = [isinstance(v, jax.Array | np.ndarray) for v in leaves]
        statics = tuple(_ARRAY if a else v for v, a in zip(leaves, is_array, strict=True))
        try:
            key = ("partial", _function_key(fn.func), treedef,
                   tuple(None if a else _static_key(v)
                         for v, a in zip(leaves, is_array, strict=True)))
            hash(key)
        except (_NotCacheable, TypeError):
            pass
        else:
            arrays = [v for v, a in zip(leaves, is_array, strict=True) if a]
            apply = _cached_entry(("apply", key), True, None, lambda: functools.partial(
                _apply_partial, fn.func, treedef, statics))
            return _Model(True, key, apply, arrays)
    return _Model(False, ("id", id(logits_fn)), lambda arrays, *inputs: logits_fn(*inputs), ())


def _cached_entry(key: Hashable, cacheable: bool, local: dict | None, make: Callable) -> Callable:
    """The entry for ``key`` in the module cache (``cacheable``) or in ``local`` (one call's)."""
    store = _COMPILED if cacheable else local
    fn = store.get(key)
    if fn is None:
        fn = store[key] = make()
        if cacheable and len(_COMPILED) > _CACHE_SIZE:
            _COMPILED.popitem(last=False)
    elif cacheable:
        _COMPILED.move_to_end(key)
    return fn


def _fixed_draw(apply, arrays, model_key):
    """``logits_fn(x)``: the model itself, or one draw of a stochastic model's randomness (the
    key ``model_key``) for the diagnostics that attack a fixed function."""
    if model_key is None:
        return functools.partial(apply, arrays)
    return lambda z: apply(arrays, z, model_key)


class _Jits:
    """One call's access to the jitted functions of a model: from the module cache when the
    model and the attack are cacheable across calls, else from this call's own dict. ``draws``:
    ``None`` for a deterministic model, else the draws of a stochastic model's randomness per
    correctness check."""

    def __init__(self, model: _Model, norm: str, bounds: tuple[float, float],
                 draws: int | None = None):
        self.model = model
        self.norm = norm
        self.bounds = bounds
        self.draws = draws
        self.local: dict = {}

    def get(self, what: str, extra: Hashable, make: Callable, cacheable: bool = True) -> Callable:
        key = (what, extra, self.model.key, self.norm, self.bounds)
        if self.draws is not None:
            key += (("draws", self.draws),)
        return _cached_entry(key, cacheable and self.model.cacheable, self.local,
                             lambda: jax.jit(make(self.model.apply)))

    def logits(self):
        return self.get("logits", None, lambda apply: apply)

    def predict(self):
        """``predict(arrays, x) -> class``; for a stochastic model ``predict(arrays, x, y, key)``:
        ``y`` where each of ``draws`` draws predicts ``y``, else a wrong class."""
        if self.draws is None:
            return self.get("predict", None,
                            lambda apply: lambda arrays, x: jnp.argmax(apply(arrays, x), axis=-1))
        draws = self.draws

        def make(apply):
            def predict(arrays, x, y, key):
                return _attacks.predict_under_draws(functools.partial(apply, arrays), x, y, key,
                                                    draws)

            return predict

        return self.get("predict", None, make)

    def member(self, attack: Callable):
        cacheable, key = _attack_key(attack)
        norm, bounds, draws = self.norm, self.bounds, self.draws

        def make(apply):
            def run(arrays, x, y, key, eps):
                logits_fn = functools.partial(apply, arrays)
                if draws is None:
                    x_adv = attack(logits_fn, x, y, key=key, eps=eps, norm=norm, bounds=bounds)
                    return x_adv, jnp.argmax(logits_fn(x_adv), axis=-1)
                # A stochastic model: the output is checked with fresh draws.
                k_attack, k_check = jax.random.split(key)
                x_adv = attack(logits_fn, x, y, key=k_attack, eps=eps, norm=norm, bounds=bounds)
                return x_adv, _attacks.predict_under_draws(logits_fn, x_adv, y, k_check, draws)

            return run

        return self.get("member", key, make, cacheable)

    def square(self, opts: dict):
        norm, bounds = self.norm, self.bounds

        def keys_of(key, idx, r):
            return jax.vmap(lambda e: jax.random.fold_in(jax.random.fold_in(key, e), r))(idx)

        def make_init(apply):
            def init(arrays, x, y, key, idx, r, eps):
                return square_init(functools.partial(apply, arrays), x, y,
                                   keys=keys_of(key, idx, r), eps=eps, norm=norm, bounds=bounds)

            return init

        def make_steps(apply):
            def steps(arrays, x, y, key, idx, r, state, eps, stop_at_active):
                return square_steps(
                    functools.partial(apply, arrays), x, y, state, keys=keys_of(key, idx, r),
                    eps=eps, norm=norm, bounds=bounds, n_queries=opts["n_queries"],
                    p_init=opts["p_init"], rescale_schedule=opts["rescale_schedule"],
                    stop_at_active=stop_at_active)

            return steps

        budget = (opts["n_queries"], opts["p_init"], opts["rescale_schedule"])
        return self.get("square_init", None, make_init), self.get("square_steps", budget,
                                                                  make_steps)


_SQUARE_OPTIONS = {
    k: p.default for k, p in inspect.signature(_square).parameters.items()
    if k in ("n_queries", "p_init", "restarts", "rescale_schedule")
}


def _square_options(attack: Callable) -> dict | None:
    """The budget of a Square member (:func:`tscnc_jax.attacks.square` or a partial of it with
    keyword budgets only), which the driver runs in segments; ``None`` for any other attack."""
    fn, keywords = attack, {}
    if isinstance(attack, functools.partial):
        if attack.args:
            return None
        fn, keywords = attack.func, dict(attack.keywords)
    if fn is not _square or set(keywords) - set(_SQUARE_OPTIONS):
        return None
    opts = {**_SQUARE_OPTIONS, **keywords}
    opts["n_queries"] = _validation.check_int("n_queries", opts["n_queries"])
    opts["restarts"] = _validation.check_int("restarts", opts["restarts"])
    opts["p_init"] = _validation.check_positive_float("p_init", opts["p_init"])
    opts["rescale_schedule"] = bool(opts["rescale_schedule"])
    return opts
