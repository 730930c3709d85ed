"""experiments.reporting: tables, spread over seeds, correlations, figures from kept summaries."""

import json
import math

import numpy as np
import pytest

from experiments.reporting import crossed, dose, statistics, summaries, tables, write


def _summary(method, target, seed, ensemble, live, bound, stages=("dense", "prune", "finetune"),
             model="small_cnn"):
    return {
        "config": {"name": method, "model": {"name": model}, "loss": "trades",
                   "prune": {"sparsity": target}, "seed": seed},
        "stages": list(stages), "sparsity": target, "clean_acc": ensemble + 0.2,
        "pgd20_acc": ensemble + 0.05, "ensemble_acc": ensemble,
        "median_log10_kappa": math.inf if target >= 0.99 else live,
        "median_log10_live_kappa": live, "lipschitz_upper_bound": bound,
        "local_lipschitz_mean": 1.0, "wall_seconds": 600.0, "num_test": 10000,
        "live_kappa": {"Conv_0/kernel": 10.0 ** live, "Dense_0/kernel": 100.0},
        "num_standard": 500, "standard_ensemble_acc": ensemble - 0.01,
        "fast_ensemble_acc_on_standard_subset": ensemble + 0.01 * target}


@pytest.fixture
def kept(tmp_path):
    rows = [("dense_trades", 0.0, 0, 0.55, 0.5, 40.0, ("dense",)),
            ("hydra", 0.9, 0, 0.40, 0.9, 20.0), ("hydra", 0.99, 0, 0.20, 2.0, 9.0),
            ("hydra", 0.99, 1, 0.24, 1.8, 8.0), ("hydra_tscnc", 0.99, 0, 0.26, 1.2, 8.5),
            ("hydra_tscnc", 0.99, 1, 0.28, 1.1, 8.4)]
    for i, (method, target, seed, ens, live, bound, *stages) in enumerate(rows):
        d = tmp_path / "kept" / f"run{i}"
        d.mkdir(parents=True)
        s = _summary(method, target, seed, ens, live, bound, *stages)
        (d / "summary.json").write_text(json.dumps(s))
    return tmp_path / "kept"


def test_tables_spread_and_correlations(kept, tmp_path):
    records = summaries.load(kept)
    assert [(r.method, r.target, r.seed) for r in records][:2] == [
        ("dense_trades", 0.0, 0), ("hydra", 0.9, 0)]  # a dense run's target is 0
    agg = {(a["method"], a["target"]): a for a in statistics.aggregate(records)}
    hydra = agg[("hydra", 0.99)]
    assert hydra["n"] == 2
    np.testing.assert_allclose(hydra["ensemble"], 0.22)
    np.testing.assert_allclose(hydra["ensemble_std"], np.std([0.20, 0.24], ddof=1))
    assert math.isnan(agg[("hydra", 0.9)]["ensemble_std"])  # one seed: no spread
    ens = np.array([0.55, 0.40, 0.20, 0.24, 0.26, 0.28])
    live = np.array([0.5, 0.9, 2.0, 1.8, 1.2, 1.1])
    c = statistics.correlations(records, "log10_live_kappa")
    assert c["n"] == 6
    np.testing.assert_allclose(c["pearson"], np.corrcoef(live, ens)[0, 1], rtol=1e-12)
    def rank(v):  # no ties in these values
        return np.argsort(np.argsort(v))

    np.testing.assert_allclose(c["spearman"], np.corrcoef(rank(live), rank(ens))[0, 1])
    assert c["pearson"] < 0  # worse conditioning, lower robustness, in this made-up data
    # The full-kernel kappa is inf at 99 %: only the finite runs count.
    assert statistics.correlations(records, "log10_kappa")["n"] == 2
    text = write.report(kept, tmp_path / "out")
    assert "| hydra | 99.00 | 2 |" in text.replace("small_cnn | trades | ", "")
    assert "| 22.00 ± 2.83 |" in text  # ensemble mean ± spread of the two HYDRA seeds
    # Fast minus standard on the same images: 0.01 (1 + target) points per run.
    gaps = 100 * np.array([0.01 * (1 + t) for t in (0.0, 0.9, 0.99, 0.99, 0.99, 0.99)])
    assert (f"mean {gaps.mean():.2f} points, largest {gaps.max():.2f}, smallest "
            f"{gaps.min():.2f}") in text
    assert "| 54.00 (55.00) on 500 |" in text  # the dense run's standard (fast) on first N
    # The 99 % columns use the four 99 % runs only.
    c99 = statistics.correlations([r for r in records if r.target == 0.99], "log10_live_kappa")
    assert c99["n"] == 4 and f"| 4 | {c99['pearson']:.3f} |" in text
    # Per-kernel table: pruned runs only, log10 of each kernel's live kappa.
    assert "| run | Conv_0 | Dense_0 |" in text and "| run2 | 2.00 | 2.00 |" in text
    assert "| run0 |" not in text.split("Per-kernel")[1]
    for name in ("kappa_vs_sparsity.png", "robust_vs_sparsity.png", "robust_vs_kappa.png",
                 "lipschitz_vs_sparsity.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_empty_directory_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments.study"):
        summaries.load(tmp_path)


def test_paired_differences_match_seed_by_seed(kept, tmp_path):
    records = summaries.load(kept)
    (row,) = statistics.paired_differences(records)  # only hydra_tscnc at 99 % has a HYDRA partner
    assert (row["method"], row["target"], row["seeds"]) == ("hydra_tscnc", 0.99, [0, 1])
    d = np.array([0.26 - 0.20, 0.28 - 0.24])
    np.testing.assert_allclose([row["ensemble"], row["ensemble_std"]],
                               [d.mean(), d.std(ddof=1)], rtol=1e-12)
    np.testing.assert_allclose(row["clean"], d.mean(), rtol=1e-12)  # clean = ensemble + 0.2
    # Without HYDRA's seed 1 only seed 0 pairs: one difference, no spread.
    (one,) = statistics.paired_differences(
        [r for r in records if not (r.method == "hydra" and r.seed == 1)])
    assert one["seeds"] == [0] and math.isnan(one["ensemble_std"])
    np.testing.assert_allclose(one["ensemble"], 0.06, rtol=1e-12)
    text = write.report(kept, tmp_path / "out")
    assert "| small_cnn | trades | hydra_tscnc | 99.00 | 0, 1 | 5.00 ± 1.41 | 5.00 ± 1.41 |" in text


def _write(root, name, summary):
    (root / name).mkdir(parents=True)
    (root / name / "summary.json").write_text(json.dumps(summary))


def test_crossed_stages_give_each_stage_its_share_of_the_gain(tmp_path):
    from experiments import study

    # The report's cells are the study's runs: its two crossed methods and the two they cross.
    assert {name for _, _, name in study.CROSSED} | {"hydra", "hydra_tscnc"} == set(
        crossed.CROSSED_CELLS.values())
    acc = {0: {"hydra": 0.40, "hydra_tscnc_from_plain_dense": 0.42,
               "hydra_from_tscnc_dense": 0.51, "hydra_tscnc": 0.55},
           1: {"hydra": 0.45, "hydra_tscnc_from_plain_dense": 0.44,
               "hydra_from_tscnc_dense": 0.47, "hydra_tscnc": 0.46},
           2: {"hydra": 0.43, "hydra_tscnc": 0.57}}  # seed 2 lacks the crossed runs
    root = tmp_path / "kept"
    for seed, methods in acc.items():
        for method, ens in methods.items():
            _write(root, f"{method}_{seed}", _summary(method, 0.95, seed, ens, 1.0, 20.0,
                                                      model="lenet5"))
    _write(root, "hydra_99_0", _summary("hydra", 0.99, 0, 0.3, 1.0, 20.0, model="lenet5"))
    rows = crossed.crossed_stages(summaries.load(root))
    assert [(r["model"], r["target"], r["seed"]) for r in rows] == [
        ("lenet5", 0.95, 0), ("lenet5", 0.95, 1)]
    for row in rows:
        a = acc[row["seed"]]
        np.testing.assert_allclose(
            [row["effects"]["penalised dense model"],
             row["effects"]["TSCNC's pruning and fine-tuning"],
             row["effects"]["both (HYDRA + TSCNC)"]],
            [a["hydra_from_tscnc_dense"] - a["hydra"],
             a["hydra_tscnc_from_plain_dense"] - a["hydra"], a["hydra_tscnc"] - a["hydra"]],
            rtol=1e-12)
        assert row["cells"][("penalised", "hydra")] == a["hydra_from_tscnc_dense"]
    text = tables.tables(summaries.load(root))
    assert "Which stage carries TSCNC's gain" in text
    assert ("| lenet5 | 95.00 | 0 | 40.00 | 42.00 | 51.00 | 55.00 | +11.00 | +2.00 | +15.00 |"
            in text)
    dense_gain = np.array([0.11, 0.02]) * 100
    mean_row = next(line for line in text.splitlines() if "mean of 2" in line)
    assert f"{dense_gain.mean():.2f} ± {dense_gain.std(ddof=1):.2f}" in mean_row


def test_correlations_per_setting_and_over_every_run(kept, tmp_path):
    records = summaries.load(kept)
    assert [name for name, _ in statistics.settings(records)] == ["small_cnn, trades"]
    lenet = [("dense_trades", 0.0, 0, 0.50, 0.4, 30.0, ("dense",)),
             ("hydra", 0.99, 0, 0.10, 1.5, 5.0), ("hydra_tscnc", 0.99, 0, 0.12, 1.4, 5.5),
             ("hydra", 0.9, 0, 0.45, 0.6, 20.0), ("hydra", 0.95, 0, 0.40, 0.8, 12.0)]
    for i, (method, target, seed, ens, live, bound, *stages) in enumerate(lenet):
        _write(kept, f"lenet{i}", _summary(method, target, seed, ens, live, bound, *stages,
                                           model="lenet5"))
    for i in range(4):  # too few runs to correlate over on their own
        _write(kept, f"mlp{i}", _summary("hydra", 0.9 + 0.02 * i, 0, 0.3, 1.0, 3.0, model="mlp"))
    records = summaries.load(kept)
    groups = dict(statistics.settings(records))
    assert list(groups) == ["lenet5, trades", "small_cnn, trades", "every run"]
    assert len(groups["lenet5, trades"]) == 5 and len(groups["every run"]) == 15
    text = write.report(kept, tmp_path / "out")
    c = statistics.correlations(groups["lenet5, trades"], "log10_live_kappa")
    assert (f"| lenet5, trades | median log10 live kappa | 5 | {c['pearson']:.3f} | "
            f"{c['spearman']:.3f} | 2 |") in text
    assert "| mlp, trades |" not in text and "| every run | median log10 live kappa | 15 |" in text


def test_dense_reproduction_compares_the_pruned_dense_model_with_the_kept_one(tmp_path):
    root = tmp_path / "kept"
    dense = _summary("dense_trades", 0.0, 0, 0.55, 0.5, 40.0, ("dense",))
    dense["kappa"] = {"Conv_0/kernel": 3.0, "Dense_0/kernel": 5.0}
    _write(root, "dense_trades_s0", dense)
    same = _summary("hydra", 0.99, 0, 0.2, 1.0, 9.0, ("prune", "finetune"))
    same["config"]["init_dir"] = "runs/study/dense_trades_s0"
    same["dense_kappa"] = dict(dense["kappa"])
    _write(root, "hydra_99_s0", same)
    other = _summary("lwm", 0.99, 0, 0.1, 1.0, 9.0, ("prune", "finetune"))
    other["config"]["init_dir"] = "/elsewhere/dense_trades_s0"
    other["dense_kappa"] = {"Conv_0/kernel": 3.0, "Dense_0/kernel": 5.0 * 10 ** 0.002}
    _write(root, "lwm_99_s0", other)
    # A run that trained its own dense stage has nothing to compare (init_dir is ignored).
    own = _summary("hydra_tscnc", 0.99, 0, 0.2, 1.0, 9.0)
    own["config"]["init_dir"] = "runs/study/dense_trades_s0"
    own["dense_kappa"] = {"Conv_0/kernel": 2.0, "Dense_0/kernel": 4.0}
    _write(root, "hydra_tscnc_99_s0", own)
    rows = {d["run"]: d for d in statistics.dense_reproduction(summaries.load(root))}
    assert set(rows) == {"hydra_99_s0", "lwm_99_s0"}
    assert rows["hydra_99_s0"]["max_abs_log10_kappa_diff"] == 0.0
    np.testing.assert_allclose(rows["lwm_99_s0"]["max_abs_log10_kappa_diff"], 0.002, rtol=1e-9)
    text = write.report(root, tmp_path / "out")
    assert "| lwm_99_s0 | dense_trades_s0 | 2.00e-03 |" in text


def test_splice_replaces_only_the_marked_block_and_is_idempotent(kept, tmp_path):
    text = write.report(kept, tmp_path / "out")
    doc = (f"# Study\n\nhand-written intro\n\n## Tables\n\n{write.BEGIN}\nstale\n"
           f"{write.END}\n\n## Discussion\n\nhand-written\n")
    once = write.splice(doc, text)
    assert once.startswith("# Study\n\nhand-written intro\n\n## Tables\n\n")
    assert once.endswith(f"{write.END}\n\n## Discussion\n\nhand-written\n")
    assert "stale" not in once
    # The page title stays out; sections go one level down under the host's heading.
    assert "Reproduction study: tables" not in once
    assert "\n### Every run\n" in once and "\n## Every run\n" not in once
    # Every table row of the report is in the document.
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows and all(row in once.splitlines() for row in rows)
    assert write.splice(once, text) == once


@pytest.mark.parametrize("doc", ["no markers", f"{write.BEGIN} only",
                                 f"{write.END} x {write.BEGIN}",
                                 f"{write.BEGIN}{write.BEGIN}{write.END}"])
def test_splice_rejects_documents_without_one_ordered_marker_pair(doc):
    with pytest.raises(ValueError, match="report:tables"):
        write.splice(doc, "# t\n\n## Every run\n\n| a |\n")


def test_by_seed_lays_out_each_seed_only_where_some_method_has_three(tmp_path):
    rows = [("hydra", 0.95, seed, acc) for seed, acc in enumerate((0.44, 0.45, 0.43))]
    rows += [("hydra_tscnc", 0.95, 0, 0.58), ("hydra_tscnc", 0.95, 3, 0.59),
             ("hydra", 0.99, 0, 0.30), ("hydra", 0.99, 1, 0.31)]  # 99 %: two seeds only
    for i, (method, target, seed, ens) in enumerate(rows):
        _write(tmp_path, f"run{i}", _summary(method, target, seed, ens, 1.0, 10.0))
    _write(tmp_path, "dense", _summary("dense_trades", 0.0, 0, 0.6, 1.0, 10.0, ("dense",)))
    records = summaries.load(tmp_path)
    (setting,) = statistics.by_seed(records)
    assert (setting["target"], setting["seeds"]) == (0.95, [0, 1, 2, 3])
    assert setting["methods"] == {"hydra": {0: 0.44, 1: 0.45, 2: 0.43},
                                  "hydra_tscnc": {0: 0.58, 3: 0.59}}
    assert statistics.by_seed(records, min_seeds=2)[1]["target"] == 0.99
    text = tables.tables(records)
    assert "| hydra_tscnc | 58.00 | - | - | 59.00 |" in text
    assert "| hydra | 44.00 | 45.00 | 43.00 | - |" in text


def test_an_infinite_kappa_gives_an_infinite_mean_and_no_spread(tmp_path):
    for i, live in enumerate((math.inf, 1.0)):
        _write(tmp_path, f"run{i}", _summary("hydra", 0.99, i, 0.3, live, 10.0))
    with np.errstate(invalid="raise"):
        (row,) = statistics.aggregate(summaries.load(tmp_path))
    assert row["log10_live_kappa"] == math.inf and math.isnan(row["log10_live_kappa_std"])
    np.testing.assert_allclose(row["ensemble_std"], 0.0, atol=1e-15)


def test_live_shapes_list_each_run_most_robust_first_where_five_seeds_ran(tmp_path):
    rows = [("hydra", 0.95, seed, acc, rows_left)
            for seed, (acc, rows_left) in enumerate(((0.44, 30), (0.60, 56), (0.43, 25),
                                                     (0.45, 38), (0.46, 33)))]
    rows += [("hydra_tscnc", 0.95, 0, 0.58, 70), ("hydra", 0.99, 0, 0.30, 9)]  # 99 %: one seed
    for i, (method, target, seed, ens, rows_left) in enumerate(rows):
        s = _summary(method, target, seed, ens, 1.0, 10.0)
        s["live_shape"] = {"Conv_0/kernel": [9, 4], "Conv_1/kernel": [rows_left, 11]}
        _write(tmp_path, f"run{i}", s)
    _write(tmp_path, "old", _summary("hydra_tsc", 0.95, 1, 0.5, 1.0, 10.0))  # no live_shape
    records = summaries.load(tmp_path)
    (setting,) = statistics.live_shapes(records)
    assert setting["target"] == 0.95
    assert [r.run for r in setting["runs"]] == [
        "run1", "run5", "run4", "run3", "run0", "run2"]
    assert dict(setting["runs"][0].live_shape)["Conv_1/kernel"] == (56, 11)
    assert statistics.live_shapes(records, min_seeds=6) == []
    text = tables.tables(records)
    assert "| run1 | hydra | 1 | 60.00 | 9 x 4 | 56 x 11 |" in text
    section = text.split("## What pruning left of each kernel")[1].split("##")[0]
    assert "| run6 |" not in section and "| old |" not in section


def test_dose_response_pairs_by_seed_and_factors(tmp_path):
    """The dose study's table: differences paired by seed and kappa factors against NumPy."""
    def summary(method, seed, ens, std, live, op):
        s = _summary(method, 0.99, seed, ens, live, 9.0)
        s.update(standard_ensemble_acc=std, num_standard=1000,
                 live_kappa={"Conv_0/kernel": 10.0 ** live, "Dense_0/kernel": 10.0},
                 operator_kappa={"Conv_0/kernel": 10.0 ** op},
                 dense_kappa={"Conv_0/kernel": 3.0, "Dense_0/kernel": 4.0},
                 dense_operator_kappa={"Conv_0/kernel": 5.0})
        s["weights_below_1e-3"], s["nonzero_weights_below_1e-3"] = 0.99, 0.1
        s["dense_weights_below_1e-3"] = 0.3
        return s

    rows = [("hydra", 0, 0.60, 0.58, 1.0, 2.0), ("hydra", 1, 0.62, 0.61, 1.2, 2.2),
            ("tscnc_w1", 0, 0.61, 0.60, 0.5, 1.0), ("tscnc_w1", 1, 0.60, 0.60, 0.4, 1.6),
            ("old_style", 0, 0.5, 0.5, 0.1, 0.1)]
    for i, (method, seed, ens, std, live, op) in enumerate(rows):
        d = tmp_path / f"run{i}"
        d.mkdir()
        s = summary(method, seed, ens, std, live, op)
        if method == "old_style":  # a summary from before the operator kappa: left out
            del s["operator_kappa"]
        (d / "summary.json").write_text(json.dumps(s))
    records = summaries.load(tmp_path)
    (row,) = dose.dose_response(records)
    assert (row["method"], row["seeds"]) == ("tscnc_w1", [0, 1])
    np.testing.assert_allclose(row["standard"], np.mean([0.60 - 0.58, 0.60 - 0.61]))
    np.testing.assert_allclose(row["standard_std"], np.std([0.02, -0.01], ddof=1))
    np.testing.assert_allclose(row["ensemble"], np.mean([0.01, -0.02]))
    # From each summary's median log10 live kappa, geometric mean over the seeds.
    np.testing.assert_allclose(row["kappa_factor"], 10 ** np.mean([1.0 - 0.5, 1.2 - 0.4]))
    np.testing.assert_allclose(row["operator_factor"], 10 ** np.mean([1.0, 0.6]))
    text = tables.tables(records)
    assert "## Dose response: each method against HYDRA, paired by seed" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| small_cnn | tscnc_w1 | 99.00 |"
                                                               " 0, 1 |"))
    assert line.endswith("| +2.00, -1.00 |")
    dense = next(ln for ln in text.splitlines()
                 if ln.startswith("| small_cnn | hydra | 99.00 | dense | 2 |"))
    assert dense.split(" | ")[5:8] == [f"{np.log10(3.0):.2f}", f"{np.log10(4.0):.2f}",
                                       f"{np.log10(5.0):.2f}"]
    assert dense.endswith("| 30.00 % |")
