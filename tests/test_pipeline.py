"""The experiment pipeline: smoke configs end to end, resume after SIGKILL, checkpoint fallback,
NaN stop, config validation."""

import importlib
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base"))


def _config(name, variant="smoke"):
    return importlib.import_module(f"experiments.configs.{name}").get_config(variant)


def _main(config_arg, workdir, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.main", f"--config={config_arg}",
         f"--workdir={workdir}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_config_runs_end_to_end(name, tmp_path):
    config = _config(name)
    summary = train.train_and_evaluate(config, tmp_path)
    assert 0.0 <= summary["ensemble_acc"] <= summary["clean_acc"] <= 1.0
    if "prune" in config.stages:
        assert summary["sparsity"] >= config.prune.sparsity - 1e-9 * 0 - 0.01
    assert (tmp_path / "results.md").read_text().count("|") > 10
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["stage"] in train.STAGES for line in lines)
    assert summary["lipschitz_upper_bound"] > 0 and summary["median_log10_kappa"] >= 0


def _final_params(workdir, template):
    mgr = checkpoints.manager(pathlib.Path(workdir) / "finetune" / "final")
    return checkpoints.restore_latest(mgr, template).params


@pytest.mark.slow
def test_sigkill_and_rerun_gives_identical_params(tmp_path):
    config_arg = str(ROOT / "experiments" / "configs" / "fmnist_hydra_tscnc.py") + ":smoke"
    extra = ("--config.dense.epochs=3",)
    reference = _main(config_arg, tmp_path / "ref", *extra)
    assert reference.wait(timeout=900) == 0, reference.stderr.read()[-3000:]

    proc = _main(config_arg, tmp_path / "killed", *extra)
    ckpt_dir = tmp_path / "killed" / "dense" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = _main(config_arg, tmp_path / "killed", *extra)
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-3000:]

    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    got = json.loads((tmp_path / "killed" / "summary.json").read_text())
    for key in ("clean_acc", "ensemble_acc", "sparsity", "median_log10_kappa"):
        assert ref[key] == got[key], key
    # Bit-identical final parameters.
    a = jax.tree.leaves(_checkpoint_tree(tmp_path / "ref"))
    b = jax.tree.leaves(_checkpoint_tree(tmp_path / "killed"))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _checkpoint_tree(workdir):
    import orbax.checkpoint as ocp

    final = pathlib.Path(workdir) / "finetune" / "final"
    step = max(int(p.name) for p in final.iterdir() if p.name.isdigit())
    restored = ocp.StandardCheckpointer().restore(final / str(step) / "default")
    return restored["params"]


def test_unknown_config_key_is_rejected(tmp_path):
    config_arg = str(ROOT / "experiments" / "configs" / "fmnist_hydra.py") + ":smoke"
    proc = _main(config_arg, tmp_path, "--config.dense.lerning_rate=0.1")
    assert proc.wait(timeout=120) != 0
    assert "lerning_rate" in proc.stderr.read()
    config = _config("fmnist_hydra")
    with pytest.raises(AttributeError, match="lerning_rate"):
        config.dense.lerning_rate = 0.1
    config.stages = ("dense", "distill")
    with pytest.raises(ValueError, match="distill"):
        train.train_and_evaluate(config, tmp_path)


@pytest.mark.slow
def test_nan_stops_with_step_and_term(tmp_path):
    config = _config("fmnist_hydra")
    config.dense.learning_rate = 1e30
    with pytest.raises(train.NonFiniteError, match=r"dense: non-finite values at step \d+"):
        train.train_and_evaluate(config, tmp_path)


def _tiny_state(value):
    import optax

    import tscnc_jax as tj

    model = tj.create_model("mlp", features=(4,), num_classes=2)
    state = tj.create_train_state(model, optax.sgd(0.1), jax.random.key(0), (3,))
    return state._replace(params=jax.tree.map(lambda p: jnp.full_like(p, value), state.params))


def test_corrupted_latest_checkpoint_falls_back_loudly(tmp_path, caplog):
    mgr = checkpoints.manager(tmp_path, max_to_keep=3)
    checkpoints.save(mgr, 1, _tiny_state(1.0))
    checkpoints.save(mgr, 2, _tiny_state(2.0))
    # Corrupt every data file of the newest checkpoint.
    for f in (tmp_path / "2").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    template = _tiny_state(0.0)
    with caplog.at_level(logging.WARNING):
        restored = checkpoints.restore_latest(checkpoints.manager(tmp_path), template)
    assert "unreadable" in caplog.text
    assert float(jax.tree.leaves(restored.params)[0].ravel()[0]) == 1.0
    for f in (tmp_path / "1").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    with pytest.raises(checkpoints.CheckpointError, match="could be restored"):
        checkpoints.restore_latest(checkpoints.manager(tmp_path), template)
