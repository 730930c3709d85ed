"""Training-step table for an accelerator: models x losses x batch x dtype x layer kernels.

    python -m benchmarks.accelerator [--budget_s 300] [--quick] [--out FILE]

Written for a GPU/TPU machine (``benchmarks/accelerator_check.sh`` runs it there with the test
subset that exercises the device code); it runs anywhere. Rows, in priority order, until
``--budget_s`` of wall time is spent (the rest are listed as not run):

1. at batch 128, float32, ``conv_impl="auto"``: clean, PGD-AT-10, TRADES-10, TRADES-10 + TSCNC
   with the exact CNC (an SVD of every kernel per step) and with the tracked CNC
   (``tscnc_jax.spectral_tracking``), for the small CNN (28x28x1), VGG-16 and ResNet-18 (CIFAR
   shapes);
2. TRADES-10 in bfloat16 (parameters float32) at batch 128 and 512, and in float32 at 512;
3. TRADES-10 with the XLA:CPU-tuned kernels forced (``conv_impl="cpu"``) against plain
   ``lax.conv`` / ``nn.max_pool`` (``"xla"``): on a GPU the CPU kernels should lose; on the CPU,
   ``"auto"`` is ``"cpu"``.

Each row: the first (compiling) call, then the median of ``--repeats`` steps, images/s.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags

import tscnc_jax as tj
from benchmarks import common
from tscnc_jax import training

MODELS = {"small_cnn": ("small_cnn", {}, (28, 28, 1), 0.1),
          "vgg16": ("vgg", {"depth": 16}, (32, 32, 3), 8 / 255),
          "resnet18": ("preact_resnet18", {}, (32, 32, 3), 8 / 255)}
LOSSES = {"clean": ("clean", None), "pgd_at": ("pgd_at", None), "trades": ("trades", None),
          "trades+tscnc exact": ("trades", "exact"), "trades+tscnc tracked": ("trades", "tracked")}

FLAGS = flags.FLAGS


def plan(models: list[str]) -> list[dict]:
    """Every row, in priority order (module docstring)."""
    rows = [dict(model=m, loss=loss, batch=128, dtype="float32", conv_impl="auto")
            for m in models for loss in LOSSES]
    rows += [dict(model=m, loss="trades", batch=b, dtype=d, conv_impl="auto")
             for m in models for b, d in ((128, "bfloat16"), (512, "float32"), (512, "bfloat16"))]
    rows += [dict(model=m, loss="trades", batch=128, dtype="float32", conv_impl=impl)
             for m in models for impl in ("cpu", "xla")]
    return rows


def time_row(row: dict, repeats: int) -> dict:
    """Compiles and times one training step (module docstring)."""
    name, kwargs, shape, eps = MODELS[row["model"]]
    model = tj.create_model(name, dtype=row["dtype"], conv_impl=row["conv_impl"], **kwargs)
    loss, estimator = LOSSES[row["loss"]]
    penalties = {}
    if estimator is not None:
        penalties = dict(cnc_weight=0.01, tsc_weight=1e-5,
                         cnc_kwargs={"estimator": estimator, "k": 8}, tsc_kwargs={"a": 1.0})
    tx = training.make_optimizer(0.05, **penalties)
    step, state = common.jitted_train_step(model, tx, shape, loss, eps)
    batch = jax.device_put(common.random_batch(np.random.default_rng(0), row["batch"], shape))
    first, times, metrics = common.time_train_step(step, state, batch, repeats)
    median = statistics.median(times)
    return {**row, "first_call_s": first, "median_s": median,
            "images_per_s": row["batch"] / median, "finite": float(metrics["finite"])}


def markdown(done: list[dict], skipped: list[dict], repeats: int) -> str:
    info = common.machine_info()
    lines = ["# Training steps on " + ", ".join(str(d) for d in jax.devices()[:1]),
             "",
             f"jax {jax.__version__}, backend {jax.default_backend()}, "
             f"{jax.device_count()} device(s), {info['processor']}, {info['cpu_count']} CPUs; "
             f"median of {repeats} steps after the first (compiling) call; TSCNC: CNC 0.01 "
             f"(tracked: k = 8), "
             f"TSC 1e-5; bfloat16 = compute dtype (parameters and penalties float32).",
             "",
             "| model | loss | batch | dtype | conv_impl | first call s | ms / step | images / s |",
             "|---|---|---:|---|---|---:|---:|---:|"]
    for r in done:
        lines.append(f"| {r['model']} | {r['loss']} | {r['batch']} | {r['dtype']} | "
                     f"{r['conv_impl']} | {r['first_call_s']:.1f} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['images_per_s']:.0f} |")
    if skipped:
        lines += ["", f"Not run within the time budget ({len(skipped)} rows): " + "; ".join(
            f"{r['model']} {r['loss']} b{r['batch']} {r['dtype']} {r['conv_impl']}"
            for r in skipped)]
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_bool("quick", False, "small CNN only, two rows, 2 repeats (a smoke run)")
    flags.DEFINE_string("models", "small_cnn,vgg16,resnet18", None)
    flags.DEFINE_integer("repeats", 5, None)
    flags.DEFINE_float("budget_s", 300.0, "Stop starting new rows after this many seconds.")
    flags.DEFINE_string("out", None, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    models = common.models_flag(FLAGS.models, MODELS, FLAGS.quick)
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    rows = plan(models)[:2] if FLAGS.quick else plan(models)
    start, done = time.perf_counter(), []
    for i, row in enumerate(rows):
        if time.perf_counter() - start > FLAGS.budget_s:
            common.report(markdown(done, rows[i:], repeats), done, FLAGS.out)
            return
        r = time_row(row, repeats)
        done.append(r)
        print(f"{r['model']:9s} {r['loss']:21s} b{r['batch']:<4d} {r['dtype']:8s} "
              f"{r['conv_impl']:4s} {r['median_s'] * 1e3:9.1f} ms {r['images_per_s']:8.0f} img/s "
              f"(first {r['first_call_s']:.1f} s)", flush=True)
    common.report(markdown(done, [], repeats), done, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
