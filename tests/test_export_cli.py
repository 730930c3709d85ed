"""``python -m experiments.export``: a finished run's model as the PyTorch ``state_dict`` of the
Adversarial Pruning Benchmark's base ResNet-18 / VGG-16-BN (``experiments/export.py``).

Each architecture is trained once, dense + prune on synthetic 32x32x3 data at width 4 (the
benchmark's models have width 64; the layout does not depend on it): the VGG-16-BN by HYDRA with
the final evaluation (its ``summary.json`` gives the accuracies), exported by the command line;
the ResNet-18 by layer-wise magnitude pruning (no prune checkpoint) without the final evaluation
(the export reads ``config.json``), exported in-process.
"""

import collections
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import stall

import tscnc_jax as tj
from experiments import evaluate, train
from experiments import export as export_cli
from experiments import workdir as workdir_lib
from experiments.configs import hydra, lwm
from tscnc_jax import export

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("resnet18", "vgg16_bn")
WIDTH = 4
SPARSITY = 0.9

METHODS = {"resnet18": lwm, "vgg16_bn": hydra}  # the config modules, by architecture

Run = collections.namedtuple("Run", "arch config workdir trained summary out record")


def smoke_config(arch: str, *, final: bool) -> ml_collections.ConfigDict:
    """The CIFAR-10 smoke variant (synthetic 32x32x3) of the arch's method (:data:`METHODS`)
    on ``arch``, cut to seconds: dense and prune stages (one step where a stage trains), clean loss,
    PGD-1 validation, 16 test images."""
    config = METHODS[arch].get_config("cifar10,smoke")
    config.model.name = arch
    config.model.kwargs = ml_collections.ConfigDict({"width": WIDTH})
    config.stages = ("dense", "prune")
    config.loss = "clean"
    config.prune.sparsity = SPARSITY
    config.data.synthetic_train = 64
    config.data.num_val = config.eval.num_val = 32  # 32 training images: one batch
    config.eval.pgd_steps = 1
    config.eval.num_test = 16
    config.eval.num_lipschitz = 0
    config.eval.final = final
    return config


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return stall.run([sys.executable, "-m", "experiments.export", *args], cwd=ROOT, env=env)


def _train(arch: str, workdir: pathlib.Path) -> Run:
    config = smoke_config(arch, final=arch == "vgg16_bn")
    real_train, trained = train.train, []

    def keep(*args, **kwargs):  # the Trained the pipeline evaluates, to compare with
        trained.append(real_train(*args, **kwargs))
        return trained[-1]

    with mock.patch.object(train, "train", keep):
        evaluate.train_and_evaluate(config, workdir)
    summary = None
    if config.eval.final:
        summary = json.loads((workdir / "summary.json").read_text())
        proc = _cli(f"--workdir={workdir}")  # the default --out: <workdir>/export
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "hydra_V16_synthetic_US_90" in proc.stdout
    else:
        assert not (workdir / "summary.json").exists()
        export_cli.export(workdir)
    out = workdir / "export"
    record = json.loads((out / "model_key.json").read_text())
    return Run(arch, config, workdir, trained[-1], summary, out, record)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``smoke_run(arch)``: the architecture's trained and exported run (trained once)."""
    runs = {}

    def get(arch):
        if arch not in runs:
            runs[arch] = _train(arch, tmp_path_factory.mktemp(arch))
        return runs[arch]

    return get


def _mask_state_dict(run: Run) -> dict[str, np.ndarray]:
    """The run's masks in the PyTorch layout (1 for the leaves that are not pruned)."""
    params = run.trained.state.params
    filled = jax.tree.map(lambda p, m: jnp.ones_like(p) if m is None else m.astype(p.dtype),
                          params, run.trained.masks, is_leaf=lambda x: x is None)
    masks = export.to_torch_state_dict(
        {"params": filled, "batch_stats": run.trained.state.batch_stats}, run.arch)
    return {k: v for k, v in masks.items() if k.endswith(".weight") and v.ndim >= 2}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_export_is_the_evaluated_masked_model(arch, smoke_run):
    run = smoke_run(arch)
    loaded = export.load_safetensors(run.out / "model.safetensors")
    assert sorted(p.name for p in run.out.iterdir()) == ["model.safetensors", "model_key.json"]

    # The layout of a freshly initialised model of the same architecture.
    model = tj.create_model(arch, width=WIDTH, num_classes=10)
    fresh = export.to_torch_state_dict(
        jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3))), arch)
    assert sorted(loaded) == sorted(fresh)  # a safetensors file keeps no order
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in fresh.items()}
    assert all(loaded[k].dtype == fresh[k].dtype for k in fresh)

    # Exactly the model the final evaluation evaluates (EMA if kept), the masks folded in.
    state = run.trained.state
    evaluated = export.to_torch_state_dict(
        {"params": train.evaluated_params(run.config, state), "batch_stats": state.batch_stats},
        arch, masks=run.trained.masks)
    for key, value in evaluated.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)

    masks = _mask_state_dict(run)
    assert masks and set(masks) == {k for k, v in loaded.items()
                                    if k.endswith(".weight") and v.ndim >= 2}
    for key, mask in masks.items():
        assert np.all(loaded[key][mask == 0] == 0), key
    pruned = sum(int(np.sum(m == 0)) for m in masks.values())
    total = sum(m.size for m in masks.values())
    zeros = sum(int(np.sum(loaded[k] == 0)) for k in masks)
    assert zeros == pruned  # no weight is zero but the masked ones
    assert run.record["sparsity"] == pytest.approx(pruned / total, abs=1e-12)
    assert SPARSITY <= run.record["sparsity"] < SPARSITY + 0.01  # layer-wise top-k rounds up

    # The benchmark's model key, in model_key.json and in the file's metadata.
    record = run.record
    name, short = {"resnet18": ("ResNet18", "R18"), "vgg16_bn": ("VGG16BN", "V16")}[arch]
    method = run.config.name  # hydra | lwm
    assert record["model_key"] == f"{method}_{short}_synthetic_US_90"
    assert (record["method"], record["architecture"], record["dataset"],
            record["structure"]) == (method, name, "synthetic", "unstructured")
    assert record["sparsity_configured"] == SPARSITY
    assert (record["width"], record["num_classes"]) == (WIDTH, 10)
    assert not record["benchmark_compatible"]  # width 4, not 64
    assert (record["stage"], record["checkpoint"], record["step"]) == ("prune", "final",
                                                                       int(state.step))
    from safetensors import safe_open

    with safe_open(str(run.out / "model.safetensors"), "np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["model_key"] == record["model_key"]
    assert metadata["architecture"] == name
    assert float(metadata["sparsity"]) == record["sparsity"]
    if run.summary is not None:  # the accuracies of the summary that evaluated this model
        assert record["clean_acc"] == run.summary["clean_acc"]
        assert record["robust_acc"] == run.summary["ensemble_acc"]
        assert record["pgd1_acc"] == run.summary["pgd1_acc"]
        assert record["sparsity"] == pytest.approx(run.summary["sparsity"], abs=1e-12)
        assert float(metadata["clean_acc"]) == record["clean_acc"]
    else:
        assert "clean_acc" not in record and "robust_acc" not in record


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_pytorch_model_loads_it_strictly_and_computes_the_same_logits(arch, smoke_run):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import test_export

    run = smoke_run(arch)
    # The benchmark's base model (the reference module of tests/test_export.py) at the run's width.
    twin = test_export._torch_reference_modules(torch, WIDTH)[arch]()
    result = twin.load_state_dict(safetensors_torch.load_file(str(run.out / "model.safetensors")),
                                  strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    twin.eval()
    x = np.random.default_rng(0).uniform(0.0, 1.0, (4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logits = twin(torch.from_numpy(x)).numpy()
    # The JAX model as the final evaluation runs it: inference mode, the run's BN statistics.
    logits_fn = evaluate.logits_function(run.config, run.trained.model, run.trained.state)
    expected = np.asarray(logits_fn(jnp.asarray(x.transpose(0, 2, 3, 1))))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=test_export.LOGITS_RTOL * scale)


@pytest.mark.slow
def test_stage_and_which_pick_the_checkpoint_and_files_are_replaced(smoke_run, tmp_path):
    run = smoke_run("vgg16_bn")
    dense = run.trained.dense  # the dense stage's final state, EMA kept (ema_decay=0.99)
    assert run.config.ema_decay is not None
    out = tmp_path / "dense"
    record = export_cli.export(run.workdir, out, stage="dense")
    loaded = export.load_safetensors(out / "model.safetensors")
    ema = export.to_torch_state_dict(
        {"params": dense.ema_params, "batch_stats": dense.batch_stats}, "vgg16_bn")
    raw = export.to_torch_state_dict(
        {"params": dense.params, "batch_stats": dense.batch_stats}, "vgg16_bn")
    assert all(np.array_equal(loaded[k], ema[k]) for k in ema)
    assert not all(np.array_equal(loaded[k], raw[k]) for k in raw)  # the EMA, not the weights
    assert (record["model_key"], record["structure"], record["sparsity_configured"],
            record["stage"]) == ("hydra_V16_synthetic_dense", "dense", None, "dense")
    assert record["sparsity"] == 0.0
    assert "clean_acc" not in record and "summary.json" in record["summary_note"]

    # The best-on-validation checkpoint of the prune stage (one epoch: the final state's step),
    # written over the files above: replaced whole, no temporary file left behind.
    record = export_cli.export(run.workdir, out, which="best")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_key.json"]
    assert json.loads((out / "model_key.json").read_text()) == record
    assert (record["stage"], record["checkpoint"]) == ("prune", "best")
    assert record["model_key"] == run.record["model_key"]
    assert record["clean_acc"] == run.summary["clean_acc"]  # the step the summary evaluated
    best = export.load_safetensors(out / "model.safetensors")
    final = export.load_safetensors(run.out / "model.safetensors")
    assert all(np.array_equal(best[k], final[k]) for k in final)


def test_bad_runs_fail_with_clear_errors(tmp_path):
    # A run of a model the benchmark has no PyTorch counterpart for (its recorded config is all
    # the export reads before failing).
    small = tmp_path / "small_cnn"
    workdir_lib.check_config(small, hydra.get_config("smoke").to_dict())
    with pytest.raises(ValueError, match=r"model 'small_cnn'.*resnet18 and vgg16_bn"):
        export_cli.export(small)
    proc = _cli(f"--workdir={small}")
    assert proc.returncode != 0
    assert "'small_cnn'" in proc.stderr and "resnet18 and vgg16_bn" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (small / "export").exists()

    # An unfinished run: the missing checkpoint is named.
    started = tmp_path / "started"
    workdir_lib.check_config(started, smoke_config("resnet18", final=False).to_dict())
    with pytest.raises(FileNotFoundError, match=r"no final checkpoint in .*started/dense/final"):
        export_cli.export(started)
    with pytest.raises(ValueError, match=r"--stage=finetune is not a stage of this run"):
        export_cli.export(started, stage="finetune")
    with pytest.raises(ValueError, match=r"--which='last'"):
        export_cli.export(started, which="last")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_cli.export(tmp_path / "nothing")
