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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stall

from experiments import checkpoints, evaluate, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base", "demo"))
# Every method on Fashion-MNIST shapes, and the CIFAR/SVHN presets (VGG-16-BN, gated WRN).
SMOKE_RUNS = [(m, "smoke") for m in METHODS] + [("hydra_tscnc", "cifar10,smoke"),
                                                 ("tscnc_authors", "svhn_cropped,smoke")]


def _config(name, variant="smoke"):
    return importlib.import_module(f"experiments.configs.{name}").get_config(variant)


def _main(config_arg, workdir, *extra, compilation_cache=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not compilation_cache:  # a process we SIGKILL must not leave torn cache entries behind
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.main", f"--config={config_arg}",
         f"--workdir={workdir}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_method_has_a_documented_config():
    assert set(METHODS) == {"dense_pgd_at", "dense_trades", "lwm", "hydra", "hydra_tsc",
                            "hydra_cnc", "hydra_tscnc", "tscnc_authors"}
    for name in METHODS:
        module = importlib.import_module(f"experiments.configs.{name}")
        doc = module.__doc__
        assert f"configs/{name}.py" in doc and "minutes" in doc and ":quick" in doc, name
        for dataset in ("fashion_mnist", "mnist", "cifar10", "svhn_cropped"):
            config = module.get_config(dataset)
            assert config.dataset == dataset and config.name == name
        full, quick = module.get_config(""), module.get_config("quick")
        assert quick.dataset == "fashion_mnist" and quick.model == full.model
        assert quick.data.num_train == 6400 and quick.eval.attacks == "fast"
        assert quick.dense.epochs < full.dense.epochs and quick.eval.num_test == 1000
        short = module.get_config("short")
        assert short.data.num_train == 0 and short.eval.num_test == full.eval.num_test
        assert short.eval.attacks == "fast" and short.eval.num_standard > 0
        assert short.dense.epochs < full.dense.epochs and short.model == full.model
    bad = _config("hydra", "")
    bad.eval.num_standard = 10  # with the standard ensemble already configured: meaningless
    with pytest.raises(ValueError, match="num_standard=10 needs config.eval.attacks='fast'"):
        train.validate(bad)
    with pytest.raises(ValueError, match="quick,smoke"):
        _config("hydra", "quick,smoke")
    with pytest.raises(ValueError, match="imagenet"):
        _config("hydra", "imagenet")
    cifar = _config("hydra", "cifar10")
    assert cifar.model.name == "vgg" and cifar.augment and abs(cifar.eps - 8 / 255) < 1e-12
    authors = _config("tscnc_authors", "cifar10")
    assert authors.model.name == "wide_resnet" and authors.model.kwargs.gated
    assert authors.stages == ("dense", "prune") and authors.gated_tsc.form == "authors_code"


def test_penalty_sections_are_the_library_keyword_arguments():
    """config.cnc / tsc / gated_tsc bind, key for key, to the transformations they configure,
    and an old summary's single penalty section maps onto them."""
    import inspect

    import tscnc_jax as tj
    from experiments.configs import base
    from tscnc_jax import spectral_tracking, training

    for name in METHODS:
        c = importlib.import_module(f"experiments.configs.{name}").get_config("")
        # config.cnc.estimator picks the transformation; each binds the keys that are its own.
        cnc = {k: v for k, v in c.cnc.items() if k != "estimator"}
        inspect.signature(tj.add_condition_number_penalty).bind(
            1.0, **{k: v for k, v in cnc.items() if k not in training._TRACKED_ONLY})
        inspect.signature(spectral_tracking.add_tracked_condition_number_penalty).bind(
            1.0, **{k: v for k, v in cnc.items() if k not in training._EXACT_ONLY})
        shared = set(inspect.signature(tj.add_condition_number_penalty).parameters) & set(
            inspect.signature(spectral_tracking.add_tracked_condition_number_penalty).parameters)
        assert set(cnc) - set(training._TRACKED_ONLY) - set(training._EXACT_ONLY) == shared - {
            "weight", "filter_fn", "masks"}  # those three the pipeline passes itself
        assert c.cnc.estimator == "exact"
        inspect.signature(tj.add_transformed_sparsity_penalty).bind(1.0, **c.tsc)
        inspect.signature(tj.add_gated_sparsity_penalty).bind(1.0, **c.gated_tsc)
    old = {"name": "x", "penalty": {
        "temperature": 0.2, "delta": 1e-2, "cnc_form": "log_det", "cnc_layers": "classifier",
        "reduce": "sum", "a": 2.0, "tsc_eps": 1e-3, "normalize": True,
        "gated_form": "authors_code", "gated_a": 50.0, "gated_num_train": 10,
        "clamp_gates": True, "gated_weight_decay": 1e-4, "gated_lambda0": 1e-2}}
    new = base.from_summary(old)
    assert "penalty" not in new and new.name == "x"
    assert dict(new.cnc) == {"temperature": 0.2, "delta": 1e-2, "form": "log_det",
                             "reduce": "sum", "live": False, "eps": 1e-5}
    assert dict(new.tsc) == {"a": 2.0, "eps": 1e-3, "reduce": "mean"}
    assert dict(new.gated_tsc) == {"form": "authors_code", "a": 50.0, "num_train": 10,
                                   "weight_decay": 1e-4, "lambda0": 1e-2}
    assert new.cnc_layers == "classifier" and new.clamp_gates
    current = _config("hydra_tscnc", "").to_dict()
    assert base.from_summary(current).to_dict() == current  # today's layout is left alone


@pytest.mark.slow
@pytest.mark.parametrize("name,variant", SMOKE_RUNS)
def test_smoke_config_runs_end_to_end(name, variant, tmp_path):
    config = _config(name, variant)
    if variant != "smoke":
        # The CIFAR/SVHN presets' deep models compile slowly on a CPU: their dense stage and the
        # final evaluation run here; pruning and fine-tuning are the Fashion-MNIST runs' code.
        config.stages = ("dense",)
    if name == "hydra":  # the standard ensemble on a subset beside the fast one (study runs)
        config.eval.num_standard = 40
    summary = evaluate.train_and_evaluate(config, tmp_path)
    assert 0.0 <= summary["ensemble_acc"] <= summary["clean_acc"] <= 1.0
    if name == "hydra":
        assert summary["num_standard"] == 40
        assert set(summary["standard_per_attack"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
        per_attack = summary["standard_per_attack"]  # cumulative: the last is the ensemble
        assert 0.0 <= summary["standard_ensemble_acc"] <= min(per_attack.values())
        # The fast ensemble's accuracy on the same 40 images (a part of the 64): a multiple of
        # 1/40, and no more robust images than on all 64.
        frac = summary["fast_ensemble_acc_on_standard_subset"] * 40
        assert abs(frac - round(frac)) < 1e-9
        assert frac <= summary["ensemble_acc"] * summary["num_test"] + 1e-9
    else:
        assert "standard_ensemble_acc" not in summary
    if "prune" in config.stages:
        assert summary["sparsity"] >= config.prune.sparsity - 1e-9  # never below the target
    assert (tmp_path / "results.md").read_text().count("|") > 10
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["stage"] in train.STAGES for line in lines)
    assert summary["lipschitz_upper_bound"] > 0 and summary["median_log10_kappa"] >= 0
    assert summary["num_lipschitz"] == min(config.eval.num_lipschitz, summary["num_test"])
    assert 0 < summary["local_lipschitz_median"] < float("inf")
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    val = scalars[f"{config.stages[-1]}/val/robust_acc"]
    logged = [json.loads(line) for line in lines]
    expected = [(r["step"], r["val_robust_acc"]) for r in logged
                if r["stage"] == config.stages[-1] and "val_robust_acc" in r]
    assert [step for step, _ in val] == [step for step, _ in expected]
    np.testing.assert_allclose([v for _, v in val], [v for _, v in expected], rtol=1e-6)


def _tree_equal(a, b) -> bool:
    """Exact equality of two pytrees of arrays."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(bool(jnp.array_equal(x, y))
                                      for x, y in zip(la, lb, strict=True))


def _final_params(workdir, template):
    mgr = checkpoints.manager(pathlib.Path(workdir) / "finetune" / "final")
    return checkpoints.restore_latest(mgr, template).params


@pytest.mark.slow
def test_sigkill_and_rerun_gives_identical_params(tmp_path):
    config_arg = str(ROOT / "experiments" / "configs" / "hydra_tscnc.py") + ":smoke"
    extra = ("--config.dense.epochs=3",)
    reference = _main(config_arg, tmp_path / "ref", *extra)
    _, err = stall.communicate(reference)
    assert reference.returncode == 0, err[-3000:]

    proc = _main(config_arg, tmp_path / "killed", *extra, compilation_cache=False)
    ckpt_dir = tmp_path / "killed" / "dense" / "checkpoints"
    saved = stall.poll_until(proc, lambda: ckpt_dir.exists() and any(
        p.name.isdigit() for p in ckpt_dir.iterdir()), interval=0.2)
    assert saved and proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = _main(config_arg, tmp_path / "killed", *extra)
    _, err = stall.communicate(resumed)
    assert resumed.returncode == 0, err[-3000:]

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
    config_arg = str(ROOT / "experiments" / "configs" / "hydra.py") + ":smoke"
    proc = _main(config_arg, tmp_path, "--config.dense.lerning_rate=0.1")
    _, err = stall.communicate(proc)
    assert proc.returncode != 0
    assert "lerning_rate" in err
    config = _config("hydra")
    with pytest.raises(AttributeError, match="lerning_rate"):
        config.dense.lerning_rate = 0.1
    config.stages = ("dense", "distill")
    with pytest.raises(ValueError, match="distill"):
        evaluate.train_and_evaluate(config, tmp_path)
    config.stages = ("dense", "finetune")
    with pytest.raises(ValueError, match="consecutive"):
        evaluate.train_and_evaluate(config, tmp_path)
    config.stages = ("prune", "finetune")  # the dense stage has not run in tmp_path
    with pytest.raises(FileNotFoundError, match="--config.stages=dense"):
        evaluate.train_and_evaluate(config, tmp_path)
    # An init_dir next to a dense stage would silently train a new dense model instead.
    config.stages = ("dense", "prune", "finetune")
    config.init_dir = str(tmp_path / "dense_run")
    with pytest.raises(ValueError, match=r"init_dir=.*dense_run.* would be ignored"):
        evaluate.train_and_evaluate(config, tmp_path)


def test_stages_from_the_command_line_split_on_commas(tmp_path):
    assert train.split_stages(("prune,finetune",)) == ("prune", "finetune")
    assert train.split_stages(("dense", " prune , finetune")) == ("dense", "prune", "finetune")
    assert train.split_stages("prune") == ("prune",)
    config_arg = str(ROOT / "experiments" / "configs" / "hydra.py") + ":smoke"
    proc = _main(config_arg, tmp_path / "run", "--config.stages=prune,finetune",
                 f"--config.init_dir={tmp_path / 'no_dense'}")
    _, err = stall.communicate(proc)
    assert proc.returncode != 0
    # Two stages reached the pipeline (not one called 'prune,finetune'), which then looked for
    # the dense stage in init_dir.
    assert "no finished dense stage" in err and "no_dense" in err, err[-2000:]


@pytest.mark.slow
def test_nan_stops_with_step_and_term(tmp_path):
    config = _config("hydra")
    config.dense.learning_rate = 1e30
    with pytest.raises(train.NonFiniteError,
                       match=r"dense: non-finite values at step \d+ .*\bloss = \{.*'loss': nan"):
        evaluate.train_and_evaluate(config, tmp_path)


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


def test_a_stage_saved_under_another_optimizer_loads_without_its_optimizer_state(tmp_path):
    import optax

    import tscnc_jax as tj

    model = tj.create_model("mlp", features=(4,), num_classes=2)
    saved = tj.create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0), (3,))
    saved = saved._replace(step=jnp.asarray(7, saved.step.dtype),
                           params=jax.tree.map(lambda p: p + 1.5, saved.params),
                           ema_params=jax.tree.map(lambda p: p - 0.5, saved.params))
    checkpoints.save(checkpoints.manager(tmp_path), 7, saved)
    # This run's optimizer is another chain (as a penalised method's is): another opt_state.
    template = tj.create_train_state(model, optax.adam(1e-3), jax.random.key(1), (3,))
    with pytest.raises(checkpoints.CheckpointError, match="opt_state"):
        checkpoints.restore_latest(checkpoints.manager(tmp_path), template)
    # An intact checkpoint that does not fit this run is not damage: it stays where it is.
    assert list(checkpoints.manager(tmp_path).all_steps()) == [7]
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    got = checkpoints.restore_latest(checkpoints.manager(tmp_path), template, optimizer=False)
    assert _tree_equal(got.params, saved.params)
    assert _tree_equal(got.ema_params, saved.ema_params)
    assert int(got.step) == 7
    assert _tree_equal(jax.random.key_data(got.rng), jax.random.key_data(saved.rng))
    assert _tree_equal(got.opt_state, template.opt_state)
    # Another model's weights are refused, naming the parameter.
    wider = tj.create_train_state(tj.create_model("mlp", features=(5,), num_classes=2),
                                  optax.adam(1e-3), jax.random.key(1), (3,))
    with pytest.raises(ValueError, match=r"/7: saved \['ema_params'\]\['Dense_0'\]\['bias'\] is "
                                         r"float32\[4\], this run's is float32\[5\] \(another"):
        checkpoints.restore_latest(checkpoints.manager(tmp_path), wider, optimizer=False)


@pytest.mark.slow
def test_one_method_prunes_another_methods_dense_model(tmp_path):
    """HYDRA's pruning of HYDRA + TSCNC's penalised dense model: the dense optimizers differ
    (the penalties are transformations in the chain), the weights carry over exactly."""
    import tscnc_jax as tj

    penalised = _config("hydra_tscnc")
    penalised.stages, penalised.eval.final = ("dense",), False
    evaluate.train_and_evaluate(penalised, tmp_path / "tscnc")
    dense = train.train(penalised, tmp_path / "tscnc").state
    config = _config("hydra")
    config.stages, config.init_dir = ("prune",), str(tmp_path / "tscnc")
    pruned = train.train(config, tmp_path / "hydra")
    assert _tree_equal(pruned.dense.params, dense.params)  # the state it was pruned from
    expected = tj.apply_masks(train.evaluated_params(config, dense), pruned.masks)
    assert _tree_equal(pruned.state.params, expected)
    assert tj.summarize_sparsity(pruned.masks).sparsity >= config.prune.sparsity - 1e-9


@pytest.mark.slow
def test_demo_stage_by_stage_equals_one_command(tmp_path):
    from experiments import demo

    table = demo.run(tmp_path / "demo", smoke=True)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        "demo_dense", "demo_hydra", "demo_hydra_tscnc"]
    for name in ("results.md", "kappa_vs_layer.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    # The hydra branch (stages prune + finetune from the dense run's checkpoint) equals the same
    # pipeline run as one command in one workdir.
    config = _config("demo", "hydra,smoke")
    config.stages = ("dense", "prune", "finetune")
    config.plots = True
    summary = evaluate.train_and_evaluate(config, tmp_path / "one")
    a = jax.tree.leaves(_checkpoint_tree(tmp_path / "demo" / "hydra"))
    b = jax.tree.leaves(_checkpoint_tree(tmp_path / "one"))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    branch = json.loads((tmp_path / "demo" / "hydra" / "summary.json").read_text())
    assert branch["clean_acc"] == summary["clean_acc"]
    assert set(summary["dense_kappa"]) == set(summary["kappa"])
    for name in ("accuracy.png", "kappa_layers.png"):
        assert (tmp_path / "one" / name).stat().st_size > 0
    # The TSCNC branch fine-tunes the HYDRA run's pruned network (stages: finetune; init_dir: the
    # HYDRA run, whose dense stage is found through that run's own init_dir): the same as
    # pruning the dense run's network in the branch itself.
    config = _config("demo", "hydra_tscnc,smoke")
    assert tuple(config.stages) == ("finetune",)
    config.stages, config.init_dir = ("prune", "finetune"), str(tmp_path / "demo" / "dense")
    own = evaluate.train_and_evaluate(config, tmp_path / "own")
    a = jax.tree.leaves(_checkpoint_tree(tmp_path / "demo" / "hydra_tscnc"))
    b = jax.tree.leaves(_checkpoint_tree(tmp_path / "own"))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    branch = json.loads((tmp_path / "demo" / "hydra_tscnc" / "summary.json").read_text())
    assert branch["clean_acc"] == own["clean_acc"] and branch["dense_kappa"] == own["dense_kappa"]


@pytest.mark.slow
def test_best_checkpoint_is_handed_on(tmp_path):
    config = _config("dense_trades")
    config.dense.epochs = 3
    config.eval.checkpoint = "best"
    summary = evaluate.train_and_evaluate(config, tmp_path)
    best = json.loads((tmp_path / "dense" / "best_val.json").read_text())
    assert summary["evaluated_step"] == best["step"]
    vals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "val_robust_acc" in r]
    assert len(vals) == 3
    assert best["robust_acc"] == max(r["val_robust_acc"] for r in vals)
    first_best = next(r["step"] for r in vals if r["val_robust_acc"] == best["robust_acc"])
    assert best["step"] == first_best


@pytest.mark.slow
def test_sweep_keeps_each_summary_and_skips_finished_runs(tmp_path):
    def sweep(*args):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return stall.run(
            [sys.executable, "-m", "experiments.sweep", f"--workdir={tmp_path / 'runs'}",
             f"--summaries={tmp_path / 'kept'}", "--variant=smoke", "--set=seed=3", *args],
            cwd=ROOT, env=env)

    bad = sweep("hydra", "typo=hydar")
    assert bad.returncode != 0 and "'hydar'" in bad.stderr and "typo" in bad.stderr
    assert not (tmp_path / "runs").exists()  # rejected before anything ran
    first = sweep("pgd=dense_pgd_at")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = json.loads((tmp_path / "kept" / "pgd" / "summary.json").read_text())
    assert kept["config"]["seed"] == 3 and kept["config"]["loss"] == "pgd_at"
    assert "| pgd | 0.00 % |" in (tmp_path / "kept" / "results.md").read_text()
    # A skipped run leaves its kept copy alone, and the kept table lists every kept summary,
    # not only this invocation's selection.
    kept_path = tmp_path / "kept" / "pgd" / "summary.json"
    kept_path.write_text(json.dumps({**kept, "wall_seconds": 12345.0}))
    other = tmp_path / "kept" / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({**kept, "sparsity": 0.5}))
    again = sweep("pgd=dense_pgd_at")
    assert again.returncode == 0 and "pgd: finished earlier, skipped" in again.stdout
    assert json.loads(kept_path.read_text())["wall_seconds"] == 12345.0
    table = (tmp_path / "kept" / "results.md").read_text()
    assert "| other | 50.00 % |" in table and "| pgd | 0.00 % |" in table


def _tensorboard_scalars(logdir):
    """``{tag: [(step, value), ...]}`` as TensorBoard itself reads the event files (one run
    directory per stage)."""
    from tensorboard.backend.event_processing import event_accumulator

    out = {}
    for run in sorted(pathlib.Path(logdir).iterdir()):
        acc = event_accumulator.EventAccumulator(str(run))
        acc.Reload()
        out.update({tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                    for tag in acc.Tags()["scalars"]})
    return out




@pytest.mark.slow
def test_bfloat16_compute_and_tracked_cnc_smoke_run(tmp_path):
    config = _config("hydra_tscnc")
    config.model.dtype = "bfloat16"
    config.cnc.estimator = "tracked"
    summary = evaluate.train_and_evaluate(config, tmp_path)
    for key in ("clean_acc", "ensemble_acc", "median_log10_kappa", "lipschitz_upper_bound"):
        assert np.isfinite(summary[key]), key
    final = checkpoints.manager(tmp_path / "finetune" / "final")
    saved = checkpoints.restore_as_saved(final, final.latest_step())
    assert {leaf.dtype for leaf in jax.tree.leaves(saved["params"])} == {np.dtype("float32")}
    # The tracked estimator's state (its singular vectors) is in the optimizer state.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("cnc" in r and np.isfinite(r["cnc"]) for r in records)


@pytest.mark.parametrize("key, value", [("model.dtype", "float16"), ("model.conv_impl", "gpu"),
                                        ("cnc.estimator", "power")])
def test_new_config_keys_reject_bad_values_by_name(key, value):
    config = _config("hydra")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=rf"config\.{key} must be one of .*{value!r}"):
        train.validate(config)


def test_distributed_flags_are_checked_by_name():
    from absl import app

    from experiments import main

    assert main.distributed_arguments(False, None, None, None) is None
    assert main.distributed_arguments(True, None, None, None) == {}  # the cluster is detected
    assert main.distributed_arguments(False, "h:1234", 2, 1) == {
        "coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
    for args, pattern in [((False, "h:1234", 2, None), "--process_id missing"),
                          ((True, None, 2, None), "--coordinator_address, --process_id missing"),
                          ((False, "h", 2, 0), "must be host:port"),
                          ((False, "h:99999", 2, 0), "must be host:port"),
                          ((False, "h:1", 0, 0), "--num_processes=0 must be >= 1"),
                          ((False, "h:1", 2, 2), r"--process_id=2 must be in \[0, 2\)")]:
        with pytest.raises(app.UsageError, match=pattern):
            main.distributed_arguments(*args)
