"""experiments.report: tables, spread over seeds, correlations and figures from kept summaries."""

import json
import math

import numpy as np
import pytest

from experiments import report


def _summary(method, target, seed, ensemble, live, bound, stages=("dense", "prune", "finetune")):
    return {
        "config": {"name": method, "model": {"name": "small_cnn"}, "loss": "trades",
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
    records = report.load(kept)
    assert [(r.method, r.target, r.seed) for r in records][:2] == [
        ("dense_trades", 0.0, 0), ("hydra", 0.9, 0)]  # a dense run's target is 0
    agg = {(a["method"], a["target"]): a for a in report.aggregate(records)}
    hydra = agg[("hydra", 0.99)]
    assert hydra["n"] == 2
    np.testing.assert_allclose(hydra["ensemble"], 0.22)
    np.testing.assert_allclose(hydra["ensemble_std"], np.std([0.20, 0.24], ddof=1))
    assert math.isnan(agg[("hydra", 0.9)]["ensemble_std"])  # one seed: no spread
    ens = np.array([0.55, 0.40, 0.20, 0.24, 0.26, 0.28])
    live = np.array([0.5, 0.9, 2.0, 1.8, 1.2, 1.1])
    c = report.correlations(records, "log10_live_kappa")
    assert c["n"] == 6
    np.testing.assert_allclose(c["pearson"], np.corrcoef(live, ens)[0, 1], rtol=1e-12)
    def rank(v):  # no ties in these values
        return np.argsort(np.argsort(v))

    np.testing.assert_allclose(c["spearman"], np.corrcoef(rank(live), rank(ens))[0, 1])
    assert c["pearson"] < 0  # worse conditioning, lower robustness, in this made-up data
    # The full-kernel kappa is inf at 99 %: only the finite runs count.
    assert report.correlations(records, "log10_kappa")["n"] == 2
    text = report.report(kept, tmp_path / "out")
    assert "| hydra | 99.00 | 2 |" in text.replace("small_cnn | trades | ", "")
    assert "| 22.00 ± 2.83 |" in text  # ensemble mean ± spread of the two HYDRA seeds
    # Fast minus standard on the same images: 0.01 (1 + target) points per run.
    gaps = 100 * np.array([0.01 * (1 + t) for t in (0.0, 0.9, 0.99, 0.99, 0.99, 0.99)])
    assert (f"mean {gaps.mean():.2f} points, largest {gaps.max():.2f}, smallest "
            f"{gaps.min():.2f}") in text
    assert "| 54.00 (55.00) on 500 |" in text  # the dense run's standard (fast) on first N
    # The 99 % columns use the four 99 % runs only.
    c99 = report.correlations([r for r in records if r.target == 0.99], "log10_live_kappa")
    assert c99["n"] == 4 and f"| 4 | {c99['pearson']:.3f} |" in text
    # Per-kernel table: pruned runs only, log10 of each kernel's live kappa.
    assert "| run | Conv_0 | Dense_0 |" in text and "| run2 | 2.00 | 2.00 |" in text
    assert "| run0 |" not in text.split("Per-kernel")[1]
    for name in ("kappa_vs_sparsity.png", "robust_vs_sparsity.png", "robust_vs_kappa.png",
                 "lipschitz_vs_sparsity.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_empty_directory_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments.study"):
        report.load(tmp_path)


def test_paired_differences_match_seed_by_seed(kept, tmp_path):
    records = report.load(kept)
    (row,) = report.paired_differences(records)  # only hydra_tscnc at 99 % has a HYDRA partner
    assert (row["method"], row["target"], row["seeds"]) == ("hydra_tscnc", 0.99, [0, 1])
    d = np.array([0.26 - 0.20, 0.28 - 0.24])
    np.testing.assert_allclose([row["ensemble"], row["ensemble_std"]],
                               [d.mean(), d.std(ddof=1)], rtol=1e-12)
    np.testing.assert_allclose(row["clean"], d.mean(), rtol=1e-12)  # clean = ensemble + 0.2
    # Without HYDRA's seed 1 only seed 0 pairs: one difference, no spread.
    (one,) = report.paired_differences(
        [r for r in records if not (r.method == "hydra" and r.seed == 1)])
    assert one["seeds"] == [0] and math.isnan(one["ensemble_std"])
    np.testing.assert_allclose(one["ensemble"], 0.06, rtol=1e-12)
    text = report.report(kept, tmp_path / "out")
    assert "| small_cnn | trades | hydra_tscnc | 99.00 | 0, 1 | 5.00 ± 1.41 | 5.00 ± 1.41 |" in text
