r"""Adversarial training: losses, the train state, and per-device train / eval steps.

The step is written once, per device; :func:`tscnc_jax.parallel.data_parallel` maps it over a
device mesh (``jit`` of ``shard_map``). Everything that changes between runs is bound by the
``make_*`` factories (model, optimizer, attack, loss); the state is a pytree of arrays.

Objective (docs/method.md section 5)::

    loss = L_adv(params) [+ lambda_s R_TSC + lambda_c R_CNC + weight decay, through optax]

with ``L_adv`` one of

* ``"clean"``: ``CE(f(x), y)``;
* ``"pgd_at"`` (Madry et al. 2018, arXiv 1706.06083): ``CE(f(x_adv), y)``;
* ``"trades"`` (Zhang et al. 2019, arXiv 1901.08573): ``CE(f(x), y) + beta / B * sum_i
  KL(softmax f(x_i) || softmax f(x_adv_i))``;
* ``"mart"`` (Wang et al. 2020, ICLR): boosted CE on ``x_adv`` plus ``beta`` times the KL term
  weighted by ``1 - p_y(x)``.

``x_adv`` comes from any attack of :mod:`tscnc_jax.attacks`, run in inference mode (BatchNorm
running statistics, deterministic gates) and treated as a constant. The TSCNC penalties enter
through the optimizer (:func:`make_optimizer`); their last values are read back from the
optimizer state for the metrics, so no SVD is computed twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tscnc_jax import attacks, pruning, transforms, tree_utils

PyTree = Any
LOSSES = ("clean", "pgd_at", "trades", "mart")


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree of arrays).

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: model parameters (for a pruned network: already multiplied by the masks).
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: optimizer state; holds the masks when the optimizer is wrapped by
        :func:`tscnc_jax.sparsify`, and the penalty values of the TSCNC transformations.
      ema_params: exponential moving average of ``params`` (see :func:`ema_update`).
      rng: base PRNG key; each step uses ``fold_in(fold_in(rng, step), device_index)``.
      scores: HYDRA scores (score-training mode) or ``None``.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    ema_params: PyTree
    rng: jax.Array
    scores: PyTree = None


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    key: jax.Array,
    input_shape: tuple[int, ...],
    *,
    params: PyTree | None = None,
    batch_stats: PyTree | None = None,
    masks: PyTree | None = None,
    scores: PyTree | None = None,
) -> TrainState:
    """Initialises a :class:`TrainState` (params from ``model.init`` unless given).

    Args:
      model: a Flax module taking ``(x, train=...)``.
      tx: the optimizer; it is initialised on ``scores`` when given (score training), else on
        the parameters.
      key: PRNG key; split into the init key and the state's ``rng``.
      input_shape: shape of one example (e.g. ``(28, 28, 1)``).
      params, batch_stats: start from these (e.g. the previous stage's checkpoint).
      masks: pruning masks applied to the parameters (and so to the EMA) at creation.
      scores: HYDRA scores to train (``tscnc_jax.init_scores(params)``); weights stay frozen.
    """
    init_key, gate_key, rng = jax.random.split(key, 3)
    if params is None:
        variables = model.init({"params": init_key, "gates": gate_key},
                               jnp.zeros((1, *input_shape), jnp.float32), train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {}) if batch_stats is None else batch_stats
    batch_stats = {} if batch_stats is None else batch_stats
    params = tree_utils.apply_masks(params, masks)
    opt_state = tx.init(scores if scores is not None else params)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        # A separate copy: the state can then be donated to a jitted step.
        ema_params=jax.tree.map(jnp.array, params),
        rng=rng,
        scores=scores,
    )


# ----------------------------------------------------------------------------------------------
# Losses (per batch, mean over examples).
# ----------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y))


def trades_loss(clean_logits: jax.Array, adv_logits: jax.Array, y: jax.Array,
                beta: float) -> jax.Array:
    """TRADES: ``CE(f(x), y) + beta * sum_i KL(p(x_i) || p(x_adv_i)) / B`` (Zhang et al. 2019)."""
    kl = attacks.kl_loss(adv_logits, clean_logits)  # per example, gradient through both
    return cross_entropy(clean_logits, y) + beta * jnp.mean(kl)


def mart_loss(clean_logits: jax.Array, adv_logits: jax.Array, y: jax.Array,
              beta: float) -> jax.Array:
    """MART (Wang et al. 2020): boosted CE on ``x_adv`` + ``beta`` * KL weighted by ``1 - p_y(x)``.

    ``BCE = CE(f(x_adv), y) - log(1.0001 - p_adv[y'])`` with ``y'`` the most likely wrong class,
    and the robust term ``sum_i KL(p(x_i) || p(x_adv_i)) (1 - p(x_i)[y_i]) / B``.
    """
    adv_logits = adv_logits.astype(jnp.float32)
    clean_logits = clean_logits.astype(jnp.float32)
    p_adv = jax.nn.softmax(adv_logits)
    num_classes = adv_logits.shape[-1]
    wrong = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), -jnp.inf, p_adv)
    y_wrong = jnp.argmax(wrong, axis=-1)
    p_wrong = jnp.take_along_axis(p_adv, y_wrong[:, None], axis=1)[:, 0]
    bce = cross_entropy(adv_logits, y) - jnp.mean(jnp.log(1.0001 - p_wrong + 1e-12))
    p_clean = jax.nn.softmax(clean_logits)
    p_true = jnp.take_along_axis(p_clean, y[:, None], axis=1)[:, 0]
    kl = jnp.sum(p_clean * (jnp.log(p_clean + 1e-12) - jnp.log(p_adv + 1e-12)), axis=1)
    return bce + beta * jnp.mean(kl * (1.0000001 - p_true))


def default_attack(
    loss: str,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Callable:
    """The standard inner maximisation of each loss, as ``attack(logits_fn, x, y, keys)``.

    TRADES: PGD on the KL to the clean prediction from ``x + 0.001 N(0, I)``; PGD-AT and MART:
    PGD on the cross-entropy from a uniform start in the ball. ``step_size`` defaults to ``2.5 eps
    / steps``. ``keys`` holds one PRNG key per example, so an example's random start depends only
    on its own key (the training step derives it from the step and the example's global index:
    the result does not depend on how the batch is split over devices).
    """
    if loss == "clean":
        return None
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
    attacks.check_eps(eps)
    lo, hi = bounds

    def attack(logits_fn, x, y, keys):
        if loss == "trades":
            noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
            x_init = jnp.clip(x + 0.001 * noise, lo, hi)
            attack_loss = "kl"
        else:
            noise = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -1.0, 1.0))(keys)
            x_init = jnp.clip(x + eps * noise, lo, hi)
            attack_loss = "ce"
        return attacks.pgd(logits_fn, x, y, key=keys[0], eps=eps, steps=steps,
                           step_size=step_size, loss=attack_loss, x_init=x_init, bounds=bounds)

    return attack


# ----------------------------------------------------------------------------------------------
# Optimizer and EMA.
# ----------------------------------------------------------------------------------------------


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    cnc_weight: optax.ScalarOrSchedule = 0.0,
    tsc_weight: optax.ScalarOrSchedule = 0.0,
    cnc_kwargs: dict | None = None,
    tsc_kwargs: dict | None = None,
    gated_tsc_weight: optax.ScalarOrSchedule = 0.0,
    gated_tsc_kwargs: dict | None = None,
    clamp_gates: bool = False,
    masks: PyTree | None = None,
) -> optax.GradientTransformation:
    """SGD with TSCNC: ``chain(tscnc penalties, add_decayed_weights, sgd)``, optionally pruned.

    ``cnc_kwargs`` go to :func:`tscnc_jax.add_condition_number_penalty` (``temperature``,
    ``delta``, ``form``, ``filter_fn``, ``reduce``, ``live``), or, with
    ``cnc_kwargs["estimator"] = "tracked"``, to the scalable
    :func:`tscnc_jax.spectral_tracking.add_tracked_condition_number_penalty` (warm-started
    singular vectors instead of an SVD per step; the smooth form only; its ``k``,
    ``iterations`` and ``resync_every`` may be given too and are ignored by the exact
    estimator, ``estimator="exact"`` being the default), ``tsc_kwargs`` to
    :func:`tscnc_jax.add_transformed_sparsity_penalty` (``a``, ``eps``, ``normalize``). A zero
    weight leaves the penalty out of the chain entirely (no SVD cost). With ``masks`` the whole
    chain is wrapped by :func:`tscnc_jax.sparsify` (fixed masks: fine-tuning of a pruned network;
    the penalties then see the pruned kernels).

    The authors' code's structured variant: ``gated_tsc_weight`` adds
    :func:`tscnc_jax.add_gated_sparsity_penalty` (``gated_tsc_kwargs``: ``form``, ``a``,
    ``num_train``, ...) and ``clamp_gates`` keeps hard-concrete ``log_alpha`` in
    ``[log 0.01, log 100]`` after every step. Weight decay never applies to ``log_alpha``.
    """
    parts = []
    if callable(gated_tsc_weight) or gated_tsc_weight != 0:
        parts.append(transforms.add_gated_sparsity_penalty(gated_tsc_weight,
                                                           **(gated_tsc_kwargs or {})))
    if callable(tsc_weight) or tsc_weight != 0:
        parts.append(transforms.add_transformed_sparsity_penalty(tsc_weight,
                                                                 **(tsc_kwargs or {"a": 1.0})))
    if callable(cnc_weight) or cnc_weight != 0:
        parts.append(_cnc_transform(cnc_weight, dict(cnc_kwargs or {})))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_not_gates))
    parts.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    if clamp_gates:
        parts.append(transforms.clamp_log_alpha_updates())
    tx = optax.chain(*parts)
    if masks is not None:
        tx = pruning.sparsify(tx, masks=masks)
    return tx


#: Keyword arguments only the tracked CNC estimator takes, and only the exact one.
_TRACKED_ONLY = ("k", "iterations", "resync_every")
_EXACT_ONLY = ("form", "eps")


def _cnc_transform(weight, kwargs: dict) -> optax.GradientTransformation:
    estimator = kwargs.pop("estimator", "exact")
    if estimator == "exact":
        return transforms.add_condition_number_penalty(
            weight, **{k: v for k, v in kwargs.items() if k not in _TRACKED_ONLY})
    if estimator != "tracked":
        raise ValueError(f"cnc estimator must be 'exact' or 'tracked', got {estimator!r}.")
    if kwargs.get("form", "smooth") != "smooth":
        raise ValueError(f"the tracked CNC estimator has the smooth form only, got "
                         f"form={kwargs['form']!r}.")
    from tscnc_jax import spectral_tracking  # it builds on this package's penalties

    return spectral_tracking.add_tracked_condition_number_penalty(
        weight, **{k: v for k, v in kwargs.items() if k not in _EXACT_ONLY})


def _not_gates(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: tree_utils.path_to_str(path).rsplit("/", 1)[-1] != "log_alpha", params)


def ema_update(ema: PyTree, params: PyTree, step: jax.Array, decay: float) -> PyTree:
    """``ema <- d * ema + (1 - d) * params``, warm-up ``d = min(decay, (1 + t) / (10 + t))``.

    The EMA is initialised to the initial parameters, so it is unbiased and needs no Adam-style
    bias correction (the authors' code applies one anyway, which over-weights the early iterates).
    The warm-up (TensorFlow's ``num_updates`` rule) lets the average forget the random
    initialisation quickly: after ``t`` steps the initial point's weight is at most
    ``prod_s (1 + s) / (10 + s)``, i.e. ``< 1e-3`` after 30 steps.
    """
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


# ----------------------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------------------


def _example_keys(key: jax.Array, local_batch: int, axis_name: str | None) -> jax.Array:
    """One key per example of this device's slice of the global batch (same on any device count)."""
    if axis_name is None:
        return jax.random.split(key, local_batch)
    num_devices = jax.lax.psum(1, axis_name)
    keys = jax.random.split(key, local_batch * num_devices)
    start = jax.lax.axis_index(axis_name) * local_batch
    return jax.lax.dynamic_slice_in_dim(keys, start, local_batch)


def _kernel_sq_norm(params: PyTree) -> jax.Array:
    return sum((jnp.sum(jnp.square(w.astype(jnp.float32))) for _, w, _ in
                tree_utils.named_leaves(params)), jnp.zeros([], jnp.float32))


#: The training objective of each loss from ``(clean_logits, adv_logits, y, beta)`` (clean
#: training passes the clean logits as both).
_OBJECTIVES: dict[str, Callable] = {
    "clean": lambda clean, adv, y, beta: cross_entropy(clean, y),
    "pgd_at": lambda clean, adv, y, beta: cross_entropy(adv, y),
    "trades": trades_loss,
    "mart": mart_loss,
}


def _check_step_arguments(loss, attack, mode, sparsity, beta, ema_decay) -> None:
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
    if loss != "clean" and attack is None:
        raise ValueError(f"loss={loss!r} needs an `attack` (e.g. training.default_attack(...)).")
    if mode not in ("dense", "scores"):
        raise ValueError(f"`mode` must be 'dense' or 'scores', got {mode!r}.")
    if mode == "scores" and sparsity is None:
        raise ValueError("mode='scores' needs `sparsity` (the fraction of weights removed).")
    if beta < 0:
        raise ValueError(f"`beta` must be >= 0, got {beta!r}.")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"`ema_decay` must be in [0, 1) or None, got {ema_decay!r}.")


def _step_keys(state: TrainState, local_batch: int, axis_name: str | None):
    """One attack key per example and the model's rngs for this step.

    The attack's start of global example i uses key (rng, step, i), the gates are shared across
    the batch (and so across devices), dropout is per device.
    """
    key = jax.random.fold_in(state.rng, state.step)
    attack_key, gate_key, dropout_key = jax.random.split(key, 3)
    example_keys = _example_keys(attack_key, local_batch, axis_name)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    return example_keys, {"gates": gate_key, "dropout": dropout_key}


def _train_apply(model: nn.Module, batch_stats: PyTree, rngs: dict) -> Callable:
    """``apply(params, batch_stats, x) -> (logits, new_batch_stats)`` in training mode (the
    statistics pass through unchanged for a model without BatchNorm)."""
    has_bn = bool(jax.tree.leaves(batch_stats))

    def apply(params, stats, inputs):
        if not has_bn:
            return model.apply({"params": params}, inputs, train=True, rngs=rngs), stats
        logits, upd = model.apply({"params": params, "batch_stats": stats}, inputs, train=True,
                                  rngs=rngs, mutable=["batch_stats"])
        return logits, upd["batch_stats"]

    return apply


def _inference_logits(model: nn.Module, params: PyTree, batch_stats: PyTree) -> Callable:
    """``x -> logits`` in inference mode: what the training attack sees."""
    variables = {"params": params}
    if jax.tree.leaves(batch_stats):
        variables["batch_stats"] = batch_stats
    return lambda inputs: model.apply(variables, inputs, train=False)


def _keep_if_finite(finite: jax.Array, old: TrainState, new: TrainState) -> TrainState:
    """``new`` where ``finite``, else ``old`` with its step counted: a non-finite step leaves the
    state unchanged so that the host can stop the run with the offending step and terms."""
    keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(finite, n, o))
    return new._replace(**{f: keep(getattr(new, f), getattr(old, f))
                           for f in TrainState._fields if f not in ("step", "rng")})


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss: Literal["clean", "pgd_at", "trades", "mart"] = "trades",
    attack: Callable | None = None,
    beta: float = 6.0,
    ema_decay: float | None = 0.99,
    mode: Literal["dense", "scores"] = "dense",
    sparsity: float | None = None,
    scope: Literal["layer", "global"] = "layer",
    axis_name: str | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the per-device training step ``step(state, batch) -> (state, metrics)``.

    Args:
      model: Flax module ``(x, train=...) -> logits``.
      tx: the optimizer (e.g. :func:`make_optimizer`); must be the one the state was made with.
      loss: ``"clean"``, ``"pgd_at"``, ``"trades"`` or ``"mart"``.
      attack: ``attack(logits_fn, x, y, keys) -> x_adv`` for the adversarial losses (e.g.
        :func:`default_attack`), with one PRNG key per example; run with the model in inference
        mode.
      beta: TRADES / MART trade-off (``trades`` with ``beta=0`` is clean training).
      ema_decay: EMA decay of the parameters (``None``: no EMA update).
      mode: ``"dense"`` trains ``params`` (dense training, or masked fine-tuning when ``tx`` is
        wrapped by :func:`tscnc_jax.sparsify`); ``"scores"`` trains the HYDRA ``scores`` with
        the weights frozen and masks ``top-k(|scores|)`` at ``sparsity``.
      sparsity: fraction of weights removed in ``"scores"`` mode.
      scope: ``"layer"`` (HYDRA: the same keep ratio per layer) or ``"global"`` top-k of the
        scores in ``"scores"`` mode (see :func:`tscnc_jax.scores_to_masks`).
      axis_name: the mapped axis name when run under ``shard_map`` (``parallel.BATCH_AXIS``
        with :func:`tscnc_jax.parallel.data_parallel`): gradients,
        BatchNorm statistics and metrics are averaged over it and the step's key is folded with
        the device index.

    Returns:
      A pure function; jit it or wrap it with :func:`tscnc_jax.parallel.data_parallel`.
      ``batch`` is ``{"image": x_BxHxWxC in [0, 1], "label": y_B}``. Metrics (scalars):
      ``loss`` (the adversarial objective), ``clean_loss``, ``clean_acc``, ``adv_acc`` (on the
      training attack's examples; equals ``clean_acc`` for clean training), ``cnc`` and
      ``tsc`` (raw penalty values, when in the optimizer), ``kernel_sq_norm`` (``sum ||W||^2``;
      weight decay adds ``wd / 2`` times it), ``grad_norm``, ``update_finite`` (1.0 when every
      updated parameter is finite) and ``finite`` (1.0 when the loss, every gradient and every
      updated parameter are finite; otherwise the state is left unchanged).
    """
    _check_step_arguments(loss, attack, mode, sparsity, beta, ema_decay)
    objective_fn = _OBJECTIVES[loss]

    def effective_params(state: TrainState, trainable: PyTree) -> PyTree:
        if mode == "scores":
            return pruning.masked_params_from_scores(state.params, trainable, sparsity,
                                                     scope=scope)
        return trainable

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        x, y = batch["image"], batch["label"]
        example_keys, rngs = _step_keys(state, y.shape[0], axis_name)
        apply_train = _train_apply(model, state.batch_stats, rngs)
        trainable = state.scores if mode == "scores" else state.params

        def loss_fn(trainable):
            params = effective_params(state, trainable)
            if loss == "clean":
                clean_logits, stats = apply_train(params, state.batch_stats, x)
                return objective_fn(clean_logits, clean_logits, y, beta), (
                    stats, clean_logits, clean_logits)
            logits_fn = _inference_logits(model, jax.lax.stop_gradient(params),
                                          state.batch_stats)
            x_adv = jax.lax.stop_gradient(attack(logits_fn, x, y, example_keys))
            clean_logits, stats = apply_train(params, state.batch_stats, x)
            adv_logits, stats = apply_train(params, stats, x_adv)
            return objective_fn(clean_logits, adv_logits, y, beta), (
                stats, clean_logits, adv_logits)

        (objective, (new_stats, clean_logits, adv_logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(trainable)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            new_stats = jax.lax.pmean(new_stats, axis_name)
        updates, new_opt_state = tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)

        new_params = state.params if mode == "scores" else new_trainable
        if ema_decay is not None and mode == "dense":
            new_ema = ema_update(state.ema_params, new_params, state.step, ema_decay)
        else:
            new_ema = state.ema_params
        grad_norm = optax.tree.norm(grads)
        # The update itself can overflow (a finite gradient times a large step): check its result.
        update_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                           for leaf in jax.tree.leaves(new_trainable)]))
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm) & update_finite
        new_state = _keep_if_finite(finite, state, TrainState(
            step=state.step + 1, params=new_params, batch_stats=new_stats,
            opt_state=new_opt_state, ema_params=new_ema, rng=state.rng,
            scores=new_trainable if mode == "scores" else state.scores))
        metrics = {
            "loss": objective,
            "clean_loss": cross_entropy(clean_logits, y),
            "clean_acc": jnp.mean(jnp.argmax(clean_logits, -1) == y),
            "adv_acc": jnp.mean(jnp.argmax(adv_logits, -1) == y),
            "kernel_sq_norm": _kernel_sq_norm(effective_params(state, trainable)),
            "grad_norm": grad_norm,
            "finite": finite.astype(jnp.float32),
            "update_finite": update_finite.astype(jnp.float32),
        }
        metrics.update(transforms.penalty_values(new_opt_state))
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        return new_state, metrics

    return step


def make_eval_step(
    model: nn.Module,
    *,
    use_ema: bool = True,
    attack: Callable | None = None,
    mode: Literal["dense", "scores"] = "dense",
    sparsity: float | None = None,
    scope: Literal["layer", "global"] = "layer",
    axis_name: str | None = None,
) -> Callable[[TrainState, dict], dict]:
    """Builds ``eval_step(state, batch) -> metrics`` (sums, so that batches can be added).

    Returns ``{"count", "clean_correct", "clean_loss_sum"}`` and, with an ``attack``,
    ``"adv_correct"``. Evaluates the EMA parameters when ``use_ema`` (dense mode), the
    score-masked parameters in ``"scores"`` mode. With ``axis_name`` the sums are ``psum``-ed.
    An optional ``batch["mask"]`` (``B``, 1 for a real example, 0 for padding) weights every
    sum, so that a last batch padded to a multiple of the device count counts only its real
    examples.
    """

    def step(state: TrainState, batch: dict) -> dict:
        x, y = batch["image"], batch["label"]
        weight = batch.get("mask", jnp.ones(y.shape, jnp.float32)).astype(jnp.float32)
        if mode == "scores":
            masks = pruning.scores_to_masks(state.scores, sparsity, scope=scope)
            params = tree_utils.apply_masks(state.params, masks)
        else:
            params = state.ema_params if use_ema else state.params
        logits_fn = _inference_logits(model, params, state.batch_stats)
        logits = logits_fn(x)
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), y)
        out = {
            "count": jnp.sum(weight),
            "clean_correct": jnp.sum(weight * (jnp.argmax(logits, -1) == y)),
            "clean_loss_sum": jnp.sum(weight * per_example),
        }
        if attack is not None:
            keys = _example_keys(jax.random.fold_in(state.rng, 2**31 - 1), y.shape[0], axis_name)
            x_adv = attack(logits_fn, x, y, keys)
            out["adv_correct"] = jnp.sum(weight * (jnp.argmax(logits_fn(x_adv), -1) == y))
        if axis_name is not None:
            out = jax.lax.psum(out, axis_name)
        return out

    return step
