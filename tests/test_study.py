"""The reproduction study's plan: complete, ordered for resumption, and runnable end to end."""

import json
import os
import pathlib
import sys

import pytest
import stall

from experiments import study

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_plan_covers_the_study_and_orders_dense_runs_first():
    runs = study.plan()
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    position = {n: i for i, n in enumerate(names)}
    for r in runs:  # every reused dense stage is produced earlier in the same sweep
        if r.dense_from is not None:
            assert position[r.dense_from] < position[r.name], r.name
    methods = study.METHODS
    for m in methods:
        for sp in ("90", "95", "99", "99_5"):
            assert f"{m}_{sp}_s0" in position
        for seed in (1, 2):  # several seeds for the 99 % row
            assert f"{m}_99_s{seed}" in position
    # 99 % of seed 0 for every method comes right after its dense model.
    assert names[:1 + len(methods)] == ["dense_trades_s0"] + [f"{m}_99_s0" for m in methods]
    flags_of = {r.name: r.flags(pathlib.Path("w")) for r in runs}
    # Penalty-free methods prune the shared dense model; a penalised method trains its dense
    # stage (with its penalties) at its first sparsity and reuses it at the others.
    assert flags_of["hydra_99_5_s0"] == [
        "--config.seed=0", "--config.prune.sparsity=0.995", "--config.stages=prune,finetune",
        "--config.init_dir=w/dense_trades_s0"]
    assert flags_of["hydra_tscnc_99_s0"] == ["--config.seed=0", "--config.prune.sparsity=0.99"]
    assert flags_of["hydra_tscnc_99_5_s0"][-2:] == [
        "--config.stages=prune,finetune", "--config.init_dir=w/hydra_tscnc_99_s0"]
    assert flags_of["tscnc_authors_90_s0"][-2:] == [
        "--config.stages=prune", "--config.init_dir=w/tscnc_authors_99_s0"]
    by_name = {r.name: r for r in runs}

    def without_sparsity(run):
        return [kv for kv in run.overrides if kv[0] != "prune.sparsity"]

    crossed = {name for _, _, name in study.CROSSED}
    for r in runs:  # a reused dense stage was trained with the same dense configuration
        if r.dense_from is None or dict(r.overrides).get("name") in crossed:
            continue
        source = by_name[r.dense_from]
        if r.config in study.SHARED_DENSE:
            assert source.config in ("dense_trades", "dense_pgd_at"), r.name
            assert dict(source.overrides)["seed"] == dict(r.overrides)["seed"], r.name
        else:
            assert source.config == r.config and source.dense_from is None, r.name
            assert without_sparsity(source) == without_sparsity(r), r.name
    assert "--config.loss=pgd_at" in flags_of["pgd_at_hydra_tscnc_99_s0"]
    assert "--config.model.name=lenet5" in flags_of["lenet5_hydra_99_s0"]
    for sp in ("90", "95", "99"):  # LeNet-5: HYDRA and TSCNC over sparsity, two seeds at 99 %
        for m in study.LENET_METHODS:
            assert f"lenet5_{m}_{sp}_s0" in position
    assert {"lenet5_hydra_99_s1", "lenet5_hydra_tscnc_99_s1"} <= set(position)
    # Seven seeds at 95 %; seeds 2-6's penalised 95 % runs prune their own 99 % run's dense
    # stage, which comes before them.
    assert {f"lenet5_{m}_95_s{s}" for m in ("hydra", "hydra_tscnc") for s in range(7)} <= set(
        position)
    for seed in (3, 4, 5, 6):
        assert flags_of[f"lenet5_hydra_tscnc_95_s{seed}"][-1] == (
            f"--config.init_dir=w/lenet5_hydra_tscnc_99_s{seed}")
        assert flags_of[f"lenet5_hydra_95_s{seed}"][-1] == (
            f"--config.init_dir=w/lenet5_dense_s{seed}")
        assert position[f"lenet5_dense_s{seed}"] < position[f"lenet5_hydra_95_s{seed}"]
        assert (position[f"lenet5_hydra_tscnc_99_s{seed}"]
                < position[f"lenet5_hydra_tscnc_95_s{seed}"])
    tscnc_95_s2 = flags_of["lenet5_hydra_tscnc_95_s2"]
    assert tscnc_95_s2[-1] == "--config.init_dir=w/lenet5_hydra_tscnc_99_s2"
    assert position["lenet5_dense_s2"] < position["lenet5_hydra_95_s2"]
    tscnc_95 = flags_of["lenet5_hydra_tscnc_95_s0"]
    assert tscnc_95[-1] == "--config.init_dir=w/lenet5_hydra_tscnc_99_s0"
    assert flags_of["lenet5_hydra_95_s0"][-1] == "--config.init_dir=w/lenet5_dense_s0"
    # The crossed-stage ablation: each 95 % pipeline from the other's dense model, so that with
    # lenet5_hydra_95 and lenet5_hydra_tscnc_95 every (dense model, pruning + fine-tuning) pair
    # of the two methods is run, under a method name of its own.
    for seed in (0, 1, 2, 3):
        plain, penalised = (flags_of[f"lenet5_{m}_95_s{seed}"] for m in ("hydra", "hydra_tscnc"))
        for name, config, dense_like in (("hydra_from_tscnc_dense", "hydra", penalised),
                                         ("hydra_tscnc_from_plain_dense", "hydra_tscnc", plain)):
            run = f"lenet5_{name}_95_s{seed}"
            f = flags_of[run]
            assert by_name[run].config == config and f[-1] == dense_like[-1], run
            assert f[-2] == "--config.stages=prune,finetune", run
            assert f"--config.name={name}" in f and "--config.prune.sparsity=0.95" in f, run
            assert position[run] > position[f"lenet5_hydra_tscnc_95_s{seed}"], run
    # CNC alone and TSC alone on LeNet-5, from their own dense stages; CNC in all four seeds.
    for seed, methods in ((0, ("hydra_cnc", "hydra_tsc")), (2, ("hydra_cnc", "hydra_tsc")),
                          (1, ("hydra_cnc",)), (3, ("hydra_cnc",))):
        for m in methods:
            assert flags_of[f"lenet5_{m}_99_s{seed}"][-1] == "--config.model.name=lenet5"
            assert flags_of[f"lenet5_{m}_95_s{seed}"][-1] == (
                f"--config.init_dir=w/lenet5_{m}_99_s{seed}")


def test_select_keeps_the_dense_runs_a_selection_needs():
    picked = [r.name for r in study.select(study.plan(), r"^tscnc_authors_95_s0$")]
    assert picked == ["tscnc_authors_99_s0", "tscnc_authors_95_s0"]
    with pytest.raises(Exception, match="matches no planned run"):
        study.select(study.plan(), "no_such_run")


def test_kept_runs_are_skipped_unless_a_pending_run_reuses_their_dense_stage():
    runs = study.select(study.plan(), r"^(hydra|hydra_tscnc)_9[59]_s0$")
    assert [r.name for r in runs] == ["dense_trades_s0", "hydra_99_s0", "hydra_tscnc_99_s0",
                                      "hydra_95_s0", "hydra_tscnc_95_s0"]
    kept = {"dense_trades_s0", "hydra_99_s0", "hydra_tscnc_99_s0", "hydra_tscnc_95_s0"}
    # hydra_95_s0 still needs dense_trades_s0's checkpoints, which a kept summary lacks: that
    # run trains its dense stage again, only that, without an evaluation or a summary.
    pending = study.without_kept(runs, kept)
    assert [(r.name, r.dense_only) for r in pending] == [("dense_trades_s0", True),
                                                         ("hydra_95_s0", False)]
    assert pending[0].flags(pathlib.Path("w")) == [
        "--config.seed=0", "--config.stages=dense", "--config.eval.final=False"]
    # A penalised method's kept first run retrains just its (penalised) dense stage.
    tscnc = study.without_kept(study.select(study.plan(), r"^hydra_tscnc_90_s0$"),
                               {"hydra_tscnc_99_s0"})
    assert [(r.name, r.dense_only) for r in tscnc] == [("hydra_tscnc_99_s0", True),
                                                       ("hydra_tscnc_90_s0", False)]
    assert tscnc[0].flags(pathlib.Path("w"))[-2:] == ["--config.stages=dense",
                                                      "--config.eval.final=False"]
    assert [r.name for r in study.without_kept(runs, kept | {"hydra_95_s0"})] == []
    assert study.without_kept(runs, set()) == runs


@pytest.mark.slow
def test_smoke_study_subset_runs_and_keeps_summaries(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def study_run(workdir, only="^hydra_95_s0$"):
        return stall.run(
            [sys.executable, "-m", "experiments.study", f"--workdir={workdir}",
             f"--summaries={tmp_path / 'kept'}", "--variant=smoke", f"--only={only}"],
            cwd=ROOT, env=env)

    proc = study_run(tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept_dense = (tmp_path / "kept" / "dense_trades_s0" / "summary.json").read_bytes()
    # As on a new machine (empty workdir): both runs are kept, so nothing trains again.
    again = study_run(tmp_path / "elsewhere")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "not rerun" in again.stdout and "hydra_95_s0" in again.stdout
    assert not (tmp_path / "elsewhere").exists()
    # A new run on a new machine: the kept dense run trains its dense stage again for it, with
    # no evaluation, and its kept summary stays as it was.
    new = study_run(tmp_path / "new", only="^hydra_(90|95)_s0$")
    assert new.returncode == 0, new.stderr[-3000:]
    assert "dense stage retrained for the runs that reuse it: dense_trades_s0" in new.stdout
    assert (tmp_path / "new" / "dense_trades_s0" / "dense" / "final").is_dir()
    assert not (tmp_path / "new" / "dense_trades_s0" / "summary.json").exists()
    assert not (tmp_path / "new" / "hydra_95_s0").exists()
    assert (tmp_path / "kept" / "dense_trades_s0" / "summary.json").read_bytes() == kept_dense
    assert (tmp_path / "kept" / "hydra_90_s0" / "summary.json").exists()
    dense = json.loads((tmp_path / "kept" / "dense_trades_s0" / "summary.json").read_text())
    pruned = json.loads((tmp_path / "kept" / "hydra_95_s0" / "summary.json").read_text())
    assert dense["sparsity"] == 0.0
    assert pruned["sparsity"] >= 0.95 and pruned["config"]["prune"]["sparsity"] == 0.95
    # It pruned the shared dense model and trained no dense stage of its own.
    assert pruned["config"]["init_dir"].endswith("dense_trades_s0")
    assert pruned["stages"] == ["prune", "finetune"]
    assert not (tmp_path / "runs" / "hydra_95_s0" / "dense").exists()
    # Finite live-part condition numbers are reported next to the (possibly infinite) full ones.
    assert set(pruned["live_kappa"]) == set(pruned["kappa"])
    assert all(v >= 1.0 for v in pruned["live_kappa"].values())


def test_a_kept_summary_made_with_another_config_is_not_skipped(tmp_path, capsys, monkeypatch):
    from experiments import sweep
    from experiments import workdir as workdir_lib

    monkeypatch.setattr(sweep.compare, "compare", lambda dirs, root: "")  # fake summaries below

    config = "experiments/configs/hydra.py:smoke"
    extra = ["--config.seed=3", "--config.stages=prune,finetune",
             f"--config.init_dir={tmp_path / 'a' / 'dense_s3'}"]
    planned = sweep.resolve_config(config, extra).to_dict()
    assert planned["seed"] == 3 and planned["stages"] == ("prune", "finetune")
    # The same run: init_dir under another root, stages as one comma-joined item, keys added to
    # the configs since (at their old values), and a penalty no stage uses set differently.
    same = json.loads(json.dumps(planned))
    same.update(init_dir=str(tmp_path / "b" / "dense_s3"), stages=["prune,finetune"])
    del same["model"]["dtype"], same["cnc"]["estimator"]
    same["cnc"]["live"] = not planned["cnc"]["live"]
    assert workdir_lib.summary_differences(same, planned) == {}
    other = json.loads(json.dumps(planned))
    other["prune"]["sparsity"], other["eval"]["num_standard"] = 0.5, 7
    assert set(workdir_lib.summary_differences(other, planned)) == {
        "prune.sparsity", "eval.num_standard"}  # evaluation keys count for a summary
    # The sweep refuses to skip such a finished run (and launches nothing for it).
    run = tmp_path / "runs" / "hydra_s3"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"config": other}))
    assert sweep.run_all([("hydra_s3", config, extra)], tmp_path / "runs", None) == ["hydra_s3"]
    out = capsys.readouterr().out
    assert "hydra_s3: FAILED" in out and "prune.sparsity: kept 0.5, planned 0.99" in out
    (run / "summary.json").write_text(json.dumps({"config": same}))
    assert sweep.run_all([("hydra_s3", config, extra)], tmp_path / "runs", None) == []
    assert "hydra_s3: finished earlier, skipped" in capsys.readouterr().out
