#!/usr/bin/env bash
# The accelerator check: one command for a GPU (or TPU) machine, under 8 minutes.
#
#   bash benchmarks/accelerator_check.sh            # after `make .venv/.installed` and the
#                                                   # matching jax[cuda12] / jax[tpu] wheel
# 1. the tests that exercise the device code (layers and their backend-gated kernels, the
#    training and evaluation steps, data parallelism) -- at most 150 s;
# 2. the training-step table of benchmarks/accelerator.py (small CNN, VGG-16, ResNet-18; clean,
#    PGD-AT-10, TRADES-10, + TSCNC exact and tracked; batch 128 and 512; float32 and bfloat16;
#    conv_impl xla against the CPU kernels) -- rows until a 240 s budget is spent;
# 3. if torch is importable, the PyTorch twin of the same steps on the same device -- 60 s.
# Everything goes to benchmarks/results/accelerator.md (and .json); each part's failure is
# written there too, so the table of what ran always comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/accelerator.md}
mkdir -p "$(dirname "$OUT")"
TESTS_LOG=$(mktemp)

timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_training.py \
  tests/test_parallel.py -k "not slow" > "$TESTS_LOG" 2>&1
tests_rc=$?
timeout 300 "$PY" -m benchmarks.accelerator --budget_s=240 --out="$OUT"
bench_rc=$?
{
  echo
  echo "## Device-code tests (exit code $tests_rc)"
  echo
  echo '```'
  tail -n 15 "$TESTS_LOG"
  echo '```'
} >> "$OUT"
if "$PY" -c "import torch" 2>/dev/null; then
  {
    echo
    echo "## PyTorch twin on the same device"
    echo
    timeout 60 "$PY" -m benchmarks.torch_twin --models=small_cnn --repeats=3 2>&1 | tail -n 20
  } >> "$OUT"
fi
echo "benchmark exit code $bench_rc; table in $OUT"
exit $(( tests_rc != 0 || bench_rc != 0 ))
