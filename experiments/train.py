"""The stages of the TSCNC pipeline and their training loop: dense adversarial training ->
pruning -> fine-tuning, resumable.

:func:`train` runs (or, where finished, loads) the stages named in ``config.stages`` in order;
the evaluation of the result is :mod:`experiments.evaluate` (``train_and_evaluate``). Each stage
checkpoints into ``<workdir>/<stage>/checkpoints`` every epoch (orbax, atomic) and writes
``<workdir>/<stage>/final`` when done; the next stage starts from the previous stage's final
state. Rerunning the same command resumes: finished stages are loaded, the running one continues
from its latest checkpoint at the exact batch (the data order is a function of (seed, epoch)).

Outputs in ``workdir``: ``metrics.jsonl`` (one JSON object per logged step or evaluation) and the
same scalars as TensorBoard event files in ``tensorboard/`` (tensorboardX, no TensorFlow). A
progress bar with ETA goes to stdout.

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
from experiments import workdir as workdir_lib
from tscnc_jax import parallel, training
from tscnc_jax._progress import progress_bar

log = logging.getLogger(__name__)

STAGES = ("dense", "prune", "finetune")


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient."""


def _host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _lr_schedule(base: float, total_steps: int, milestones: tuple, factor: float):
    boundaries = {int(m * total_steps): factor for m in milestones if 0 < m < 1}
    return optax.piecewise_constant_schedule(base, boundaries)


def _cnc_filter(config, params):
    """``filter_fn`` of the CNC for ``config.cnc_layers``: every kernel (``None``), or the final
    Dense classifier only, as the authors' code constrains it (the last kernel in path order
    whose module is a Dense layer)."""
    if config.cnc_layers == "all":
        return None
    if config.cnc_layers != "classifier":
        raise ValueError(f"config.cnc_layers must be 'all' or 'classifier', "
                         f"got {config.cnc_layers!r}.")
    dense = [path for path, _, _ in tj.named_leaves(params) if "Dense" in path]
    if not dense:
        raise ValueError("config.cnc_layers='classifier' needs a Dense classifier.")
    return functools.partial(_path_is, dense[-1])


def _make_tx(config, stage_config, params, steps: int, masks=None):
    """The stage's optimizer: TSCNC penalties (plain and gated), weight decay, SGD."""
    c = stage_config
    return training.make_optimizer(
        _lr_schedule(c.learning_rate, max(steps, 1), config.lr_milestones, config.lr_factor),
        momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
        cnc_weight=c.cnc_weight, tsc_weight=c.tsc_weight,
        cnc_kwargs={**config.cnc, "filter_fn": _cnc_filter(config, params)},
        tsc_kwargs=dict(config.tsc), gated_tsc_weight=c.gated_tsc_weight,
        gated_tsc_kwargs=dict(config.gated_tsc), clamp_gates=config.clamp_gates, masks=masks)


def _path_is(target: str, path: str, leaf: Any) -> bool:
    del leaf
    return path == target


def _make_model(config):
    """The config's model, its BatchNorm (if any) synchronised over the data-parallel axis."""
    model = tj.create_model(config.model.name, num_classes=config.num_classes,
                            dtype=config.model.dtype, conv_impl=config.model.conv_impl,
                            **config.model.kwargs.to_dict())
    if "bn_axis_name" in type(model).__dataclass_fields__:
        model = model.clone(bn_axis_name=parallel.BATCH_AXIS)
    return model


def _attack(config):
    return training.default_attack(config.loss, eps=config.eps, steps=config.attack_steps,
                                   step_size=config.attack_step_size)


def eval_attack(config):
    """The PGD of validation and of the final evaluation (``config.eval.pgd_*``)."""
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


def validate(config) -> None:
    """Raises ``ValueError`` naming the first bad key of ``config`` (before any data loads)."""
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
    tj.pruning.check_sparsity(config.prune.sparsity, "config.prune.sparsity")
    choices = {"model.dtype": tuple(tj.models.DTYPES), "model.conv_impl": tj.models.CONV_IMPLS,
               "cnc.estimator": ("exact", "tracked")}
    for key, allowed in choices.items():
        section, name = key.split(".")
        if config[section][name] not in allowed:
            raise ValueError(f"config.{key} must be one of {allowed}, got "
                             f"{config[section][name]!r}.")
    if config.cnc.estimator == "tracked" and config.cnc.form != "smooth":
        raise ValueError(f"config.cnc.estimator='tracked' has the smooth form only; "
                         f"config.cnc.form={config.cnc.form!r}.")
    _validate_counts(config)
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


def _validate_counts(config) -> None:
    """Every count and size the stages of ``config.stages`` use, before any data is loaded."""
    runs = set(config.stages)
    at_least = {"batch_size": 1, "log_every": 1, "eval.num_val": 1, "eval.pgd_steps": 1,
                "eval.num_standard": 0, "eval.num_lipschitz": 0, "eval.chunk": 0,
                "data.num_val": 1,
                "data.num_train": 0}
    if "dense" in runs:
        at_least["dense.epochs"] = 1
    if "prune" in runs and config.prune.method == "hydra":
        at_least["prune.epochs"] = 1
    if "finetune" in runs:
        at_least["finetune.epochs"] = 1
    if config.loss != "clean":
        at_least["attack_steps"] = 1
    if config.eval.final:
        at_least["eval.num_test"] = 1
        if config.eval.num_lipschitz:
            at_least["eval.lipschitz_steps"] = 1
    for key, low in at_least.items():
        node = config
        for part in key.split("."):
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, int) or node < low:
            raise ValueError(f"config.{key} must be an integer >= {low}, got {node!r}.")


def _is_main() -> bool:
    """Whether this process writes the run's files (logs, checkpoints' digests, summaries)."""
    return jax.process_index() == 0


def _check_finite(stage: str, pending: list, steps_per_epoch: int) -> None:
    """Raises :class:`NonFiniteError` for the first of the ``pending`` ``(step, metrics)`` whose
    step was not finite (one device-to-host transfer for all of them)."""
    if not pending:
        return
    flags = jax.device_get([m["finite"] for _, m in pending])
    bad = next((i for i, f in enumerate(flags) if float(f) != 1.0), None)
    if bad is None:
        return
    global_step, metrics = pending[bad]
    host = _host(metrics)
    terms = sorted(k for k, v in host.items() if not math.isfinite(v))
    what = ", ".join(terms) + " = " + str({k: host[k] for k in terms}) if terms else (
        "the updated parameters (loss and gradients finite)" if not host["update_finite"]
        else "gradients")
    epoch, index = divmod(global_step, steps_per_epoch)
    later = pending[-1][0] - global_step
    after = f" ({later} later step(s) ran before the check)" if later else ""
    raise NonFiniteError(
        f"{stage}: non-finite values at step {global_step} (epoch {epoch}, batch {index}): "
        f"{what}; that step left the state unchanged{after}, and the last checkpoint holds an "
        f"earlier state. Lower the learning rate or the penalty weights.")


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
    mesh,
) -> tj.TrainState:
    """Trains ``state`` for ``epochs`` epochs with checkpoints, logging and resume.

    Every process runs this loop on its own rows of each global batch; the step is
    data-parallel over ``mesh`` and returns the replicated state. Finiteness is checked on the
    host only every ``config.log_every`` steps and before every checkpoint (no per-step
    device-to-host transfer); the error names the first bad step. Only process 0 writes logs.
    """
    stage_dir = workdir / stage
    mgr = checkpoints.manager(stage_dir / "checkpoints", max_to_keep=2)
    best_mgr = checkpoints.manager(stage_dir / "best", max_to_keep=1)
    restored = checkpoints.restore_latest(mgr, state)
    if restored is not None:
        log.info("%s: resuming from step %d", stage, int(restored.step))
        state = restored
    state = parallel.replicate(state, mesh)
    n_train = data.train_images.shape[0]
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the {n_train} training "
                         f"examples.")
    total = epochs * steps_per_epoch
    start = int(state.step)
    main = _is_main()
    metrics_path = workdir / "metrics.jsonl"
    if main:
        # Steps after the checkpoint resumed from were logged by the killed run and are
        # replayed now: each step is logged once (TensorBoard's purge_step likewise).
        workdir_lib.truncate_jsonl(
            metrics_path, lambda r: r.get("stage") == stage and r.get("step", 0) > start)
    best_path = stage_dir / "best_val.json"
    best_val = json.loads(best_path.read_text())["robust_acc"] if best_path.exists() else -math.inf
    progress = progress_bar(total, desc=stage, unit="step", enabled=config.progress and main,
                            initial=start)
    tb = tensorboardX.SummaryWriter(str(workdir / "tensorboard" / stage),
                                    purge_step=start + 1 if start else None) if main else None
    rows = parallel.local_rows(config.batch_size, mesh)
    pending = []  # (step, device metrics) not yet checked for finiteness
    for epoch in range(start // steps_per_epoch, epochs):
        first = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
        batches = parallel.prefetch(data_lib.iterate_batches(
            data.train_images, data.train_labels, config.batch_size, seed=config.seed,
            epoch=epoch, shuffle=True, augment=config.augment, flip=data.horizontal_flip,
            start_batch=first, rows=rows), mesh)
        for index, batch in enumerate(batches, start=first):
            global_step = epoch * steps_per_epoch + index
            state, metrics = step_fn(state, batch)
            pending.append((global_step, metrics))
            progress.update(1)
            last_of_epoch = index + 1 == steps_per_epoch
            if (global_step + 1) % config.log_every and not last_of_epoch:
                continue
            _check_finite(stage, pending, steps_per_epoch)
            pending = []
            if (global_step + 1) % config.log_every == 0:
                host = _host(metrics)
                if main:
                    workdir_lib.append_jsonl(metrics_path, {
                        "stage": stage, "step": global_step + 1, "epoch": epoch, **host})
                    for k, v in host.items():
                        tb.add_scalar(f"{stage}/train/{k}", v, global_step + 1)
                progress.set_postfix(loss=f"{host['loss']:.3f}", adv=f"{host['adv_acc']:.2f}")
            if last_of_epoch:
                best_val = _end_of_epoch(stage, global_step + 1, epoch, state, eval_fn, best_val,
                                         mgr=mgr, best_mgr=best_mgr, best_path=best_path,
                                         metrics_path=metrics_path, tb=tb)
    progress.close()
    if tb is not None:
        tb.close()
    if config.eval.checkpoint == "best" and best_path.exists():
        best = checkpoints.restore_latest(best_mgr, state)
        log.info("%s: handing on the best validation state (step %d)", stage, int(best.step))
        return parallel.replicate(best, mesh)
    return state


def _end_of_epoch(stage, step, epoch, state, eval_fn, best_val, *, mgr, best_mgr, best_path,
                  metrics_path, tb) -> float:
    """Validation, its logs, the best-on-validation state and the epoch's checkpoint."""
    val = eval_fn(state)
    if tb is not None:
        workdir_lib.append_jsonl(metrics_path, {"stage": stage, "step": step, "epoch": epoch + 1,
                                                **{f"val_{k}": v for k, v in val.items()}})
        for k, v in val.items():
            tb.add_scalar(f"{stage}/val/{k}", v, step)
        tb.flush()  # what a resume from this epoch's checkpoint will not log again
    # The best state before the epoch's checkpoint: a run killed in between replays the epoch
    # (the same state again) and finds its best already saved.
    if val["robust_acc"] > best_val:
        best_val = val["robust_acc"]
        checkpoints.save(best_mgr, step, state)
        if _is_main():
            workdir_lib.write_atomic(best_path, json.dumps({"step": step, **val}))
    checkpoints.save(mgr, step, state)
    return best_val


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


def _make_eval_fn(config, model, data, mesh, *, mode="dense", sparsity=None, scope="layer",
                  use_ema=True):
    """Validation robust and clean accuracy, data-parallel over ``mesh`` (each process attacks
    its rows of every batch; the sums are reduced over all devices)."""
    evaluate = parallel.data_parallel(training.make_eval_step(
        model, use_ema=use_ema, attack=eval_attack(config), mode=mode, sparsity=sparsity,
        scope=scope, axis_name=parallel.BATCH_AXIS), mesh=mesh)
    n = min(config.eval.num_val, data.val_images.shape[0])
    x, y = data.val_images[:n], data.val_labels[:n]
    devices = mesh.devices.size

    def eval_fn(state):
        sums = None
        for batch in data_lib.iterate_batches(x, y, config.batch_size, seed=0, epoch=0,
                                              shuffle=False, drop_remainder=False):
            batch = _padded(batch, devices)
            rows = parallel.local_rows(batch["label"].shape[0], mesh)
            out = jax.device_get(evaluate(state, {k: v[rows] for k, v in batch.items()}))
            sums = out if sums is None else {k: sums[k] + out[k] for k in out}
        return {"clean_acc": float(sums["clean_correct"] / sums["count"]),
                "robust_acc": float(sums["adv_correct"] / sums["count"])}

    return eval_fn


def _padded(batch: dict, multiple: int) -> dict:
    """``batch`` with its rows padded (repeating the last) to a multiple of ``multiple``, and
    ``"mask"``: 1 for the real rows, 0 for the padding."""
    n = batch["label"].shape[0]
    pad = -n % multiple
    out = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) if pad else v
           for k, v in batch.items()}
    out["mask"] = (np.arange(n + pad) < n).astype(np.float32)
    return out


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


def _data_parallel_step(config, model, tx, mesh, **mode):
    """The training step of ``config``, data-parallel over ``mesh`` (buffers donated on
    accelerators, where memory counts)."""
    step = training.make_train_step(model, tx, loss=config.loss, attack=_attack(config),
                                    beta=config.beta, axis_name=parallel.BATCH_AXIS, **mode)
    return parallel.data_parallel(step, mesh=mesh,
                                  donate_state=jax.default_backend() != "cpu")


def _train_stage(stage, config, workdir, model, data, state, tx, epochs, mesh) -> tj.TrainState:
    """A weight-training stage (dense or fine-tuning): its final state when finished, else
    trains ``state`` (resuming) and saves it as the stage's final state."""
    done = _load_final(workdir, stage, state)
    if done is not None:
        return done
    step_fn = _data_parallel_step(config, model, tx, mesh, ema_decay=config.ema_decay)
    state = _run_loop(stage, config=config, workdir=workdir, state=state, step_fn=step_fn,
                      eval_fn=_make_eval_fn(config, model, data, mesh), data=data,
                      epochs=epochs, mesh=mesh)
    _save_final(workdir, stage, state)
    return state


def _dense_stage(config, workdir, model, data, mesh) -> tj.TrainState:
    state, tx = _dense_initial_state(config, model, data)
    return _train_stage("dense", config, workdir, model, data, state, tx, config.dense.epochs,
                        mesh)


def _prune_stage(config, workdir, model, data, dense: tj.TrainState, mesh, *,
                 run: bool = True):
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
        step_fn = _data_parallel_step(config, model, tx, mesh, ema_decay=None, mode="scores",
                                      sparsity=c.sparsity, scope=c.scope)
        eval_fn = _make_eval_fn(config, model, data, mesh, mode="scores", sparsity=c.sparsity,
                                scope=c.scope)
        done = _run_loop("prune", config=config, workdir=workdir, state=state, step_fn=step_fn,
                         eval_fn=eval_fn, data=data, epochs=c.epochs, mesh=mesh)
        _save_final(workdir, "prune", done)
    masks = tj.scores_to_masks(done.scores, c.sparsity, scope=c.scope)
    return done.params, done.batch_stats, masks


def _finetune_stage(config, workdir, model, data, params, batch_stats, masks,
                    mesh) -> tj.TrainState:
    tx = _make_tx(config, config.finetune, params, _steps(config, config.finetune, data), masks)
    state = training.create_train_state(model, tx, jax.random.key(config.seed + 4),
                                        data.train_images.shape[1:], params=params,
                                        batch_stats=batch_stats, masks=masks)
    return _train_stage("finetune", config, workdir, model, data, state, tx,
                        config.finetune.epochs, mesh)


class Trained(NamedTuple):
    """What :func:`train` hands to the evaluation: the model, its data, the state to evaluate,
    the masks of a pruned run (``None`` for a dense one) and the dense state it was pruned from
    (``None`` for a dense run)."""

    model: Any
    data: Any
    state: tj.TrainState
    masks: Any
    dense: tj.TrainState | None


def evaluated_params(config, state: tj.TrainState):
    """The parameters a run is evaluated (and pruned) with: the EMA copy when the config keeps
    one."""
    return state.ema_params if config.ema_decay is not None else state.params


def _stage_dirs(config, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """The run directory each stage a run needs is trained in or loaded from: its own
    ``workdir`` for the stages in ``config.stages``; for the earlier ones it starts from, the run
    ``config.init_dir`` (default: ``workdir``), or, where that run did not train the stage itself,
    the run it started from in turn (its recorded ``init_dir``): a run started from a HYDRA run's
    finished prune stage finds the dense stage that HYDRA run pruned."""
    stages = split_stages(config.stages)
    source = pathlib.Path(config.init_dir) if config.init_dir else workdir
    needed = STAGES[:max(STAGES.index(s) for s in stages) + 1]
    return {s: workdir if s in stages else _run_with_stage(source, s) or source for s in needed}


def _run_with_stage(run: pathlib.Path, stage: str, depth: int = 8) -> pathlib.Path | None:
    """The run holding ``stage``'s final checkpoint: ``run``, or one that the chain of recorded
    ``init_dir``s from it leads to (at most ``depth`` links); ``None`` if none does (the caller
    names ``run``'s missing checkpoint)."""
    if _stage_final(run, stage).exists():
        return run
    recorded = run / workdir_lib.CONFIG_FILE
    if depth == 0 or not recorded.exists():
        return None
    init_dir = json.loads(recorded.read_text()).get("init_dir")
    return _run_with_stage(pathlib.Path(init_dir), stage, depth - 1) if init_dir else None


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Trained:
    """Runs (or, where finished, loads) the stages named in ``config.stages`` in ``workdir``."""
    validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = _stage_dirs(config, workdir)
    mesh = parallel.make_mesh()
    if config.batch_size % mesh.devices.size:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{mesh.devices.size} devices the run is data-parallel over.")
    data = data_lib.load_for_config(config)
    model = _make_model(config)
    stages = config.stages
    if "dense" in stages:
        state = _dense_stage(config, workdir, model, data, mesh)
    else:
        # Pruning starts from the dense weights alone, so the dense stage may come from a run
        # whose optimizer (its penalties) differs from this config's dense one.
        state = _finished(dirs["dense"], "dense", _dense_initial_state(config, model, data)[0],
                          optimizer=False)
    masks, dense = None, None
    if "prune" in stages or "finetune" in stages:
        dense = state
        params, batch_stats, masks = _prune_stage(
            config, dirs["prune"], model, data, state, mesh, run="prune" in stages)
        state = state._replace(params=tj.apply_masks(params, masks),
                               ema_params=tj.apply_masks(params, masks), batch_stats=batch_stats)
        if "finetune" in stages:
            state = _finetune_stage(config, workdir, model, data, params, batch_stats, masks,
                                    mesh)
    return Trained(model, data, state, masks, dense)


def restore(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Trained:
    """The trained state of a run whose stages have all finished; never trains.

    Raises:
      FileNotFoundError: a stage of ``config.stages`` (or the dense stage of ``config.init_dir``
        that a run without its own dense stage starts from) has no final checkpoint.
    """
    validate(config)
    workdir = pathlib.Path(workdir)
    missing = [str(_stage_final(d, s)) for s, d in _stage_dirs(config, workdir).items()
               if not _stage_final(d, s).exists()
               and (s != "prune" or config.prune.method == "hydra")]  # masks from weights
    if missing:
        raise FileNotFoundError(
            f"{workdir} is not a finished run: no final checkpoint in {', '.join(missing)}. "
            f"Finish it first (python -m experiments.main with the same --config and "
            f"--workdir resumes it).")
    return train(config, workdir)
