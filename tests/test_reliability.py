"""Runs that cannot lose or mislabel work: damaged checkpoints, changed configs, two processes on
one run directory, kills at every stage boundary, bad counts, non-finite updates and kernels."""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import stall

from experiments import checkpoints, evaluate, train
from experiments import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name="hydra", variant="smoke", **changes):
    config = importlib.import_module(f"experiments.configs.{name}").get_config(variant)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _dense_only(**changes):
    """The smoke config's dense stage alone, three epochs (so two checkpoints are kept)."""
    return _config(**{"stages": ("dense",), "eval.final": False, "dense.epochs": 3, **changes})


def _final_leaves(workdir, stage="dense"):
    import orbax.checkpoint as ocp

    final = pathlib.Path(workdir) / stage / "final"
    step = max(int(p.name) for p in final.iterdir() if p.name.isdigit())
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(final / str(step) / "default"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted dense stage."""
    workdir = tmp_path_factory.mktemp("reference")
    evaluate.train_and_evaluate(_dense_only(), workdir)
    return workdir


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(path):
    raw = bytearray(path.read_bytes())
    for i in range(8):
        raw[len(raw) // 2 + 13 * i] ^= 0xFF
    path.write_bytes(bytes(raw))  # the same size: only the digests can tell


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _flip_bytes], ids=["truncated", "bit_flipped"])
def test_damaged_checkpoint_is_moved_aside_and_the_run_finishes(reference, tmp_path, damage,
                                                                caplog):
    evaluate.train_and_evaluate(_dense_only(), tmp_path)
    ckpts = tmp_path / "dense" / "checkpoints"
    latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    # As after a kill between the last epoch's checkpoint and the stage's final state.
    import shutil

    shutil.rmtree(tmp_path / "dense" / "final")
    data = max((f for f in (ckpts / str(latest)).rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
    damage(data)
    for attempt in range(2):  # the rerun finishes, and so does the one after it
        with caplog.at_level("WARNING"):
            evaluate.train_and_evaluate(_dense_only(), tmp_path)
        if attempt == 0:
            assert f"{latest} is unreadable" in caplog.text and "moved aside" in caplog.text
    aside = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(f"{latest}.corrupt-"))
    # The damaged checkpoint's folder and its digests, moved aside once (the second rerun
    # found nothing to move).
    assert len(aside) == 2 and aside[1] == aside[0] + ".sha256.json", aside
    assert (ckpts / aside[0]).is_dir()
    got, want = _final_leaves(tmp_path), _final_leaves(reference)
    assert len(got) == len(want) and all(np.array_equal(a, b)
                                         for a, b in zip(got, want, strict=True))


def test_bit_flip_is_caught_by_the_digests(tmp_path):
    import optax

    import tscnc_jax as tj

    model = tj.create_model("mlp", features=(4,), num_classes=2)
    state = tj.create_train_state(model, optax.sgd(0.1), jax.random.key(0), (3,))
    mgr = checkpoints.manager(tmp_path, max_to_keep=2)
    checkpoints.save(mgr, 1, state)
    checkpoints.save(mgr, 2, state._replace(step=state.step + 1))
    data = max((f for f in (tmp_path / "2").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
    _flip_bytes(data)
    restored = checkpoints.restore_latest(checkpoints.manager(tmp_path), state)
    assert int(restored.step) == 0  # checkpoint 1, not the silently damaged 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("2.corrupt-")]


@pytest.mark.slow
def test_resume_with_changed_training_keys_is_refused(tmp_path):
    evaluate.train_and_evaluate(_dense_only(**{"dense.epochs": 1}), tmp_path)
    changed = _dense_only(**{"dense.epochs": 1, "prune.sparsity": 0.5, "dense.cnc_weight": 0.1})
    with pytest.raises(workdir_lib.ConfigMismatchError) as info:
        evaluate.train_and_evaluate(changed, tmp_path)
    message = str(info.value)
    assert "prune.sparsity: started with 0.99, now 0.5" in message
    assert "dense.cnc_weight: started with 0.0, now 0.1" in message
    assert "dense.epochs" not in message.split("Keys that may change")[0]
    # Evaluation-only keys and the stage selection may change.
    resumed = _dense_only(**{"dense.epochs": 1, "progress": False, "eval.num_test": 7})
    evaluate.train_and_evaluate(resumed, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["prune"]["sparsity"] == 0.99


def test_training_differences_names_only_training_keys():
    a = _config().to_dict()
    b = _config(**{"eval.num_test": 3, "stages": ("prune",), "seed": 4}).to_dict()
    assert workdir_lib.training_differences(a, b) == {"seed": (0, 4)}
    assert workdir_lib.training_differences(a, a) == {}


def test_second_process_on_a_workdir_refuses_at_once(tmp_path, monkeypatch):
    started = []  # the pipeline must not start: no validation, no data, no training
    monkeypatch.setattr(evaluate.train, "validate", lambda config: started.append("validate"))
    monkeypatch.setattr(evaluate.train, "train", lambda config, wd: started.append("train"))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import pathlib, sys, time
            from experiments import workdir
            with workdir.exclusive(pathlib.Path({str(tmp_path)!r})):
                print("locked", flush=True)
                time.sleep(120)
            """)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirInUseError,
                           match=rf"in use by pid {holder.pid} on host "):
            evaluate.train_and_evaluate(_dense_only(), tmp_path)
        assert started == []  # refused before anything of the run started
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.exclusive(tmp_path):  # a killed holder's lock is gone with it
        pass


#: Where a pipeline process kills itself (SIGKILL) in the boundary test: after a stage's final
#: state is saved (before the next stage starts), and inside the final evaluation.
_KILL_POINTS = ["dense", "prune", "finetune", "evaluation"]

_KILLER = """
import os, signal, sys
import tscnc_jax as tj
from experiments import evaluate, train
from experiments.configs import hydra
point = sys.argv[2]
if point == "evaluation":  # in the final evaluation: the second robustness evaluation
    real, calls = tj.evaluate_robustness, []
    def evaluate_robustness(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    tj.evaluate_robustness = evaluate_robustness
else:  # right after the stage's final state is saved
    real = train._save_final
    def save_final(workdir, stage, state):
        real(workdir, stage, state)
        if stage == point:
            os.kill(os.getpid(), signal.SIGKILL)
    train._save_final = save_final
evaluate.train_and_evaluate(hydra.get_config("smoke"), sys.argv[1])
"""


@pytest.mark.slow
def test_kill_at_every_stage_boundary_and_in_the_evaluation_then_rerun(tmp_path):
    # The kills fall between compilations, so the suite's compilation cache stays whole.
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(workdir, point):
        return stall.run([sys.executable, "-c", _KILLER, str(workdir), point], cwd=ROOT,
                         env=env)

    reference = run(tmp_path / "ref", "none")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = tmp_path / "killed"
    for point in _KILL_POINTS:
        proc = run(killed, point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
        assert not (killed / "summary.json").exists()
    proc = run(killed, "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    got = json.loads((killed / "summary.json").read_text())
    assert set(got) == set(ref)
    for key in ref:
        if "seconds" not in key:
            assert got[key] == ref[key], key
    # Every training step and validation is logged once, however many times the run resumed.
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["stage"], r["step"], "val_robust_acc" in r) for r in records]
    assert len(keys) == len(set(keys))
    ref_records = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == len(ref_records)


@pytest.mark.slow
def test_metrics_hold_each_step_once_after_a_kill_mid_stage(tmp_path):
    config_arg = str(ROOT / "experiments" / "configs" / "hydra.py") + ":smoke"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_ENABLE_COMPILATION_CACHE="false")
    cmd = [sys.executable, "-m", "experiments.main", f"--config={config_arg}",
           f"--workdir={tmp_path}", "--config.dense.epochs=3", "--config.log_every=1",
           "--config.stages=dense", "--config.eval.final=False"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "dense" / "checkpoints"

    def saved():
        lines = (tmp_path / "metrics.jsonl").read_text().count("\n") if (
            tmp_path / "metrics.jsonl").exists() else 0
        return ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()) and lines > 2

    assert stall.poll_until(proc, saved) and proc.poll() is None, (
        "the run finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert stall.run(cmd, cwd=ROOT, env=env).returncode == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == sorted(set(train_steps)) == list(range(1, train_steps[-1] + 1))
    assert len([r for r in records if "val_robust_acc" in r]) == 3
    from tests.test_pipeline import _tensorboard_scalars

    loss = _tensorboard_scalars(tmp_path / "tensorboard")["dense/train/loss"]
    assert [s for s, _ in loss] == train_steps  # TensorBoard purged the replayed steps too


@pytest.mark.parametrize("key,value,message", [
    ("dense.epochs", -1, r"config.dense.epochs must be an integer >= 1, got -1"),
    ("dense.epochs", 0, r"config.dense.epochs must be an integer >= 1, got 0"),
    ("finetune.epochs", 0, r"config.finetune.epochs must be an integer >= 1"),
    ("prune.epochs", 0, r"config.prune.epochs must be an integer >= 1"),
    ("eval.num_test", 0, r"config.eval.num_test must be an integer >= 1, got 0"),
    ("eval.num_val", 0, r"config.eval.num_val must be an integer >= 1"),
    ("attack_steps", 0, r"config.attack_steps must be an integer >= 1"),
    ("log_every", 0, r"config.log_every must be an integer >= 1"),
])
def test_bad_counts_are_refused_before_any_data_loads(tmp_path, monkeypatch, key, value,
                                                      message):
    def no_data(config):
        raise AssertionError("data loaded before the config was validated")

    monkeypatch.setattr(train.data_lib, "load_for_config", no_data)
    with pytest.raises(ValueError, match=message):
        evaluate.train_and_evaluate(_config(**{key: value}), tmp_path)
    assert not (tmp_path / "config.json").exists()  # a refused config is not recorded


def test_all_stages_zero_epochs_is_refused():
    config = _config(**{"dense.epochs": 0, "prune.epochs": 0, "finetune.epochs": 0})
    with pytest.raises(ValueError, match="dense.epochs"):
        train.validate(config)
    # A stage that does not run may have 0 epochs.
    train.validate(_config(**{"stages": ("dense",), "finetune.epochs": 0}))


@pytest.mark.slow
def test_nan_guard_names_the_step_whose_update_overflowed(tmp_path):
    config = _dense_only(**{"dense.learning_rate": float("inf")})
    with pytest.raises(train.NonFiniteError,
                       match=r"dense: non-finite values at step 0 .*updated parameters"):
        evaluate.train_and_evaluate(config, tmp_path)


def test_spectral_reports_name_a_non_finite_kernel():
    import tscnc_jax as tj

    params = {"Dense_0": {"kernel": np.ones((3, 2), np.float32)},
              "Dense_1": {"kernel": np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)}}
    for report in (tj.tree_condition_numbers, tj.tree_live_condition_numbers):
        with pytest.raises(ValueError, match=r"kernel 'Dense_1/kernel' has 1 NaN and 1 infinite"):
            report(params)
