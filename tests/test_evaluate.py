"""experiments.evaluate: the standard ensemble on a finished run's test images, chunk by chunk."""

import importlib
import json
import types

import numpy as np
import pytest

from experiments import evaluate, train
from experiments.reporting import summaries


def _chunk(start, clean, broken, attacks=("apgd-ce", "apgd-t", "square")):
    return {"start": start, "num": len(clean), "attacks": list(attacks),
            "clean_correct": list(clean), "broken_by": list(broken), "warnings": [],
            "seconds": 1.0}


def test_combine_counts_cumulative_accuracy_per_attack():
    rng = np.random.default_rng(0)
    clean = rng.random(23) < 0.8
    broken = np.where(clean, rng.integers(-1, 3, 23), -1)
    chunks = [_chunk(s, clean[s:s + 10].astype(int), broken[s:s + 10]) for s in (10, 0, 20)]
    totals = evaluate.combine(chunks, 23)
    # Reference: an image is robust after attack i when no attack up to i broke it.
    for i, name in enumerate(("apgd-ce", "apgd-t", "square")):
        survived = [c and not (0 <= b <= i) for c, b in zip(clean, broken, strict=True)]
        assert totals["standard_per_attack"][name] == pytest.approx(np.mean(survived), abs=1e-15)
    assert totals["standard_ensemble_acc"] == totals["standard_per_attack"]["square"]
    assert totals["standard_clean_acc"] == pytest.approx(clean.mean(), abs=1e-15)
    assert totals["num_standard"] == 23 and totals["chunk_starts"] == [0, 10, 20]
    assert totals["standard_seconds"] == 3.0
    chunks[1]["warnings"] = ["square broke 2"]  # the chunk of images 0-9
    warnings = evaluate.combine(chunks, 23)["standard_attack_warnings"]
    assert warnings == ["images 0-9: square broke 2"]


def test_combine_rejects_gaps_overlaps_and_mixed_attacks():
    a, b = _chunk(0, [1] * 4, [-1] * 4), _chunk(4, [1] * 4, [-1] * 4)
    with pytest.raises(ValueError, match="not exactly 0..8"):
        evaluate.combine([a, b], 9)
    with pytest.raises(ValueError, match="not exactly"):
        evaluate.combine([a, a, b], 8)
    with pytest.raises(ValueError, match="different attacks"):
        evaluate.combine([a, _chunk(4, [1] * 4, [-1] * 4, ("apgd-ce",))], 8)
    with pytest.raises(ValueError, match="must be positive"):
        evaluate.chunk_starts(10, 0)
    assert evaluate.chunk_starts(10, 4) == [0, 4, 8]


def test_an_unfinished_run_is_an_error_naming_the_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json does not exist"):
        evaluate.run(tmp_path)
    config = importlib.import_module("experiments.configs.hydra").get_config("smoke")
    (tmp_path / "summary.json").write_text(json.dumps(
        {"config": config.to_dict(), "num_test": 64, "evaluated_step": 1, "clean_acc": 0.5}))
    with pytest.raises(ValueError, match=r"--num=65 must be in \[1, 64\]"):
        evaluate.run(tmp_path, num=65)
    with pytest.raises(FileNotFoundError, match="dense/final"):
        evaluate.run(tmp_path, num=8, chunk=8)


@pytest.mark.slow
def test_chunks_reproduce_the_run_resume_and_feed_the_report(tmp_path):
    config = importlib.import_module("experiments.configs.hydra").get_config("smoke")
    config.eval.num_standard = 24
    run = tmp_path / "runs" / "hydra_s0"
    summary = evaluate.train_and_evaluate(config, run)
    # One chunk of the run's num_standard images: the run's own key, batches and numbers.
    first = evaluate.run(run, num=24, chunk=24)
    assert first["standard_ensemble_acc"] == summary["standard_ensemble_acc"]
    assert first["standard_per_attack"] == summary["standard_per_attack"]
    # All 64 test images in chunks of 24, 24 and 16; then a lost chunk is evaluated again.
    (run / "standard.json").unlink()
    for p in (run / "standard").iterdir():
        p.unlink()
    assert evaluate.run(run, chunk=24, last=24) is None  # only the first chunk: not complete
    totals = evaluate.run(run, chunk=24)
    assert totals["num_standard"] == 64 and totals["chunk_starts"] == [0, 24, 48]
    assert totals["standard_clean_acc"] == summary["clean_acc"]
    assert totals["standard_ensemble_acc"] <= summary["clean_acc"]
    chunk = json.loads((run / "standard" / "000024.json").read_text())
    (run / "standard" / "000024.json").unlink()
    again = evaluate.run(run, chunk=24)
    assert json.loads((run / "standard" / "000024.json").read_text())["broken_by"] == \
        chunk["broken_by"]
    assert {k: v for k, v in again.items() if k != "standard_seconds"} == \
        {k: v for k, v in totals.items() if k != "standard_seconds"}
    with pytest.raises(ValueError, match="another --chunk size"):
        evaluate.run(run, chunk=32, first=64)  # nothing to evaluate; the kept chunks mismatch
    # The report reads standard.json beside the kept summary in place of the run's subset.
    kept = tmp_path / "kept" / "hydra_s0"
    kept.mkdir(parents=True)
    (kept / "summary.json").write_text((run / "summary.json").read_text())
    (kept / "standard.json").write_text((run / "standard.json").read_text())
    (record,) = summaries.load(tmp_path / "kept")
    assert record.num_standard == 64 and record.standard == totals["standard_ensemble_acc"]
    assert record.fast_on_standard_subset == summary["ensemble_acc"]
    # The spectral report recomputed from the checkpoints: with the definitions the run used, it
    # is the summary's; the report reads spectral.json in place of the summary's fields.
    recomputed = evaluate.spectral(run)
    for field in ("kappa", "full_kappa", "operator_kappa", "live_shape", "live_rank",
                  "dense_kappa", "dense_operator_kappa", "weights_below_1e-3"):
        assert recomputed[field] == summary[field], field
    changed = {**recomputed, "median_log10_live_kappa": 1.5,
               "operator_kappa": dict.fromkeys(recomputed["operator_kappa"], 10.0)}
    (kept / "spectral.json").write_text(json.dumps(changed))
    (record,) = summaries.load(tmp_path / "kept")
    assert record.log10_live_kappa == 1.5 and set(dict(record.operator_kappa).values()) == {10.0}
    wrong = json.loads((run / "summary.json").read_text())
    wrong["sigma_max"] = {k: 2 * v for k, v in wrong["sigma_max"].items()}
    (run / "summary.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="not the model the summary evaluated"):
        evaluate.spectral(run)


def test_a_chunk_another_process_finished_meanwhile_is_skipped(tmp_path, monkeypatch):
    config = importlib.import_module("experiments.configs.hydra").get_config("smoke")
    (tmp_path / "summary.json").write_text(json.dumps(
        {"config": config.to_dict(), "num_test": 24, "evaluated_step": 3, "clean_acc": 1.0}))

    trained = types.SimpleNamespace(state=types.SimpleNamespace(step=3), model=None, data=None)
    monkeypatch.setattr(train, "restore", lambda config, workdir: trained)
    monkeypatch.setattr(evaluate, "logits_function", lambda config, model, state: None)
    monkeypatch.setattr(evaluate, "test_arrays",
                        lambda data, num: (np.zeros((num, 28, 28, 1)), np.zeros(num, int)))
    evaluated = []

    def fake_chunk(config, logits_fn, x, y, start):
        evaluated.append(start)
        if start == 0:  # meanwhile, a second process finishes the last chunk
            (tmp_path / "standard" / "000016.json").write_text(
                json.dumps(_chunk(16, [1] * 8, [-1] * 8)))
        return _chunk(start, [1] * len(y), [-1] * len(y))

    monkeypatch.setattr(evaluate, "evaluate_chunk", fake_chunk)
    totals = evaluate.run(tmp_path, chunk=8)
    assert evaluated == [0, 8]
    assert totals["chunk_starts"] == [0, 8, 16] and totals["standard_ensemble_acc"] == 1.0
