"""Exports a finished run's model for PyTorch: the Adversarial Pruning Benchmark's base models.

    python -m experiments.export --workdir=runs/hydra_r18 [--out=runs/hydra_r18/export] \\
        [--stage=finetune] [--which=final|best]

The run's model must be one of the architectures of :mod:`tscnc_jax.torch_models`
(``--config.model.name=resnet18`` or ``vgg16_bn``), parameter for parameter the base ResNet-18
and VGG-16-BN of the Adversarial Pruning Benchmark (Piras et al. 2024, arXiv 2409.01249). It
writes into ``--out`` (default ``<workdir>/export``), each file atomically (a reader sees the
old file or the new one, never a part):

* ``model.safetensors``: the PyTorch ``state_dict``
  (:func:`tscnc_jax.export.to_torch_state_dict`) of the model the run's final evaluation
  evaluates: the EMA weights when the config keeps an EMA (``ema_decay``), else the weights
  (:func:`experiments.train.evaluated_params`), with the run's BatchNorm statistics and the
  pruning masks multiplied in (a pruned weight is exactly zero). A PyTorch user loads it with
  ``safetensors.torch.load_file`` and ``load_state_dict(..., strict=True)``; inputs are NCHW
  images in ``[0, 1]`` without normalisation (the benchmark's ``normalization=False``).
* ``model_key.json``: the benchmark's model key (``<method>_<R18|V16>_<dataset>_US_<sparsity>``,
  the format of its ``model_key_maker``) and its parts: method (the config's name), architecture,
  dataset, structure (``unstructured`` for our weight masks, ``dense`` for an unpruned model),
  the sparsity measured on the exported conv/linear weights and the configured one, and the
  run's clean and robust accuracy from ``summary.json`` when the exported model is the one the
  summary evaluated. The same fields are the safetensors file's metadata (as strings).

``--stage`` picks an earlier stage of the run (default: its last one; ``dense`` exports the dense
model a pruned run started from) and ``--which=best`` that stage's best-on-validation checkpoint
(``<stage>/best``) instead of its final one. The run's state is restored with the functions of
:mod:`experiments.train` and :mod:`experiments.evaluate` (never trained: a stage without its
checkpoint is an error naming it); like them, the restore reads the run's dataset.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in experiments.main

import json
import pathlib
import sys
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

import tscnc_jax as tj
from experiments import checkpoints, evaluate, train
from experiments import workdir as workdir_lib
from experiments.configs import base
from tscnc_jax import export as export_lib
from tscnc_jax import torch_models

FLAGS = flags.FLAGS

#: The architectures the benchmark's base models load, by our model name: (the benchmark's
#: name, the short name in its model keys).
BENCHMARK_ARCHS = {"resnet18": ("ResNet18", "R18"), "vgg16_bn": ("VGG16BN", "V16")}
#: Our dataset names as the benchmark spells them (it has CIFAR10 and SVHN; the others keep a
#: readable name).
DATASETS = {"cifar10": "CIFAR10", "svhn_cropped": "SVHN", "mnist": "MNIST",
            "fashion_mnist": "FashionMNIST", "synthetic": "synthetic"}
#: The widths and label counts the benchmark's base models are built with.
BENCHMARK_WIDTH, BENCHMARK_CLASSES = 64, 10
#: Each architecture's first conv (its width) and last linear layer (its classes).
_ENDS = {"resnet18": ("conv1.weight", "linear.bias"),
         "vgg16_bn": ("features.0.weight", "classifier.4.bias")}
MODEL_FILE, KEY_FILE = "model.safetensors", "model_key.json"
WHICH = ("final", "best")

assert set(BENCHMARK_ARCHS) == set(torch_models.ARCHS)


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_string("workdir", None, "A run directory written by experiments.main.")
    flags.DEFINE_string("out", None, "Output directory (default: <workdir>/export).")
    flags.DEFINE_enum("stage", None, list(train.STAGES),
                      "The stage whose model to export (default: the run's last stage).")
    flags.DEFINE_enum("which", "final", list(WHICH), "final: the stage's final checkpoint (what "
                      "the run hands on and evaluates); best: its best-on-validation one.")
    flags.mark_flags_as_required(["workdir"])


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def run_config(workdir: pathlib.Path) -> tuple[ml_collections.ConfigDict, dict | None]:
    """The run's config and its summary (``None`` before the final evaluation, or without one):
    from ``summary.json`` when there is one, else from ``config.json`` (recorded at the start)."""
    if (workdir / "summary.json").exists():
        summary, config = evaluate._kept_summary(workdir)
        return config, summary
    recorded = workdir / workdir_lib.CONFIG_FILE
    if not recorded.exists():
        raise FileNotFoundError(
            f"{workdir} is not a run directory: it has neither summary.json nor "
            f"{workdir_lib.CONFIG_FILE} (python -m experiments.main --config=... "
            f"--workdir={workdir} writes them).")
    return base.from_summary(json.loads(recorded.read_text())), None


def benchmark_arch(config, workdir: pathlib.Path) -> str:
    """The run's model name, which must be one of :data:`BENCHMARK_ARCHS`."""
    name = config.model.name
    if name not in BENCHMARK_ARCHS:
        raise ValueError(
            f"{workdir} trained model {name!r}, which the Adversarial Pruning Benchmark's "
            f"PyTorch base models cannot load; export supports {' and '.join(BENCHMARK_ARCHS)} "
            f"(train with --config.model.name=resnet18 or --config.model.name=vgg16_bn).")
    return name


def _stage(config, stage: str | None) -> str:
    stages = train.split_stages(config.stages)
    if stage is None:
        return stages[-1]
    if stage not in stages:
        source = (f"; it comes from --config.init_dir={config.init_dir}: export that run "
                  f"(--workdir={config.init_dir} --stage={stage})" if config.init_dir else "")
        raise ValueError(f"--stage={stage} is not a stage of this run (config.stages="
                         f"{stages}){source}.")
    return stage


def _up_to(config, stage: str) -> ml_collections.ConfigDict:
    """``config`` whose stages end at ``stage`` (the run's state after that stage)."""
    stages = train.split_stages(config.stages)
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.stages = stages[:stages.index(stage) + 1]
    return sub


def _best(config, workdir: pathlib.Path, stage: str, state: tj.TrainState, masks):
    """The stage's best-on-validation state and masks, in place of its final ones."""
    best_dir = workdir / stage / "best"
    if not (best_dir.is_dir() and any(p.name.isdigit() for p in best_dir.iterdir())):
        hint = (f" (prune.method={config.prune.method!r} has no prune training)"
                if stage == "prune" and config.prune.method != "hydra" else "")
        raise FileNotFoundError(f"no best-on-validation checkpoint in {best_dir}{hint}; "
                                f"export --which=final instead.")
    mgr = checkpoints.manager(best_dir, max_to_keep=1)
    if stage != "prune":  # a weight-training stage: the final state's structure
        return checkpoints.restore_latest(mgr, state), masks
    # HYDRA's score stage: its masks come from the best state's scores, applied as train() does.
    template = state._replace(scores=tj.init_scores(state.params))
    best = checkpoints.restore_latest(mgr, template, optimizer=False)
    masks = tj.scores_to_masks(best.scores, config.prune.sparsity, scope=config.prune.scope)
    pruned = tj.apply_masks(best.params, masks)
    return best._replace(params=pruned, ema_params=pruned, scores=None), masks


def restore_model(config, workdir: pathlib.Path, stage: str, which: str = "final"
                  ) -> tuple[dict[str, Any], Any, int]:
    """The variables the run evaluates after ``stage`` (``{"params": ..., "batch_stats": ...}``
    with :func:`experiments.train.evaluated_params`), its masks (``None``: dense) and its step."""
    if which not in WHICH:
        raise ValueError(f"--which={which!r} must be one of {WHICH}.")
    trained = train.restore(_up_to(config, stage), workdir)
    state, masks = tj.parallel.local_copy(trained.state), trained.masks
    if which == "best":
        state, masks = _best(config, workdir, stage, state, masks)
    variables = {"params": train.evaluated_params(config, state),
                 "batch_stats": state.batch_stats}
    return variables, masks, int(state.step)


# ----------------------------------------------------------------------------------------------
# The model key.
# ----------------------------------------------------------------------------------------------


def measured_sparsity(state_dict: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """The fraction of exact zeros among the conv and linear weights (every ``.weight`` with
    2 or more dimensions: the pruned kernels), in all and per tensor."""
    weights = {k: v for k, v in state_dict.items() if k.endswith(".weight") and v.ndim >= 2}
    zeros = {k: int(np.count_nonzero(v == 0)) for k, v in weights.items()}
    total = sum(v.size for v in weights.values())
    return (sum(zeros.values()) / total,
            {k: zeros[k] / weights[k].size for k in weights})


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.10g}"  # 0.99 -> "99", 0.995 -> "99.5"


def model_key(config, arch: str, state_dict: dict[str, np.ndarray], *, pruned: bool,
              stage: str, which: str, step: int, summary: dict | None,
              workdir: pathlib.Path) -> dict:
    """The benchmark's model key of an exported model, its parts and the run's accuracies."""
    architecture, short = BENCHMARK_ARCHS[arch]
    dataset = DATASETS.get(config.dataset, config.dataset)
    sparsity, layers = measured_sparsity(state_dict)
    configured = float(config.prune.sparsity) if pruned else None
    key = (f"{config.name}_{short}_{dataset}_US_{_percent(configured)}" if pruned
           else f"{config.name}_{short}_{dataset}_dense")
    first_conv, last_linear = _ENDS[arch]
    width = int(state_dict[first_conv].shape[0])
    num_classes = int(state_dict[last_linear].shape[0])
    record = {
        "model_key": key, "method": config.name, "architecture": architecture, "arch": arch,
        "dataset": dataset, "structure": "unstructured" if pruned else "dense",
        "sparsity": sparsity, "sparsity_configured": configured,
        "num_classes": num_classes, "width": width,
        "benchmark_compatible": width == BENCHMARK_WIDTH and num_classes == BENCHMARK_CLASSES,
        "normalization": False, "threat_model": "Linf", "eps": float(config.eps),
        "stage": stage, "checkpoint": which, "step": step, "workdir": str(workdir),
    }
    # The summary's numbers describe the model it evaluated: the last stage at its step.
    if (summary is not None and stage == train.split_stages(config.stages)[-1]
            and step == int(summary["evaluated_step"])):
        pgd = next(k for k in summary if k.startswith("pgd") and k.endswith("_acc"))
        record.update({"clean_acc": summary["clean_acc"], "robust_acc": summary["ensemble_acc"],
                       "robust_attacks": config.eval.attacks, pgd: summary[pgd],
                       "num_test": summary["num_test"]})
        if "standard_ensemble_acc" in summary:
            record.update({"standard_ensemble_acc": summary["standard_ensemble_acc"],
                           "num_standard": summary["num_standard"]})
    elif summary is not None:
        record["summary_note"] = (f"summary.json evaluated {train.split_stages(config.stages)[-1]} "
                                  f"at step {summary['evaluated_step']}, not this model")
    record["layer_sparsity"] = layers
    return record


def _metadata(record: dict) -> dict[str, str]:
    """The record as safetensors metadata (strings only; the per-tensor sparsities left out)."""
    meta = {"format": "pt"}
    for k, v in record.items():
        if k != "layer_sparsity":
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


# ----------------------------------------------------------------------------------------------
# The export.
# ----------------------------------------------------------------------------------------------


def export(workdir: str | os.PathLike, out: str | os.PathLike | None = None, *,
           stage: str | None = None, which: str = "final") -> dict:
    """Writes ``<out>/model.safetensors`` and ``<out>/model_key.json`` for a run (module
    docstring) and returns the model key record.

    Raises:
      ValueError: the run's model is not ``resnet18`` / ``vgg16_bn`` (the message names it), or
        ``stage`` / ``which`` is not one of the run's.
      FileNotFoundError: ``workdir`` is not a run directory, or a checkpoint the export needs is
        missing (the message names it).
    """
    workdir = pathlib.Path(workdir)
    out = workdir / "export" if out is None else pathlib.Path(out)
    config, summary = run_config(workdir)
    arch = benchmark_arch(config, workdir)
    stage = _stage(config, stage)
    variables, masks, step = restore_model(config, workdir, stage, which)
    state_dict = export_lib.to_torch_state_dict(variables, arch, masks=masks)
    record = model_key(config, arch, state_dict, pruned=masks is not None, stage=stage,
                       which=which, step=step, summary=summary, workdir=workdir)
    out.mkdir(parents=True, exist_ok=True)
    export_lib.save_safetensors(out / MODEL_FILE, state_dict, metadata=_metadata(record))
    workdir_lib.write_atomic(out / KEY_FILE, json.dumps(record, indent=2) + "\n")
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    tj.xla_cpu.set_fast_cpu_flags()
    out = pathlib.Path(FLAGS.out) if FLAGS.out else pathlib.Path(FLAGS.workdir) / "export"
    try:
        record = export(FLAGS.workdir, out, stage=FLAGS.stage, which=FLAGS.which)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"experiments.export: {e}")
    accuracy = (f", clean {100 * record['clean_acc']:.2f} %, robust "
                f"{100 * record['robust_acc']:.2f} %" if "clean_acc" in record else "")
    print(f"{out / MODEL_FILE}: {record['model_key']} ({record['stage']} {record['checkpoint']} "
          f"step {record['step']}, sparsity {100 * record['sparsity']:.2f} %{accuracy})")
    if not record["benchmark_compatible"]:
        print(f"note: width {record['width']}, {record['num_classes']} classes: the benchmark's "
              f"base models have width {BENCHMARK_WIDTH} and {BENCHMARK_CLASSES} classes.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
