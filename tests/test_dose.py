"""The dose-response study's plan: the arms, doses and evaluation of its predictions."""

import pathlib

from experiments import dose, study
from experiments.configs import hydra_tscnc


def test_plan_arms_doses_and_order():
    runs = dose.plan()
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    position = {n: i for i, n in enumerate(names)}
    by_name = {r.name: r for r in runs}
    for r in runs:  # every reused dense stage comes earlier, from the same dense configuration
        if r.dense_from is None:
            continue
        assert position[r.dense_from] < position[r.name], r.name
        source = by_name[r.dense_from]
        if r.config == "hydra":
            assert source.config == "dense_trades", r.name
        else:
            assert source.config == r.config and source.dense_from is None, r.name
            assert ([kv for kv in source.overrides if kv[0] != "prune.sparsity"]
                    == [kv for kv in r.overrides if kv[0] != "prune.sparsity"]), r.name
        assert dict(source.overrides)["seed"] == dict(r.overrides)["seed"], r.name
    for seed in dose.SEEDS:
        for arm in ("hydra", "tscnc_w1", "tscnc_w0_1", "tsc", "tscnc_w10", "tscnc_w0_01"):
            for sp in ("99", "95"):
                run = by_name[f"{arm}_{sp}_s{seed}"]
                o = dict(run.overrides)
                assert o["prune.scope"] == "layer" and o["eval.num_standard"] == "1000", run.name
                assert o["name"] == arm
                weight = o.get("dense.cnc_weight")
                assert weight == o.get("finetune.cnc_weight")
                if arm.startswith("tscnc_w"):
                    assert float(weight) == {"w1": 1.0, "w0_1": 0.1, "w10": 10.0,
                                             "w0_01": 0.01}[arm[len("tscnc_"):]]
                else:
                    assert weight is None  # the config's own 0 (hydra, hydra_tsc)
        # Priority: the core arms of both seeds before LeNet-5, the wider doses last.
        assert position[f"tsc_95_s{seed}"] < position["lenet5_tscnc_w1_95_s0"]
        assert position[f"tscnc_w10_99_s{seed}"] > position["lenet5_hydra_95_s3"]
    for seed in dose.LENET_SEEDS:
        for arm in ("tscnc_w1", "tscnc_w0_1", "hydra"):
            o = dict(by_name[f"lenet5_{arm}_95_s{seed}"].overrides)
            assert o["model.name"] == "lenet5" and o["prune.scope"] == "global", arm
    # The TSCNC arms keep the config's TSC: the dose varies CNC only.
    assert hydra_tscnc.get_config("short").dense.tsc_weight > 0
    flags = by_name["tscnc_w1_95_s0"].flags(pathlib.Path("w"))
    assert flags[-2:] == ["--config.stages=prune,finetune", "--config.init_dir=w/tscnc_w1_99_s0"]
    # --only per half of the seeds selects disjoint runs (one process per core).
    halves = [{r.name for r in study.select(runs, pattern)} for pattern in ("_s[02]$", "_s[13]$")]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(names)


def test_weight_tag():
    assert [dose.weight_tag(w) for w in (1.0, 0.1, 10.0, 0.01)] == ["w1", "w0_1", "w10", "w0_01"]
