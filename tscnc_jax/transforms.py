r"""optax gradient transformations adding the TSCNC penalties' gradients to the updates.

Each transformation maps incoming gradients ``g`` to ``g + weight(step) * grad(penalty)(params)``,
like :func:`optax.add_decayed_weights` does for L2. Place it before the optimizer::

    tx = optax.chain(
        tscnc_jax.add_transformed_sparsity_penalty(1e-5, a=1.0),
        tscnc_jax.add_condition_number_penalty(1e-2, temperature=0.1, delta=1e-3),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )

Weights are :data:`optax.ScalarOrSchedule` (evaluated at the transformation's own step count).
They compose with :func:`optax.chain`, :func:`optax.masked` (restricts which leaves the penalty
sees), :func:`optax.multi_transform` and :func:`optax.inject_hyperparams`; with the latter, pass
``static_args=("filter_fn",)`` when a ``filter_fn`` is given, since ``inject_hyperparams`` treats
every callable argument as a schedule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tscnc_jax import _validation, defaults, penalties, tree_utils


class ConditionNumberPenaltyState(NamedTuple):
    """State of every CNC transformation: :func:`add_condition_number_penalty` and the tracked
    :func:`tscnc_jax.spectral_tracking.add_tracked_condition_number_penalty`.

    Attributes:
      count: number of updates done (int32), the argument of the weight schedule.
      value: the (unweighted) penalty at the parameters of the last update (float32), so that a
        training loop can log it without recomputing SVDs; 0 before the first update.
      vectors: the tracked estimator's ``{kernel path: TrackedSingularVectors}`` as refined at
        the last update; ``{}`` (no leaves) for the exact penalty.
    """

    count: jax.Array
    value: jax.Array
    vectors: dict = {}


class SparsityPenaltyState(NamedTuple):
    """State of :func:`add_transformed_sparsity_penalty` (fields as in the CNC state)."""

    count: jax.Array
    value: jax.Array


def penalty_values(opt_state: Any) -> dict[str, jax.Array]:
    """Reads the last penalty values recorded in an optimizer state, wherever they are nested.

    Returns ``{"cnc": ..., "tsc": ...}`` with the keys of the penalties present (values summed if
    a penalty occurs more than once, e.g. under :func:`optax.multi_transform`).
    """
    found: dict[str, jax.Array] = {}
    kinds = {ConditionNumberPenaltyState: "cnc", SparsityPenaltyState: "tsc"}

    def visit(node):
        kind = kinds.get(type(node))
        if kind is not None:
            found[kind] = found[kind] + node.value if kind in found else node.value
        return node

    jax.tree.map(visit, opt_state, is_leaf=lambda n: type(n) in kinds)
    return found


def _add_penalty_gradient(
    penalty: Callable[..., jax.Array],
    hyperparameters: dict[str, Any],
    weight: optax.ScalarOrSchedule,
    name: str,
    state_cls: type,
    **tree_kwargs: Any,
) -> optax.GradientTransformation:
    """The transformation ``name`` adding ``weight * grad`` of ``penalty(params,
    **hyperparameters, **tree_kwargs)``; the hyperparameters are validated at construction (a
    call on an empty tree), so that bad ones fail before any tracing."""
    penalty({}, **hyperparameters)
    _validation.check_nonnegative("weight", weight)
    penalty_fn = functools.partial(penalty, **hyperparameters, **tree_kwargs)

    def init_fn(params):
        del params
        return state_cls(count=jnp.zeros([], jnp.int32), value=jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                f"{name} needs the current parameters: call `update(updates, state, params)`."
            )
        w = weight(state.count) if callable(weight) else weight
        value, grads = jax.value_and_grad(penalty_fn)(params)
        updates = jax.tree.map(
            lambda u, g: (u + jnp.asarray(w, g.dtype) * g).astype(u.dtype), updates, grads
        )
        new_state = state_cls(
            count=optax.safe_int32_increment(state.count), value=value.astype(jnp.float32)
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def add_condition_number_penalty(
    weight: optax.ScalarOrSchedule,
    *,
    temperature: float = defaults.CNC_TEMPERATURE,
    delta: float = defaults.CNC_DELTA,
    form: Literal["smooth", "log_det"] = "smooth",
    eps: float = 1e-5,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["mean", "sum"] = defaults.CNC_REDUCE,
    live: bool = True,
) -> optax.GradientTransformation:
    r"""Adds ``weight * grad(condition_number_penalty)(params)`` to the updates (CNC).

    Args:
      weight: ``lambda_c >= 0``, a scalar or a schedule of the step count.
      temperature, delta, form, eps, filter_fn, masks, reduce, live: as in
        :func:`tscnc_jax.condition_number_penalty`. ``masks`` is a fixed masks tree; inside
        the pruning wrapper (:mod:`tscnc_jax.pruning`) the penalty sees the pruned parameters,
        whose exact zeros define each kernel's live spectrum (``live=True``, the default).

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` requires ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, tscnc_jax
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 4))}
      >>> tx = optax.chain(tscnc_jax.add_condition_number_penalty(0.1), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> zeros = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(zeros, state, params)
    """
    hyperparameters = dict(temperature=temperature, delta=delta, form=form, eps=eps,
                           reduce=reduce, live=live)
    return _add_penalty_gradient(
        penalties.condition_number_penalty, hyperparameters, weight,
        "add_condition_number_penalty", ConditionNumberPenaltyState, filter_fn=filter_fn,
        masks=masks)


def add_transformed_sparsity_penalty(
    weight: optax.ScalarOrSchedule,
    *,
    a: float = defaults.TSC_A,
    eps: float = 0.0,
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["sum", "layer_mean", "mean"] = defaults.TSC_REDUCE,
) -> optax.GradientTransformation:
    r"""Adds ``weight * grad(transformed_sparsity_penalty)(params)`` to the updates (TSC).

    With the default ``reduce="sum"`` each weight ``w`` gets ``weight * a (a + 1) / (a + |w|)^2 *
    sign(w)`` added to its gradient, about ``2 * weight * sign(w)`` for ``a = 1`` and small
    weights; weight decay adds ``wd * w`` (see :func:`tscnc_jax.transformed_sparsity_penalty`).

    Args:
      weight: ``lambda_s >= 0``, a scalar or a schedule of the step count.
      a, eps, filter_fn, masks, reduce: as in :func:`tscnc_jax.transformed_sparsity_penalty`.

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` requires ``params``.
    """
    return _add_penalty_gradient(
        penalties.transformed_sparsity_penalty, dict(a=a, eps=eps, reduce=reduce), weight,
        "add_transformed_sparsity_penalty", SparsityPenaltyState, filter_fn=filter_fn,
        masks=masks)


def add_gated_sparsity_penalty(
    weight: optax.ScalarOrSchedule,
    *,
    form: Literal["textbook", "authors_code"] = "textbook",
    a: float = defaults.GATED_A,
    num_train: int = defaults.GATED_NUM_TRAIN,
    weight_decay: float = defaults.GATED_WEIGHT_DECAY,
    lambda0: float = defaults.GATED_LAMBDA0,
    prior_keep: float = defaults.GATED_PRIOR_KEEP,
    masks: Any | None = None,
) -> optax.GradientTransformation:
    r"""Adds ``weight * grad(gated_sparsity_penalty)(params)`` to the updates (gated TSC).

    The structured TSC of the authors' code, over every hard-concrete-gated conv (see
    :func:`tscnc_jax.gated_sparsity_penalty`); its gradient reaches both the kernels and the
    gates' ``log_alpha``. Chain :func:`clamp_log_alpha_updates` after the optimizer to keep the
    gates in the authors' range. The state is a :class:`SparsityPenaltyState`, so
    :func:`penalty_values` reports the value as ``"tsc"``.
    """
    hyperparameters = dict(form=form, a=a, num_train=num_train, weight_decay=weight_decay,
                           lambda0=lambda0, prior_keep=prior_keep, masks=masks)
    return _add_penalty_gradient(
        penalties.gated_sparsity_penalty, hyperparameters, weight, "add_gated_sparsity_penalty",
        SparsityPenaltyState)


def clamp_log_alpha_updates(lo: float = math.log(0.01),
                            hi: float = math.log(100.0)) -> optax.GradientTransformation:
    """Turns the updates of every ``log_alpha`` leaf into ``clip(p + u, lo, hi) - p``.

    Place it last in the chain: after ``optax.apply_updates`` the gates lie in ``[lo, hi]``
    (``[log 0.01, log 100]`` by default), which is the authors' code's per-step
    ``constrain_parameters``. Other leaves pass through unchanged. Stateless.
    """
    if not lo < hi:
        raise ValueError(f"clamp_log_alpha_updates needs lo < hi, got lo={lo!r}, hi={hi!r}.")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_log_alpha_updates needs the current parameters: call "
                             "`update(updates, state, params)`.")

        def clamp(path, u, p):
            if tree_utils.path_to_str(path).rsplit("/", 1)[-1] != "log_alpha":
                return u
            return (jnp.clip(p + u, lo, hi) - p).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(clamp, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def tscnc(
    cnc_weight: optax.ScalarOrSchedule,
    tsc_weight: optax.ScalarOrSchedule,
    *,
    temperature: float = defaults.CNC_TEMPERATURE,
    delta: float = defaults.CNC_DELTA,
    a: float = defaults.TSC_A,
    tsc_eps: float = 0.0,
    cnc_form: Literal["smooth", "log_det"] = "smooth",
    filter_fn: tree_utils.FilterFn | None = None,
    masks: Any | None = None,
    reduce: Literal["mean", "sum"] = defaults.CNC_REDUCE,
    tsc_reduce: Literal["sum", "layer_mean", "mean"] = defaults.TSC_REDUCE,
    live: bool = True,
) -> optax.GradientTransformation:
    r"""Both TSCNC constraints, chained: the TSC transformation, then the CNC transformation.

    Adds ``tsc_weight * grad(R_TSC) + cnc_weight * grad(R_CNC)`` to the updates; chain an
    optimizer after it. Arguments are those of the two transformations (``tsc_eps`` is the TSC's
    ``eps``, ``tsc_reduce`` its ``reduce``, ``cnc_form`` the CNC's ``form``; both penalties share
    ``filter_fn`` and ``masks``).
    """
    return optax.chain(
        add_transformed_sparsity_penalty(
            tsc_weight, a=a, eps=tsc_eps, filter_fn=filter_fn, masks=masks, reduce=tsc_reduce
        ),
        add_condition_number_penalty(
            cnc_weight,
            temperature=temperature,
            delta=delta,
            form=cnc_form,
            filter_fn=filter_fn,
            masks=masks,
            reduce=reduce,
            live=live,
        ),
    )
