"""Robustness evaluation driver: clean accuracy, robust accuracy per attack and for the ensemble.

:func:`evaluate_robustness` runs a list of attacks (by default AutoAttack's standard version) over a
data set, re-batching the examples that are still robust between attacks, and refuses to return a
number it cannot vouch for:

* Soundness checks raise :class:`AttackSoundnessError`: every adversarial input must be finite, of
  the input's shape, inside ``bounds`` and within ``eps`` of its clean input (up to float rounding,
  see :func:`check_adversarial`); robust accuracies must not exceed the clean accuracy; the ensemble
  must not exceed any member.
* The robust flags are recomputed by one clean forward pass over the final adversarial inputs, so a
  point counts as broken only if the stored ``x_adv`` really is misclassified.
* Gradient-masking diagnostics add warnings (also issued as :class:`GradientMaskingWarning`): the
  black-box Square attack breaking points that the white-box attacks did not; the PGD loss not
  increasing with the steps; accuracy not reaching 0 at a very large ``eps`` (Carlini et al. 2019,
  "On evaluating adversarial robustness"; Croce and Hein 2020).

This module is a driver: it jits internally and moves data between host and device.

Cost follows the examples still to attack. Each member runs on them in chunks of ``batch_size``,
the last chunk padded to the smallest power of two (at least 8, at most ``batch_size``) that holds
it, so a member that faces 77 survivors runs on 128 rows, not on a whole padded batch, with few
distinct shapes. Padding rows get a wrong label: attacks see them as broken from the start. A
Square member (:func:`tscnc_jax.attacks.square`, possibly a ``functools.partial`` of it) runs in
segments (:func:`tscnc_jax.attacks.square.square_steps`): a chunk stops as soon as its examples
still active fit a smaller bucket, the examples that are done leave, and the others are re-batched
and resumed with their own iteration counts and keys, so each example gets exactly the result of an
uninterrupted run.

Compilation is cached across calls, in a module-level cache of jitted functions (least recently
used out beyond 64 entries; :func:`clear_compile_cache` empties it). A jitted function is reused
only when everything it closes over is known to be the same:

* ``logits_fn``: only a ``functools.partial`` (possibly under ``jax.jit``) is cached across calls,
  e.g. ``functools.partial(model.apply, variables)``: its array arguments (the parameters) are
  passed to the jitted function as data on every call, never baked in; its other arguments
  (Python scalars, strings, ``None``) are part of the key, and its function is keyed by identity
  (a bound method of a Flax module by the module's value). Any other callable, e.g. ``lambda x:
  model.apply(params, x)``, may read state that changes between calls (a global ``params``
  reassigned after training), which no key can see: its functions are compiled once per call (and
  shared by the chunks and segments of that call) and then dropped.
* attacks: a function (keyed by its code, defaults and closure values, which must be Python
  scalars, strings, tuples or functions, recursively) or a ``functools.partial`` of one with such
  arguments; anything else (arrays or mutable objects in a closure) is compiled per call.
* ``eps`` is passed as data (a sweep over eps compiles once); the norm, bounds, budgets, input
  shape and dtype are part of the key.

As with ``jax.jit`` itself, a cached function must be pure: a function that reads a global which
changes between calls is not seen to change.

AutoAttack's own checks (Croce and Hein 2020; ``fra31/auto-attack``, ``autoattack/checks.py``) run
before the attacks when ``sanity_checks`` is set, on the first batch: randomised outputs,
probabilities instead of logits, zero input gradients, a forward pass that differentiates (a
dynamic defence), too few classes for the version's members (:func:`autoattack_checks`). Each
flag is issued at once as an :class:`AutoAttackCheckWarning` (a :class:`GradientMaskingWarning`)
and kept in the report's ``warnings``.

Randomised models (``stochastic=True``): a randomised defence must make its randomness explicit,
``logits_fn(x, key)``, and be attacked by attacks that support it, APGD with Expectation over
Transformation (``attacks="rand"``, :data:`tscnc_jax.attacks.AUTOATTACK_RAND`: APGD-CE and APGD-DLR,
each gradient averaged over 20 draws; the other attacks refuse such a model). Every forward pass
the driver makes draws fresh randomness, and an example counts as correctly classified on an input
only if each of ``n_draws`` draws (default 5) classifies it correctly: on ``x`` for the clean
accuracy, on each attack's output for the cascade (these checks select what the next attack
faces, as AutoAttack's one-draw check of each attack's output does). The reported ensemble robust
accuracy is measured once more, on draws independent of all of those: each clean-correct example's
final input (the output of the attack that broke it, else of the last attack that ran on it) is
classified by ``n_draws`` fresh draws, and the example is robust only if every one is correct. So
the selection of the attacks' outputs by lucky draws does not count as a break, a break that does
not reproduce is counted robust, and an output the checks passed by luck is counted broken; the
per-attack numbers, from the selecting draws, are reported as they were, and the report's
``warnings`` say how many verdicts the fresh draws changed (a note of the protocol, not issued as
a Python warning). The gradient-masking diagnostics attack one fixed draw of the model's
randomness.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
import sys
import time
import types
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tscnc_jax import _validation
from tscnc_jax import attacks as _attacks
from tscnc_jax._progress import progress_bar
from tscnc_jax.attacks._common import TINY as _TINY
from tscnc_jax.attacks._common import apgd_start as _apgd_start
from tscnc_jax.attacks.square import SquareState, square_init, square_steps
from tscnc_jax.attacks.square import square as _square

LogitsFn = Callable[[jax.Array], jax.Array]

# Members treated as black-box (score-based) by the gradient-masking check.
_BLACK_BOX_PREFIXES = ("square",)
# Smallest chunk an attack runs on when compacting (smaller chunks are padded up to it).
MIN_BUCKET = 8
# Entries of the module-level cache of jitted functions.
_CACHE_SIZE = 64
_COMPILED: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()


# ----------------------------------------------------------------------------------------------
# Compile cache.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Buckets.
# ----------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket_sizes(batch_size: int, multiple: int = 1) -> list[int]:
    """Chunk sizes used when compacting: ``batch_size`` and the powers of two in
    ``[MIN_BUCKET, batch_size)``, each rounded up to a multiple of ``multiple`` (the devices
    that share a chunk; ``batch_size`` must be one)."""
    sizes = {batch_size}
    s = MIN_BUCKET
    while s < batch_size:
        sizes.add(min(_round_up(s, multiple), batch_size))
        s *= 2
    return sorted(sizes)


def _bucket(n: int, batch_size: int, compact: bool, multiple: int = 1) -> int:
    """The chunk size for ``n <= batch_size`` examples."""
    if not compact:
        return batch_size
    return min(s for s in _bucket_sizes(batch_size, multiple) if s >= min(n, batch_size))


def _smaller_bucket(size: int, batch_size: int, multiple: int = 1) -> int:
    """The largest chunk size below ``size`` (0 if none)."""
    return max((s for s in _bucket_sizes(batch_size, multiple) if s < size), default=0)


class _Placement(NamedTuple):
    """Where the driver puts each chunk it passes to a jitted function: on the default device
    (``sharding=None``), or split along the batch axis over the devices of a mesh (``multiple``:
    their number; every chunk is a multiple of it)."""

    sharding: jax.sharding.NamedSharding | None = None
    multiple: int = 1

    def put(self, x) -> jax.Array:
        return jnp.asarray(x) if self.sharding is None else jax.device_put(x, self.sharding)


def _placement(mesh: jax.sharding.Mesh | None) -> _Placement:
    """The placement of a chunk on ``mesh`` (its batch axis over every axis of the mesh)."""
    if mesh is None:
        return _Placement()
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None; got {type(mesh).__name__}.")
    foreign = [d for d in mesh.devices.flat if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(
            f"mesh has {len(foreign)} device(s) of other processes (e.g. {foreign[0]}); the "
            "evaluation runs on this process's data, over its own devices: pass "
            "tscnc_jax.parallel.make_mesh(jax.local_devices()).")
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return _Placement(jax.sharding.NamedSharding(mesh, spec), int(mesh.devices.size))


class AttackSoundnessError(RuntimeError):
    """An attack or the evaluation produced an impossible result (outside the threat model, or
    robust accuracy above clean accuracy, or an ensemble weaker than a member)."""


class GradientMaskingWarning(UserWarning):
    """A diagnostic suggests the white-box attacks are unreliable on this model."""


class AutoAttackCheckWarning(GradientMaskingWarning):
    """One of AutoAttack's checks for common evaluation mistakes flagged the model (Croce and Hein
    2020; ``fra31/auto-attack``, ``autoattack/checks.py`` and ``flags_doc.md``): randomised
    outputs, probabilities instead of logits, zero input gradients, a forward pass that
    differentiates (a dynamic defence), or too few classes for the version's members (see
    :func:`autoattack_checks`).

    A subclass of :class:`GradientMaskingWarning`: every one of these is a reason the reported
    robust accuracy may overestimate the model's robustness, so a filter on
    :class:`GradientMaskingWarning` sees them too, and this class singles them out."""


def _tolerance(x: np.ndarray, eps: float, norm: str, bounds, rtol: float, atol: float | None):
    if atol is None:
        # Rounding of x + delta in the input dtype: half an ulp of the largest magnitude per
        # coordinate (x4 for slack), summed in quadrature over the coordinates for L2.
        scale = max(abs(bounds[0]), abs(bounds[1]), 1.0)
        ulp = float(np.finfo(x.dtype).eps) * scale
        n_features = math.prod(x.shape[1:])
        atol = 4 * ulp * (math.sqrt(n_features) if norm == "l2" else 1.0)
    return atol + rtol * eps


def check_adversarial(
    x: Any,
    x_adv: Any,
    *,
    eps: float,
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    rtol: float = 1e-5,
    atol: float | None = None,
    name: str = "attack",
) -> None:
    """Raises :class:`AttackSoundnessError` unless ``x_adv`` is a valid perturbation of ``x``.

    Checks: same shape and dtype, finite, inside ``bounds`` (exactly), and per example
    ``||x_adv - x|| <= eps + atol + rtol * eps``. The default ``atol`` allows the rounding of
    ``x + delta`` in ``x``'s dtype (a few ulps of ``max(|lo|, |hi|, 1)``, times ``sqrt(D)`` for L2).
    """
    norm = _validation.check_choice("norm", norm, _attacks.NORMS)
    lo, hi = _attacks.check_bounds(bounds)
    x = np.asarray(x)
    x_adv = np.asarray(x_adv)
    if x_adv.shape != x.shape or x_adv.dtype != x.dtype:
        raise AttackSoundnessError(
            f"{name}: output has shape {x_adv.shape} / dtype {x_adv.dtype}, expected "
            f"{x.shape} / {x.dtype}."
        )
    if x.size == 0:
        return
    if not np.all(np.isfinite(x_adv)):
        raise AttackSoundnessError(f"{name}: output contains NaN or inf.")
    if x_adv.min() < lo or x_adv.max() > hi:
        raise AttackSoundnessError(
            f"{name}: output leaves bounds [{lo}, {hi}]: values in [{x_adv.min()}, {x_adv.max()}]."
        )
    delta = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(x.shape[0], -1)
    dist = np.max(np.abs(delta), axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    tol = _tolerance(x, eps, norm, (lo, hi), rtol, atol)
    worst = int(np.argmax(dist))
    if dist[worst] > eps + tol:
        raise AttackSoundnessError(
            f"{name}: perturbation of example {worst} has {norm} norm {dist[worst]:.9g} > "
            f"eps = {eps:.9g} (tolerance {tol:.3g})."
        )


@dataclasses.dataclass(frozen=True)
class RobustnessReport:
    """Result of :func:`evaluate_robustness`.

    Attributes:
      eps, norm, bounds: the threat model.
      attacks: attack names, in the order they ran.
      cascade: whether each attack ran only on the examples all earlier attacks failed to break
        (AutoAttack's protocol), or on every clean-correct example.
      n_examples, n_clean_correct, clean_accuracy: clean results.
      robust_accuracy: per attack; with ``cascade`` the accuracy *after* that attack (cumulative,
        as AutoAttack prints it), otherwise the attack's own robust accuracy.
      n_broken: per attack, the examples it broke (with ``cascade``: that no earlier attack broke).
      ensemble_robust_accuracy, n_robust: worst case over all attacks, verified by a forward pass
        on the stored adversarial inputs (a stochastic model: by fresh draws, so that these, not
        the per-attack numbers above, which come from the draws that selected the attacks'
        outputs, are the measured robustness; module docstring).
      seconds: wall time per phase ("clean", each attack, "checks", "total"), compilation included.
      warnings: gradient-masking and other diagnostics (empty when all is well).
      clean_correct: bool per example.
      broken_by: int per example: index in ``attacks`` of the first attack (in order) that broke
        it; -1 if none did (robust, or misclassified clean: see ``clean_correct``).
      x_adv: the adversarial inputs (``x`` where unbroken), if ``return_adversarial`` was set.
        For a stochastic model, every attacked example's final input (the output of the attack
        that broke it, else of the last attack that ran on it); ``broken_by`` then names the
        attack whose output the final draws misclassify.
      stochastic_draws: for a stochastic model (``stochastic=True``), the draws of its randomness
        behind every correctness decision (an example counts as correctly classified on an input
        only if every draw classifies it correctly); ``None`` for a deterministic model.
    """

    eps: float
    norm: str
    bounds: tuple[float, float]
    attacks: tuple[str, ...]
    cascade: bool
    n_examples: int
    n_clean_correct: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    n_broken: dict[str, int]
    ensemble_robust_accuracy: float
    n_robust: int
    seconds: dict[str, float]
    warnings: tuple[str, ...]
    clean_correct: np.ndarray = dataclasses.field(repr=False)
    broken_by: np.ndarray = dataclasses.field(repr=False)
    x_adv: np.ndarray | None = dataclasses.field(default=None, repr=False)
    stochastic_draws: int | None = None

    def to_markdown(self) -> str:
        """A small markdown table of the results."""
        what = "after" if self.cascade else "alone"
        draws = (
            "" if self.stochastic_draws is None
            else f", stochastic model: correct = correct in all {self.stochastic_draws} draws"
        )
        lines = [
            f"{self.norm} eps = {self.eps:g}, {self.n_examples} examples{draws}",
            "",
            f"| attack | robust acc. ({what}) | broken | seconds |",
            "|---|---|---|---|",
            f"| clean | {self.clean_accuracy:.2%} | - | {self.seconds.get('clean', 0.0):.1f} |",
        ]
        for name in self.attacks:
            lines.append(
                f"| {name} | {self.robust_accuracy[name]:.2%} | {self.n_broken[name]} | "
                f"{self.seconds.get(name, 0.0):.1f} |"
            )
        lines.append(
            f"| **ensemble** | **{self.ensemble_robust_accuracy:.2%}** | "
            f"{self.n_clean_correct - self.n_robust} | {self.seconds.get('total', 0.0):.1f} |"
        )
        lines += [f"\nWARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


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


def _collect(dataset_batches: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    xs, ys = [], []
    for i, batch in enumerate(dataset_batches):
        if isinstance(batch, Mapping):
            xb = batch["image"] if "image" in batch else batch["x"]
            yb = batch["label"] if "label" in batch else batch["y"]
        elif isinstance(batch, Sequence) and len(batch) == 2:
            xb, yb = batch
        else:
            raise ValueError(
                f"batch {i}: expected (x, y) or a dict with 'image'/'label'; got {type(batch)}."
            )
        xb, yb = np.asarray(xb), np.asarray(yb)
        if xb.ndim < 2 or yb.shape != (xb.shape[0],):
            raise ValueError(f"batch {i}: x has shape {xb.shape} and y {yb.shape}.")
        if xs and xb.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f"batch {i}: example shape {xb.shape[1:]} != {xs[0].shape[1:]}.")
        xs.append(xb)
        ys.append(yb)
    if not xs or sum(len(y) for y in ys) == 0:
        raise ValueError("`dataset_batches` yielded no examples.")
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"inputs must be floating point; got dtype {x.dtype}.")
    # The dtype JAX computes in (float64 inputs become float32 unless x64 is enabled), so that
    # the attacks' outputs and the clean inputs are compared in the same dtype.
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers; got dtype {y.dtype}.")
    return x, y.astype(np.int32), max(len(b) for b in xs)


def _chunks(idx: np.ndarray, batch_size: int, compact: bool = False, multiple: int = 1):
    """Yields ``(padded_indices, n_valid)``: chunks of ``batch_size``, the last one padded (by
    repeating its first index) to ``batch_size``, or with ``compact`` to the smallest bucket that
    holds it (:func:`_bucket_sizes`)."""
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        n = len(part)
        size = _bucket(n, batch_size, compact, multiple)
        if n < size:
            part = np.concatenate([part, np.full(size - n, part[0], part.dtype)])
        yield part, n


def _pad_labels(y: np.ndarray, n_valid: int, n_classes: int) -> np.ndarray:
    """Labels of a padded chunk whose padding rows repeat a clean-correct example: the padding
    gets a wrong label, so that every attack sees it as broken from the start (it never holds
    back an early exit and Square never queries it); the valid rows are untouched."""
    y = y.copy()
    y[n_valid:] = (y[n_valid:] + 1) % n_classes
    return y


def evaluate_robustness(
    logits_fn: LogitsFn | _attacks.StochasticLogitsFn,
    dataset_batches: Iterable[Any],
    *,
    eps: float,
    attacks: Any = "standard",
    norm: str = "linf",
    bounds: tuple[float, float] = (0.0, 1.0),
    key: jax.Array | None = None,
    cascade: bool = True,
    batch_size: int | None = None,
    sanity_checks: bool = True,
    progress: bool = False,
    return_adversarial: bool = False,
    compact: bool = True,
    stochastic: bool = False,
    n_draws: int = 5,
    mesh: jax.sharding.Mesh | None = None,
) -> RobustnessReport:
    """Evaluates clean and robust accuracy of ``logits_fn`` on a data set.

    Args:
      logits_fn: maps a batch to logits ``B x K`` (deterministic, examples independent). Pass
        ``functools.partial(apply_fn, params)`` (optionally jitted) for compiled attacks to be
        reused by later calls with other ``params`` (module docstring). With ``stochastic=True``,
        a randomised model ``logits_fn(x, key)`` (module docstring, "Randomised models").
      dataset_batches: iterable of ``(x, y)`` pairs or dicts with ``"image"`` and ``"label"``; the
        whole data set is held in host memory.
      eps: radius of the threat model.
      attacks: ``"standard"``, ``"fast"`` or ``"rand"`` (AutoAttack members, see
        :data:`tscnc_jax.attacks.AUTOATTACK_VERSIONS`; ``"rand"`` needs ``stochastic=True``), an
        ``AutoAttackConfig``, a sequence of names from :data:`tscnc_jax.attacks.ATTACKS` and/or
        ``(name, attack)`` pairs, or a mapping ``name -> attack`` with ``attack(logits_fn, x, y, *,
        key, eps, norm, bounds) -> x_adv`` (``eps`` is passed as a traced scalar).
      norm: ``"linf"`` or ``"l2"``.
      bounds: ``(lo, hi)`` box of valid inputs; inputs outside raise ``ValueError``.
      key: PRNG key; default ``jax.random.key(0)``. Attack ``i`` on chunk ``j`` uses
        ``fold_in(fold_in(key, i), j)``; a Square member gives example ``e`` (its index in the data
        set) the key ``fold_in(fold_in(key, i), e)``, folded with the restart. With ``n``
        attacks, the diagnostics use ``fold_in(key, n)`` and AutoAttack's checks ``fold_in(key, n
        + 1)``. A stochastic model: ``key_run, key_model = split(key)``, ``key_run`` in place of
        ``key`` above (an attack's chunk key is split once more, into the attack's key and the
        key of the draws that check its output), and the clean pass and the final verification
        draw from ``fold_in(key_model, 0)`` and ``fold_in(key_model, 1)`` (folded with the chunk),
        whatever the attacks.
      cascade: run each attack only on the examples still robust (AutoAttack's protocol, much
        cheaper); ``False`` runs every attack on every clean-correct example, which also gives each
        attack's own robust accuracy.
      batch_size: examples per attack call (default: the largest input batch).
      sanity_checks: run AutoAttack's checks before the attacks (:func:`autoattack_checks`: a
        few forward passes and one input gradient on the first batch, one trace of the model)
        and the gradient-masking diagnostics after them (two extra PGD-20 runs on one batch).
      progress: show a progress bar per attack (tqdm).
      return_adversarial: keep the adversarial inputs in the report.
      compact: pad the last chunk of each attack only to a power-of-two bucket (at least 8) and run
        Square in segments that drop the examples it has broken (module docstring). ``False`` pads
        every chunk to ``batch_size`` and runs Square on every row until the whole chunk is done.
        Both give the same result: a row's random draws depend on its chunk's key and its position
        in the chunk, not on the padding (JAX's default ``jax_threefry_partitionable`` draws
        element ``i`` from the key and ``i``), and Square's on the example alone; logits that
        round differently at different batch sizes are the only source of difference.
      stochastic: ``logits_fn(x, key)`` is a randomised model; attacks must support it (APGD
        with ``stochastic=True``, e.g. ``attacks="rand"``).
      n_draws: for a stochastic model, the draws of its randomness behind each correctness
        decision (ignored for a deterministic model).
      mesh: data parallelism over this process's devices, e.g.
        ``tscnc_jax.parallel.make_mesh(jax.local_devices())``: every chunk the attacks, the
        clean pass and the final verification run on is split along its batch axis over the
        mesh's devices (``batch_size`` and the buckets rounded up to multiples of their number),
        and ``logits_fn``'s arrays are replicated on them (a ``functools.partial``'s array
        arguments are placed by the driver; arrays a closure captures must already live on the
        mesh's devices, or be uncommitted). Each example's computation is the same as on one
        device, so the outcomes are too, up to float reduction order. A multi-process job gives
        each process its own examples and mesh (``experiments/evaluate.py`` does). The
        diagnostics' single batches run unsplit. ``None``: the default device.

    Returns:
      A :class:`RobustnessReport`.

    Raises:
      ValueError: bad arguments or data (labels out of range, inputs outside ``bounds``).
      AttackSoundnessError: an attack left the threat model or the numbers are inconsistent.
    """
    t_start = time.perf_counter()
    norm = _validation.check_choice("norm", norm, _attacks.NORMS)
    lo, hi = _attacks.check_bounds(bounds)
    _attacks.check_eps(eps)
    eps = float(eps)
    key = jax.random.key(0) if key is None else key
    stochastic = bool(stochastic)
    n_draws = _validation.check_int("n_draws", n_draws)
    x_all, y_all, default_bs = _collect(dataset_batches)
    if batch_size is not None:
        batch_size = _validation.check_int("batch_size", batch_size)
    batch_size = default_bs if batch_size is None else batch_size
    place = _placement(mesh)
    batch_size = _round_up(batch_size, place.multiple)
    n = len(y_all)
    model = _split_model(logits_fn)
    if place.sharding is not None:
        model = model._replace(arrays=jax.device_put(
            model.arrays, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    jits = _Jits(model, norm, (lo, hi), n_draws if stochastic else None)
    n_classes = _check_data(jits, x_all, y_all, batch_size, (lo, hi))
    members = _resolve_attacks(attacks, n_classes, norm, stochastic)
    names = tuple(m[0] for m in members)
    seconds: dict[str, float] = {}
    predict = functools.partial(jits.predict(), jits.model.arrays)
    x_last, last_by = (x_all.copy(), np.full(n, -1, np.int32)) if stochastic else (None, None)
    ctx = _Context(jits, x_all, y_all, n_classes, np.asarray(eps, x_all.dtype), eps, batch_size,
                   compact, progress, place, x_last, last_by)
    n_members = len(members)
    # A stochastic model's clean and final draws come from their own key, the same whatever the
    # attacks: evaluations of one model with different attacks see the same draws.
    k_run, k_model = jax.random.split(key) if stochastic else (key, None)

    t0 = time.perf_counter()
    k_clean = None if k_model is None else jax.random.fold_in(k_model, 0)
    clean_correct = _predict_all(predict, x_all, batch_size, y_all, k_clean, place) == y_all
    seconds["clean"] = time.perf_counter() - t0
    n_clean = int(clean_correct.sum())

    t0 = time.perf_counter()
    check_notes: list[str] = []
    if sanity_checks:
        check_notes = _autoattack_checks(
            jits, logits_fn, x_all, y_all, clean_correct, attacks, n_classes, eps=eps, norm=norm,
            bounds=(lo, hi), key=jax.random.fold_in(k_run, n_members + 1), batch_size=batch_size)
        # Before the attacks, as the reference does: a mistake they flag may spoil (or, for a
        # randomised model evaluated as deterministic, stop) the evaluation that follows.
        for note in check_notes:
            warnings.warn(note, AutoAttackCheckWarning, stacklevel=2)
    t_checks = time.perf_counter() - t0

    x_adv = x_all.copy()
    broken_by = np.full(n, -1, np.int32)
    robust = clean_correct.copy()
    robust_acc: dict[str, float] = {}
    n_broken: dict[str, int] = {}
    member_robust: dict[str, np.ndarray] = {}
    for i, (name, attack) in enumerate(members):
        t0 = time.perf_counter()
        todo = np.flatnonzero(robust if cascade else clean_correct)
        run = _run_square if _square_options(attack) is not None else _run_member
        this_robust = run(ctx, name, i, attack, todo, clean_correct, broken_by, x_adv,
                          jax.random.fold_in(k_run, i))
        newly = robust & ~this_robust
        n_broken[name] = (
            int((this_robust != clean_correct).sum()) if not cascade else int(newly.sum())
        )
        robust &= this_robust
        member_robust[name] = this_robust
        robust_acc[name] = float((robust if cascade else this_robust).sum() / n)
        seconds[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    record_notes: list[str] = []  # in the report, not issued as warnings
    if stochastic:
        # An example no attack broke is judged on the last attack's output, not on x.
        keep = clean_correct & (broken_by < 0) & (last_by >= 0)
        x_adv[keep] = x_last[keep]
        final_robust, record_notes, not_reproduced = _verify_stochastic(
            predict, x_all, y_all, x_adv, broken_by, clean_correct, last_by, eps=eps, norm=norm,
            bounds=(lo, hi), batch_size=batch_size, key=jax.random.fold_in(k_model, 1),
            n_draws=n_draws, place=place)
        notes = []
    else:
        final_robust, notes, not_reproduced = _verify_ensemble(
            predict, x_all, y_all, x_adv, broken_by, clean_correct, robust, eps=eps, norm=norm,
            bounds=(lo, hi), batch_size=batch_size, place=place)
    n_robust = int(final_robust.sum())
    _check_consistency(names, robust_acc, n_clean / n, n_robust / n, not_reproduced / n, cascade)
    if sanity_checks:
        notes += _masking_diagnostics(
            jits, x_all, y_all, clean_correct, member_robust, n_broken, names, cascade,
            eps=eps, norm=norm, bounds=(lo, hi), key=jax.random.fold_in(k_run, n_members),
            batch_size=batch_size)
    for note in notes:
        warnings.warn(note, GradientMaskingWarning, stacklevel=2)
    seconds["checks"] = time.perf_counter() - t0 + t_checks
    seconds["total"] = time.perf_counter() - t_start
    return RobustnessReport(
        eps=eps,
        norm=norm,
        bounds=(lo, hi),
        attacks=names,
        cascade=cascade,
        n_examples=n,
        n_clean_correct=n_clean,
        clean_accuracy=n_clean / n,
        robust_accuracy=robust_acc,
        n_broken=n_broken,
        ensemble_robust_accuracy=n_robust / n,
        n_robust=n_robust,
        seconds=seconds,
        warnings=tuple(check_notes + record_notes + notes),
        clean_correct=clean_correct,
        broken_by=broken_by,
        x_adv=x_adv if return_adversarial else None,
        stochastic_draws=n_draws if stochastic else None,
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


def _check_data(jits: _Jits, x_all, y_all, batch_size, bounds) -> int:
    """Checks the inputs against ``bounds`` and the labels against the logits; returns the
    number of classes."""
    lo, hi = bounds
    if not np.all(np.isfinite(x_all)):
        raise ValueError("inputs contain NaN or inf.")
    if x_all.min() < lo or x_all.max() > hi:
        raise ValueError(
            f"inputs must lie inside bounds [{lo}, {hi}]; got values in "
            f"[{x_all.min()}, {x_all.max()}]. Pass matching `bounds=`."
        )
    model_key = () if jits.draws is None else (jax.random.key(0),)
    out = jits.logits().eval_shape(
        jits.model.arrays, jax.ShapeDtypeStruct((batch_size,) + x_all.shape[1:], x_all.dtype),
        *model_key,
    )
    if len(out.shape) != 2 or out.shape[0] != batch_size:
        raise ValueError(f"`logits_fn` must return logits of shape (B, K); got {out.shape}.")
    n_classes = int(out.shape[1])
    if y_all.min() < 0 or y_all.max() >= n_classes:
        raise ValueError(
            f"labels must be in [0, {n_classes}); got values in [{y_all.min()}, {y_all.max()}]."
        )
    return n_classes


def _predict_all(predict, x_np: np.ndarray, batch_size: int, y_np: np.ndarray | None = None,
                 key: jax.Array | None = None, place: _Placement = _Placement()) -> np.ndarray:
    """The predicted class of every example, in padded batches of ``batch_size``; with a ``key``,
    a stochastic model's ``predict(x, y, key)`` (chunk ``j``: ``fold_in(key, j)``)."""
    pred = np.empty(len(x_np), np.int32)
    for j, (part, m) in enumerate(_chunks(np.arange(len(x_np)), batch_size)):
        if key is None:
            out = predict(place.put(x_np[part]))
        else:
            out = predict(place.put(x_np[part]), place.put(y_np[part]),
                          jax.random.fold_in(key, j))
        pred[part[:m]] = np.asarray(out)[:m]
    return pred


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


def _verify_ensemble(predict, x_all, y_all, x_adv, broken_by, clean_correct, robust, *, eps,
                     norm, bounds, batch_size, place):
    """One forward pass on the stored adversarial inputs: returns the examples robust to all
    attacks, notes, and how many reported breaks did not reproduce (counted robust)."""
    notes = []
    check_adversarial(x_all, x_adv, eps=eps, norm=norm, bounds=bounds, name="ensemble")
    final_robust = clean_correct & (_predict_all(predict, x_adv, batch_size, place=place)
                                    == y_all)
    not_reproduced = int((final_robust & ~robust).sum())
    if not_reproduced:
        notes.append(
            f"{not_reproduced} example(s) reported broken were classified correctly when their "
            "adversarial input was re-evaluated (numerical ties); they are counted as robust."
        )
        x_adv[final_robust & ~robust] = x_all[final_robust & ~robust]
        broken_by[final_robust & ~robust] = -1
    if int((~final_robust & robust).sum()):
        raise AttackSoundnessError(
            "ensemble: examples that no attack broke (x_adv = x) are now misclassified: "
            "logits_fn is not deterministic. A randomised model must take its randomness as a "
            "key: evaluate logits_fn(x, key) with stochastic=True and attacks='rand'."
        )
    return final_robust, notes, not_reproduced


def _verify_stochastic(predict, x_all, y_all, x_adv, broken_by, clean_correct, last_by, *, eps,
                       norm, bounds, batch_size, key, n_draws, place):
    """The final accuracy of a stochastic model, on fresh draws: every clean-correct example's
    final input (the output of the attack that broke it, else of the last attack that ran on it)
    is classified again with ``n_draws`` draws independent of those that guided and selected the
    attacks, and the example is robust if every draw classifies it correctly. ``broken_by`` is
    updated to match: ``-1`` for a reported break that did not reproduce, the last attack for an
    example its checks missed. Returns ``(final_robust, notes, not_reproduced)``."""
    notes = []
    check_adversarial(x_all, x_adv, eps=eps, norm=norm, bounds=bounds, name="ensemble")
    final_robust = np.zeros(len(y_all), np.bool_)
    idx = np.flatnonzero(clean_correct)
    if not len(idx):
        return final_robust, notes, 0
    ok = _predict_all(predict, x_adv[idx], batch_size, y_all[idx], key, place) == y_all[idx]
    final_robust[idx[ok]] = True
    was_broken = broken_by[idx] >= 0
    not_reproduced = int((ok & was_broken).sum())
    missed = idx[~ok & ~was_broken]
    broken_by[idx[ok]] = -1
    broken_by[missed] = last_by[missed]
    if not_reproduced or len(missed):
        notes.append(
            f"stochastic model: the final inputs were re-evaluated with {n_draws} fresh draws of "
            f"its randomness: {not_reproduced} reported break(s) did not reproduce (counted "
            f"robust) and {len(missed)} example(s) that no attack's check broke were "
            "misclassified (counted broken, by the last attack that ran on them)."
        )
    return final_robust, notes, not_reproduced


def _check_consistency(names, robust_acc, clean_acc, ensemble_acc, not_reproduced_frac,
                       cascade) -> None:
    for name in names:
        if robust_acc[name] > clean_acc:
            raise AttackSoundnessError(
                f"robust accuracy of {name!r} ({robust_acc[name]:.4f}) exceeds the clean accuracy "
                f"({clean_acc:.4f})."
            )
        # Examples whose break did not reproduce are counted robust in the ensemble only.
        if ensemble_acc > robust_acc[name] + not_reproduced_frac:
            raise AttackSoundnessError(
                f"ensemble robust accuracy ({ensemble_acc:.4f}) exceeds that of {name!r} "
                f"({robust_acc[name]:.4f})."
            )
    if cascade and any(
        robust_acc[a] < robust_acc[b] for a, b in zip(names, names[1:], strict=False)
    ):
        raise AttackSoundnessError(f"cumulative robust accuracy increased: {robust_acc}.")


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
                f"white-box attacks ({', '.join(white)}) did not."
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
