"""``python -m benchmarks.run --quick`` runs end to end and writes every table (no timing is
asserted: timings belong to the benchmark's own output, not to the tests)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "run.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for title in ("1. Practical peak", "2. Training steps", "3. JAX vs PyTorch",
                  "4. Penalty overhead", "5. Attack throughput", "6. Scaling"):
        assert f"## {title}" in text, title
    results = json.loads(out.with_suffix(".json").read_text())
    steps = results["train_steps"]
    assert [(s["loss"], s["tscnc"]) for s in steps] == [
        ("clean", False), ("pgd_at", False), ("trades", False), ("trades", True)]
    for s in steps:
        assert s["forward_flops"] > 0 and s["median_s"] > 0 and math.isfinite(s["gflops"])
    # The FLOP count is the model's: a small-CNN forward is ~8.5 MFLOP per 28x28 image.
    per_image = steps[0]["forward_flops"] / results["batch"]
    assert 5e6 < per_image < 12e6, per_image
    assert set(results["attacks"]["workloads"]) == {"pgd20", "fast"}
    penalty = results["penalties"][0]
    assert penalty["model"] == "small_cnn" and penalty["cnc_exact"] > 0 and penalty["tsc"] > 0
    assert [b["batch"] for b in results["batches"]] == [8, 16]
