"""The TSCNC pipeline: dense adversarial training -> pruning -> fine-tuning, resumable.

``train_and_evaluate(config, workdir)`` runs the stages named in ``config.stages`` in order. Each
stage checkpoints into ``<workdir>/<stage>/checkpoints`` every epoch (orbax, atomic) and writes
``<workdir>/<stage>/final`` when done; the next stage starts from the previous stage's final
state. Rerunning the same command resumes: finished stages are loaded, the running one continues
from its latest checkpoint at the exact batch (the data order is a function of (seed, epoch)).

Outputs in ``workdir``: ``metrics.jsonl`` (one JSON object per logged step or evaluation), the
same scalars as TensorBoard event files in ``tensorboard/`` (tensorboardX, no TensorFlow),
``summary.json`` and ``results.md`` (clean and robust accuracy
per attack, measured sparsity, per-layer condition numbers of the pruned kernels, product of
sigma_max), and the PNG figures of :mod:`experiments.reporting.plots`. A progress bar with ETA
goes to stdout.

``config.eval.checkpoint="best"`` hands on, from every stage, the state with the best robust
accuracy on the validation split (carved from the training data; the test set is never used
for selection) instead of the stage's last state; both are kept (``<stage>/best``,
``<stage>/final``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX

import tscnc_jax as tj
from experiments import checkpoints
from experiments import data as data_lib
from experiments.reporting import plots
from tscnc_jax import models as tj_models
from tscnc_jax import spectral, training
from tscnc_jax._progress import progress_bar

log = logging.getLogger(__name__)

STAGES = ("dense", "prune", "finetune")


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient."""


def _jsonl(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _lr_schedule(base: float, total_steps: int, milestones: tuple, factor: float):
    boundaries = {int(m * total_steps): factor for m in milestones if 0 < m < 1}
    return optax.piecewise_constant_schedule(base, boundaries)


def _penalty_kwargs(config, params) -> tuple[dict, dict]:
    p = config.penalty
    filter_fn = None
    if p.cnc_layers == "classifier":
        # The authors' code constrains the final Dense layer only: the last kernel in path order
        # whose module is a Dense layer.
        dense = [path for path, _, _ in tj.named_leaves(params) if "Dense" in path]
        if not dense:
            raise ValueError("config.penalty.cnc_layers='classifier' needs a Dense classifier.")
        classifier = dense[-1]
        filter_fn = functools.partial(_path_is, classifier)
    elif p.cnc_layers != "all":
        raise ValueError(f"config.penalty.cnc_layers must be 'all' or 'classifier', "
                         f"got {p.cnc_layers!r}.")
    cnc = {"temperature": p.temperature, "delta": p.delta, "form": p.cnc_form,
           "filter_fn": filter_fn, "reduce": p.reduce, "live": p.live}
    tsc = {"a": p.a, "eps": p.tsc_eps, "reduce": p.tsc_reduce}
    return cnc, tsc


def _make_tx(config, stage_config, params, steps: int, masks=None):
    """The stage's optimizer: TSCNC penalties (plain and gated), weight decay, SGD."""
    c, p = stage_config, config.penalty
    cnc, tsc = _penalty_kwargs(config, params)
    gated = {"form": p.gated_form, "a": p.gated_a, "num_train": p.gated_num_train,
             "weight_decay": p.gated_weight_decay, "lambda0": p.gated_lambda0}
    return training.make_optimizer(
        _lr_schedule(c.learning_rate, max(steps, 1), config.lr_milestones, config.lr_factor),
        momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
        cnc_weight=c.cnc_weight, tsc_weight=c.tsc_weight, cnc_kwargs=cnc, tsc_kwargs=tsc,
        gated_tsc_weight=c.gated_tsc_weight, gated_tsc_kwargs=gated, clamp_gates=p.clamp_gates,
        masks=masks)


def _path_is(target: str, path: str, leaf: Any) -> bool:
    del leaf
    return path == target


def _make_model(config):
    return tj.create_model(config.model.name, num_classes=config.num_classes,
                           **config.model.kwargs.to_dict())


def _attack(config):
    return training.default_attack(config.loss, eps=config.eps, steps=config.attack_steps,
                                   step_size=config.attack_step_size)


def _eval_attack(config):
    return training.default_attack("pgd_at", eps=config.eps, steps=config.eval.pgd_steps,
                                   step_size=config.eval.pgd_step_size)


def split_stages(stages) -> tuple[str, ...]:
    """``config.stages`` as a tuple of names; also splits comma-joined names.

    On the command line ``--config.stages=prune,finetune`` reaches the config as the 1-tuple
    ``("prune,finetune",)`` (ml_collections parses a tuple field's unquoted value as one string).
    """
    if isinstance(stages, str):
        stages = (stages,)
    return tuple(name.strip() for item in stages for name in str(item).split(",") if name.strip())


def _validate(config) -> None:
    if not config.stages:
        raise ValueError(f"config.stages is empty; choose consecutive stages of {STAGES}.")
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"config.stages has unknown stage(s) {unknown}; choose from {STAGES}.")
    if config.prune.scope not in ("layer", "global"):
        raise ValueError(f"config.prune.scope must be 'layer' or 'global', got "
                         f"{config.prune.scope!r}.")
    if config.prune.method not in ("hydra", "lwm", "global", "random"):
        raise ValueError(f"config.prune.method must be 'hydra', 'lwm', 'global' or 'random', got "
                         f"{config.prune.method!r}.")
    tj.check_sparsity(config.prune.sparsity, "config.prune.sparsity")
    if config.batch_size < 1:
        raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}.")
    order = [s for s in STAGES if s in config.stages]
    if list(config.stages) != order or STAGES[STAGES.index(order[0]):][:len(order)] != tuple(
            order):
        raise ValueError(f"config.stages={tuple(config.stages)} must be consecutive stages of "
                         f"{STAGES}, in that order (earlier stages are loaded from "
                         f"config.init_dir or the workdir).")
    if config.init_dir and "dense" in config.stages:
        raise ValueError(f"config.init_dir={config.init_dir!r} would be ignored: config.stages="
                         f"{tuple(config.stages)} trains its own dense stage. Drop 'dense' from "
                         f"config.stages (e.g. --config.stages=prune,finetune) to start from "
                         f"init_dir's finished dense stage, or unset config.init_dir.")
    if config.eval.checkpoint not in ("final", "best"):
        raise ValueError(f"config.eval.checkpoint must be 'final' or 'best', got "
                         f"{config.eval.checkpoint!r}.")
    if config.eval.num_standard < 0 or (config.eval.num_standard
                                        and config.eval.attacks != "fast"):
        raise ValueError(f"config.eval.num_standard={config.eval.num_standard} needs "
                         f"config.eval.attacks='fast' (got {config.eval.attacks!r}) and must be "
                         f">= 0: it adds the standard ensemble on a subset to the fast one.")


def _run_loop(
    stage: str,
    *,
    config,
    workdir: pathlib.Path,
    state: tj.TrainState,
    step_fn,
    eval_fn,
    data: data_lib.Dataset,
    epochs: int,
) -> tj.TrainState:
    """Trains ``state`` for ``epochs`` epochs with checkpoints, logging and resume."""
    stage_dir = workdir / stage
    mgr = checkpoints.manager(stage_dir / "checkpoints", max_to_keep=2)
    best_mgr = checkpoints.manager(stage_dir / "best", max_to_keep=1)
    restored = checkpoints.restore_latest(mgr, state)
    if restored is not None:
        log.info("%s: resuming from step %d", stage, int(restored.step))
        state = restored
    n_train = data.train_images.shape[0]
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the {n_train} training "
                         f"examples.")
    total = epochs * steps_per_epoch
    start = int(state.step)
    metrics_path = workdir / "metrics.jsonl"
    best_path = stage_dir / "best_val.json"
    best_val = json.loads(best_path.read_text())["robust_acc"] if best_path.exists() else -math.inf
    progress = progress_bar(total, desc=stage, unit="step", enabled=config.progress,
                            initial=start)
    tb = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    batches = None
    for global_step in range(start, total):
        epoch, index = divmod(global_step, steps_per_epoch)
        if batches is None or index == 0:
            batches = data_lib.iterate_batches(
                data.train_images, data.train_labels, config.batch_size, seed=config.seed,
                epoch=epoch, shuffle=True, augment=config.augment, flip=data.horizontal_flip,
                start_batch=index)
        batch = next(batches)
        state, metrics = step_fn(state, batch)
        finite = float(metrics["finite"])
        if finite != 1.0:
            host = _host(metrics)
            bad = sorted(k for k, v in host.items() if not math.isfinite(v))
            raise NonFiniteError(
                f"{stage}: non-finite values at step {global_step} (epoch {epoch}, batch "
                f"{index}): {', '.join(bad) or 'gradients'} = "
                f"{ {k: host[k] for k in bad} }; the state was not updated. Lower the learning "
                f"rate or the penalty weights.")
        progress.update(1)
        if (global_step + 1) % config.log_every == 0:
            host = _host(metrics)
            _jsonl(metrics_path, {"stage": stage, "step": global_step + 1, "epoch": epoch,
                                  **host})
            for k, v in host.items():
                tb.add_scalar(f"{stage}/train/{k}", v, global_step + 1)
            progress.set_postfix(loss=f"{host['loss']:.3f}", adv=f"{host['adv_acc']:.2f}")
        if (global_step + 1) % steps_per_epoch == 0:
            val = eval_fn(state)
            _jsonl(metrics_path, {"stage": stage, "step": global_step + 1, "epoch": epoch + 1,
                                  **{f"val_{k}": v for k, v in val.items()}})
            for k, v in val.items():
                tb.add_scalar(f"{stage}/val/{k}", v, global_step + 1)
            checkpoints.save(mgr, global_step + 1, state)
            if val["robust_acc"] > best_val:
                best_val = val["robust_acc"]
                checkpoints.save(best_mgr, global_step + 1, state)
                _write_atomic(best_path, json.dumps({"step": global_step + 1, **val}))
    progress.close()
    tb.close()
    if config.eval.checkpoint == "best" and best_path.exists():
        best = checkpoints.restore_latest(best_mgr, state)
        log.info("%s: handing on the best validation state (step %d)", stage, int(best.step))
        return best
    return state


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------------


def _stage_final(workdir: pathlib.Path, stage: str) -> pathlib.Path:
    return workdir / stage / "final"


def _load_final(workdir: pathlib.Path, stage: str, template: tj.TrainState, *,
                optimizer: bool = True):
    final_dir = _stage_final(workdir, stage)
    if not final_dir.exists():
        return None
    mgr = checkpoints.manager(final_dir, max_to_keep=1)
    return checkpoints.restore_latest(mgr, template, optimizer=optimizer)


def _save_final(workdir: pathlib.Path, stage: str, state: tj.TrainState) -> None:
    mgr = checkpoints.manager(_stage_final(workdir, stage), max_to_keep=1)
    checkpoints.save(mgr, int(state.step), state)


def _make_eval_fn(config, model, data, *, mode="dense", sparsity=None, scope="layer",
                  use_ema=True):
    evaluate = jax.jit(training.make_eval_step(model, use_ema=use_ema, attack=_eval_attack(config),
                                               mode=mode, sparsity=sparsity, scope=scope))
    n = min(config.eval.num_val, data.val_images.shape[0])
    x, y = data.val_images[:n], data.val_labels[:n]

    def eval_fn(state):
        sums = None
        for batch in data_lib.iterate_batches(x, y, config.batch_size, seed=0, epoch=0,
                                              shuffle=False, drop_remainder=False):
            out = jax.device_get(evaluate(state, batch))
            sums = out if sums is None else {k: sums[k] + out[k] for k in out}
        return {"clean_acc": float(sums["clean_correct"] / sums["count"]),
                "robust_acc": float(sums["adv_correct"] / sums["count"])}

    return eval_fn


def _steps(config, stage_config, data) -> int:
    return stage_config.epochs * (data.train_images.shape[0] // config.batch_size)


def _dense_initial_state(config, model, data):
    variables = model.init({"params": jax.random.key(config.seed),
                            "gates": jax.random.key(config.seed + 1)},
                           jnp.zeros((1, *data.train_images.shape[1:]), jnp.float32))
    tx = _make_tx(config, config.dense, variables["params"], _steps(config, config.dense, data))
    state = training.create_train_state(
        model, tx, jax.random.key(config.seed + 2), data.train_images.shape[1:],
        params=variables["params"], batch_stats=variables.get("batch_stats", {}))
    return state, tx


def _finished(source: pathlib.Path, stage: str, template, *, optimizer: bool = True):
    """The final state of ``stage`` in the run directory ``source``, which must exist."""
    done = _load_final(source, stage, template, optimizer=optimizer)
    if done is None:
        raise FileNotFoundError(
            f"no finished {stage} stage in {_stage_final(source, stage)}: run the {stage} stage "
            f"first (e.g. --config.stages={stage} with the same --workdir) or point "
            f"--config.init_dir at a run that finished it.")
    return done


def _dense_stage(config, workdir, model, data) -> tj.TrainState:
    state, tx = _dense_initial_state(config, model, data)
    done = _load_final(workdir, "dense", state)
    if done is not None:
        return done
    step_fn = jax.jit(training.make_train_step(model, tx, loss=config.loss, attack=_attack(config),
                                               beta=config.beta, ema_decay=config.ema_decay))
    state = _run_loop("dense", config=config, workdir=workdir, state=state, step_fn=step_fn,
                      eval_fn=_make_eval_fn(config, model, data), data=data,
                      epochs=config.dense.epochs)
    _save_final(workdir, "dense", state)
    return state


def _prune_stage(config, workdir, model, data, dense: tj.TrainState, *, run: bool = True):
    """Returns (params, batch_stats, masks) of the pruned network.

    With ``run=False`` a HYDRA score stage must already be finished in ``workdir``.
    """
    c = config.prune
    params = evaluated_params(config, dense)
    mask_fns = {"lwm": tj.layerwise_magnitude_masks,
                "global": functools.partial(tj.global_magnitude_masks, min_kept_per_layer=1),
                "random": functools.partial(tj.random_masks, key=jax.random.key(config.seed))}
    if c.method != "hydra":
        masks = mask_fns[c.method](params, c.sparsity)
        return params, dense.batch_stats, masks
    scores = tj.init_scores(params)
    steps = c.epochs * (data.train_images.shape[0] // config.batch_size)
    tx = optax.sgd(_lr_schedule(c.learning_rate, max(steps, 1), config.lr_milestones,
                                config.lr_factor), momentum=c.momentum, nesterov=c.nesterov)
    state = training.create_train_state(model, tx, jax.random.key(config.seed + 3),
                                        data.train_images.shape[1:], params=params,
                                        batch_stats=dense.batch_stats, scores=scores)
    done = _load_final(workdir, "prune", state) if run else _finished(workdir, "prune", state)
    if done is None:
        step_fn = jax.jit(training.make_train_step(
            model, tx, loss=config.loss, attack=_attack(config), beta=config.beta,
            ema_decay=None, mode="scores", sparsity=c.sparsity, scope=c.scope))
        eval_fn = _make_eval_fn(config, model, data, mode="scores", sparsity=c.sparsity,
                                scope=c.scope)
        done = _run_loop("prune", config=config, workdir=workdir, state=state, step_fn=step_fn,
                         eval_fn=eval_fn, data=data, epochs=c.epochs)
        _save_final(workdir, "prune", done)
    masks = tj.scores_to_masks(done.scores, c.sparsity, scope=c.scope)
    return done.params, done.batch_stats, masks


def _finetune_stage(config, workdir, model, data, params, batch_stats, masks) -> tj.TrainState:
    tx = _make_tx(config, config.finetune, params, _steps(config, config.finetune, data), masks)
    state = training.create_train_state(model, tx, jax.random.key(config.seed + 4),
                                        data.train_images.shape[1:], params=params,
                                        batch_stats=batch_stats, masks=masks)
    done = _load_final(workdir, "finetune", state)
    if done is not None:
        return done
    step_fn = jax.jit(training.make_train_step(model, tx, loss=config.loss, attack=_attack(config),
                                               beta=config.beta, ema_decay=config.ema_decay))
    state = _run_loop("finetune", config=config, workdir=workdir, state=state, step_fn=step_fn,
                      eval_fn=_make_eval_fn(config, model, data), data=data,
                      epochs=config.finetune.epochs)
    _save_final(workdir, "finetune", state)
    return state


# ----------------------------------------------------------------------------------------------
# Final evaluation and report.
# ----------------------------------------------------------------------------------------------


def spectral_report(params, masks=None, conv_inputs: dict | None = None) -> dict:
    """Per-layer condition numbers (float64) of the (pruned) kernels, and the product of sigma_max.

    ``kappa`` is each kernel's *live* condition number: the all-zero rows and columns a pruned
    kernel has (dead inputs, dead units) are dropped first, since their singular values are zero
    by structure (``spectral.tree_live_condition_numbers``); ``full_kappa`` is the whole
    matrix's, infinite wherever such a row or column exists. Dense kernels have none, so both
    agree there. ``live_kappa`` repeats ``kappa`` under the name older summaries used.
    ``operator_kappa`` is, for each stride-1 convolution in ``conv_inputs``
    (``models.conv_input_shapes``), the live condition number of its circularly padded operator
    on the layer's input grid (``spectral.host_conv_operator_condition_number``). The weight
    fractions count kernel entries with ``|w| < 1e-3``, of all and of the non-zero ones.
    """
    spectra = spectral.tree_singular_values(params, masks)  # one SVD per kernel
    full = {name: spectral.host_condition_number(s, shape) for name, (s, shape) in spectra.items()}
    sigma_max = {name: float(s[0]) for name, (s, _) in spectra.items()}
    live = spectral.tree_live_condition_numbers(params, masks)
    kappa = {k: v["kappa"] for k, v in live.items()}

    def log10(values):
        return np.log10(np.array(list(values), np.float64))

    report = {"kappa_definition": "live", "kappa": kappa, "full_kappa": full,
              "sigma_max": sigma_max,
              "median_log10_kappa": float(np.median(log10(kappa.values()))),
              "max_log10_kappa": float(np.max(log10(kappa.values()))),
              "median_log10_full_kappa": float(np.median(log10(full.values()))),
              "max_log10_full_kappa": float(np.max(log10(full.values()))),
              "live_kappa": kappa,
              "live_shape": {k: [v["live_rows"], v["live_cols"]] for k, v in live.items()},
              "live_rank": {k: v["live_rank"] for k, v in live.items()},
              "median_log10_live_kappa": float(np.median(log10(kappa.values()))),
              "max_log10_live_kappa": float(np.max(log10(kappa.values()))),
              "lipschitz_upper_bound": float(np.prod(list(sigma_max.values())))}
    weights = [np.abs(np.asarray(jax.device_get(w), np.float64)
                      * (1.0 if m is None else np.asarray(jax.device_get(m), np.float64))).ravel()
               for _, w, m in tj.named_leaves(params, masks)]
    w = np.concatenate(weights) if weights else np.zeros(0)
    report["weights_below_1e-3"] = float(np.mean(w < 1e-3)) if w.size else float("nan")
    nonzero = w[w != 0]
    report["nonzero_weights_below_1e-3"] = (float(np.mean(nonzero < 1e-3)) if nonzero.size
                                            else float("nan"))
    operator = {}
    flat = {name: (leaf, m) for name, leaf, m in tj.named_leaves(params, masks)}
    for name, where in (conv_inputs or {}).items():
        if name in flat and tuple(where["strides"]) == (1, 1):
            leaf, m = flat[name]
            operator[name] = spectral.host_conv_operator_condition_number(
                leaf, where["input"][:2], m)["kappa"]
    if operator:
        report["operator_kappa"] = operator
        report["median_log10_operator_kappa"] = float(np.median(log10(operator.values())))
    return report


def conv_inputs(model, state: tj.TrainState, data) -> dict:
    """Each convolution's input grid, strides and padding (``models.conv_input_shapes``)."""
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    return tj_models.conv_input_shapes(model, variables, data.train_images.shape[1:])


def evaluated_params(config, state: tj.TrainState):
    """The parameters a run is evaluated with: the EMA copy when the config keeps one."""
    return state.ema_params if config.ema_decay is not None else state.params


def logits_function(config, model, state: tj.TrainState):
    """The jitted inference-mode ``x -> logits`` of a trained state."""
    variables = {"params": evaluated_params(config, state)}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    return jax.jit(functools.partial(model.apply, variables, train=False))


def test_arrays(data, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` test images as float32 in [0, 1] and their int32 labels."""
    return (data.test_images[:n].astype(np.float32) / 255.0,
            data.test_labels[:n].astype(np.int32))


def standard_key(config) -> jax.Array:
    """The key of a run's standard-ensemble evaluation (here and in ``experiments.evaluate``)."""
    return jax.random.key(config.seed + 8)


def final_evaluation(config, model, state: tj.TrainState, data, masks=None) -> dict:
    params = evaluated_params(config, state)
    logits_fn = logits_function(config, model, state)
    n = min(config.eval.num_test, data.test_images.shape[0])
    x, y = test_arrays(data, n)
    t0 = time.time()
    pgd_attack = _eval_attack(config)
    keys = jax.random.split(jax.random.key(config.seed + 5), n)
    correct_pgd = 0
    pgd_jit = jax.jit(lambda xb, yb, kb: pgd_attack(logits_fn, xb, yb, kb))
    for i in range(0, n, config.batch_size):
        xb, yb = x[i:i + config.batch_size], y[i:i + config.batch_size]
        x_adv = pgd_jit(xb, yb, keys[i:i + config.batch_size])
        correct_pgd += int(jnp.sum(jnp.argmax(logits_fn(x_adv), -1) == yb))
    def batches(m):
        return [(x[i:min(i + config.batch_size, m)], y[i:min(i + config.batch_size, m)])
                for i in range(0, m, config.batch_size)]

    report = tj.evaluate_robustness(
        logits_fn, batches(n), eps=config.eps, attacks=config.eval.attacks,
        key=jax.random.key(config.seed + 6), progress=config.progress)
    standard = {}
    n_std = min(config.eval.num_standard, n)
    if n_std:
        t_std = time.time()
        std = tj.evaluate_robustness(logits_fn, batches(n_std), eps=config.eps,
                                     attacks="standard", key=standard_key(config),
                                     progress=config.progress)
        fast_robust = report.clean_correct[:n_std] & (report.broken_by[:n_std] < 0)
        standard = {"num_standard": n_std,
                    "standard_ensemble_acc": float(std.ensemble_robust_accuracy),
                    "fast_ensemble_acc_on_standard_subset": float(np.mean(fast_robust)),
                    "standard_per_attack": {k: float(v) for k, v in std.robust_accuracy.items()},
                    "standard_attack_warnings": list(std.warnings),
                    "standard_seconds": time.time() - t_std}
    n_lip = min(config.eval.num_lipschitz, n)
    lip_jit = jax.jit(lambda xb, kb: tj.local_lipschitz(
        logits_fn, xb, key=kb, eps=config.eps, steps=config.eval.lipschitz_steps))
    lip_key = jax.random.key(config.seed + 7)
    lip = np.concatenate([np.zeros(0, np.float32)] + [
        np.asarray(lip_jit(x[i:min(i + config.batch_size, n_lip)], jax.random.fold_in(lip_key, i)))
        for i in range(0, n_lip, config.batch_size)])
    sparsity = tj.summarize_sparsity(tj.nonzero_masks(params))
    result = {
        "num_test": n,
        "clean_acc": float(report.clean_accuracy),
        f"pgd{config.eval.pgd_steps}_acc": correct_pgd / n,
        "ensemble_acc": float(report.ensemble_robust_accuracy),
        "per_attack": {k: float(v) for k, v in report.robust_accuracy.items()},
        "attack_warnings": list(report.warnings),
        "sparsity": float(sparsity.sparsity),
        "layer_sparsity": {name: float(layer.sparsity) for name, layer in sparsity.layers.items()},
        "local_lipschitz_mean": float(np.mean(lip)) if n_lip else float("nan"),
        "local_lipschitz_median": float(np.median(lip)) if n_lip else float("nan"),
        "num_lipschitz": n_lip,
        "eval_seconds": time.time() - t0,
        **standard,
    }
    result.update(spectral_report(params, masks, conv_inputs(model, state, data)))
    return result


class Trained(NamedTuple):
    """What :func:`train` hands to the evaluation: the model, its data, the state to evaluate,
    the masks of a pruned run (``None`` for a dense one) and the spectral report of the dense
    model it was pruned from (``None`` for a dense run)."""

    model: Any
    data: Any
    state: tj.TrainState
    masks: Any
    dense_report: dict | None


def _stage_dirs(config, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """The run directory each stage a run needs is trained in or loaded from: its own
    ``workdir`` for the stages in ``config.stages``, ``config.init_dir`` (default: ``workdir``)
    for the earlier ones it starts from."""
    stages = split_stages(config.stages)
    source = pathlib.Path(config.init_dir) if config.init_dir else workdir
    needed = STAGES[:max(STAGES.index(s) for s in stages) + 1]
    return {s: workdir if s in stages else source for s in needed}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Trained:
    """Runs (or, where finished, loads) the stages named in ``config.stages`` in ``workdir``."""
    _validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = _stage_dirs(config, workdir)
    data = data_lib.load_for_config(config)
    model = _make_model(config)
    stages = config.stages
    if "dense" in stages:
        state = _dense_stage(config, workdir, model, data)
    else:
        # Pruning starts from the dense weights alone, so the dense stage may come from a run
        # whose optimizer (its penalties) differs from this config's dense one.
        state = _finished(dirs["dense"], "dense", _dense_initial_state(config, model, data)[0],
                          optimizer=False)
    masks, before = None, None
    if "prune" in stages or "finetune" in stages:
        before = spectral_report(evaluated_params(config, state),
                                 conv_inputs=conv_inputs(model, state, data))
        params, batch_stats, masks = _prune_stage(
            config, dirs["prune"], model, data, state, run="prune" in stages)
        state = state._replace(params=tj.apply_masks(params, masks),
                               ema_params=tj.apply_masks(params, masks), batch_stats=batch_stats)
        if "finetune" in stages:
            state = _finetune_stage(config, workdir, model, data, params, batch_stats, masks)
    return Trained(model, data, state, masks, before)


def restore(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Trained:
    """The trained state of a run whose stages have all finished; never trains.

    Raises:
      FileNotFoundError: a stage of ``config.stages`` (or the dense stage of ``config.init_dir``
        that a run without its own dense stage starts from) has no final checkpoint.
    """
    _validate(config)
    workdir = pathlib.Path(workdir)
    missing = [str(_stage_final(d, s)) for s, d in _stage_dirs(config, workdir).items()
               if not _stage_final(d, s).exists()]
    if missing:
        raise FileNotFoundError(
            f"{workdir} is not a finished run: no final checkpoint in {', '.join(missing)}. "
            f"Finish it first (python -m experiments.main with the same --config and "
            f"--workdir resumes it).")
    return train(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Runs the pipeline of ``config`` in ``workdir`` (resuming) and returns the summary.

    With ``config.eval.final=False`` it only trains: no test-set evaluation, no ``summary.json``,
    and the returned dict holds just ``config``, ``stages`` and ``trained_step``.
    """
    t0 = time.time()
    workdir = pathlib.Path(workdir)
    model, data, state, masks, before = train(config, workdir)
    stages = config.stages
    if not config.eval.final:
        log.info("config.eval.final=False: trained %s to step %d, no evaluation or summary",
                 ",".join(stages), int(state.step))
        return {"config": config.to_dict(), "stages": list(stages),
                "trained_step": int(state.step)}
    summary = {"config": config.to_dict(), "stages": list(stages),
               "evaluated_step": int(state.step)}
    summary.update(final_evaluation(config, model, state, data, masks))
    if before is not None:
        summary["dense_kappa"] = before["kappa"]
        summary["dense_sigma_max"] = before["sigma_max"]
        summary["dense_weights_below_1e-3"] = before["weights_below_1e-3"]
        if "operator_kappa" in before:
            summary["dense_operator_kappa"] = before["operator_kappa"]
    summary["wall_seconds"] = time.time() - t0
    _write_atomic(workdir / "summary.json", json.dumps(summary, indent=2, default=str))
    _write_atomic(workdir / "results.md", results_markdown([summary]))
    if config.plots:
        plots.run_plots(workdir, summary)
    return summary


def results_markdown(summaries: list[dict], names: list[str] | None = None) -> str:
    """A results table, one row per run summary, labelled by ``names`` (default: each run's
    config name)."""
    lines = ["| run | sparsity | clean | PGD | ensemble | median log10 kappa | max log10 kappa | "
             "max log10 live kappa | prod sigma_max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if names is None:
        names = [s["config"].get("name", "run") for s in summaries]
    for s, name in zip(summaries, names, strict=True):
        pgd = next(v for k, v in s.items() if k.startswith("pgd") and k.endswith("_acc"))
        # Summaries written before the live kappa existed have no such field.
        live = s.get("max_log10_live_kappa")
        live = "-" if live is None else f"{live:.2f}"
        lines.append(
            f"| {name} | {100 * s['sparsity']:.2f} % | {100 * s['clean_acc']:.2f} | "
            f"{100 * pgd:.2f} | {100 * s['ensemble_acc']:.2f} | {s['median_log10_kappa']:.2f} | "
            f"{s['max_log10_kappa']:.2f} | {live} | {s['lipschitz_upper_bound']:.3g} |")
    return "\n".join(lines) + "\n"
