"""Training-step throughput: clean, PGD-AT-10 and TRADES-10 steps, with and without TSCNC.

    python -m benchmarks.train_step [--quick] [--models small_cnn,vgg16,resnet18] [--repeats N]
                                    [--batch 128] [--out benchmarks/results/train_step.md]

Each row jits :func:`tscnc_jax.training.make_train_step` for one model and loss at batch 128 and
reports the median wall time of ``--repeats`` steps after compilation (first call excluded) and
images/s. "+TSCNC" adds the CNC (exact SVD of every kernel, temperature 0.1, delta 1e-3, weight
0.01) and TSC (a = 1, weight 1e-5) penalties through the optimizer. Inputs are random, so the
numbers measure compute only (28x28x1 for the small CNN, 32x32x3 for VGG-16 and ResNet-18).
"""

from __future__ import annotations

import os
import statistics

import jax
import numpy as np
from absl import app, flags

import tscnc_jax as tj
from benchmarks import common
from tscnc_jax import training

MODELS = {
    "small_cnn": (lambda: tj.create_model("small_cnn"), (28, 28, 1)),
    "vgg16": (lambda: tj.create_model("vgg", depth=16), (32, 32, 3)),
    "resnet18": (lambda: tj.create_model("preact_resnet18"), (32, 32, 3)),
}
EPS = {"small_cnn": 0.1, "vgg16": 8 / 255, "resnet18": 8 / 255}
ROWS = [("clean", False), ("pgd_at", False), ("trades", False), ("trades", True)]

FLAGS = flags.FLAGS


def _time_step(model_name: str, loss: str, tscnc: bool, batch: int, repeats: int) -> dict:
    make_model, shape = MODELS[model_name]
    model = make_model()
    kwargs = {}
    if tscnc:
        kwargs = dict(cnc_weight=0.01, tsc_weight=1e-5,
                      cnc_kwargs={"temperature": 0.1, "delta": 1e-3}, tsc_kwargs={"a": 1.0})
    tx = training.make_optimizer(0.05, **kwargs)
    step, state = common.jitted_train_step(model, tx, shape, loss, EPS[model_name])
    data = common.random_batch(np.random.default_rng(0), batch, shape)
    compile_s, times, _ = common.time_train_step(step, state, data, repeats)
    median = statistics.median(times)
    return {"model": model_name, "loss": loss, "tscnc": tscnc, "batch": batch,
            "first_call_s": compile_s, "median_s": median, "images_per_s": batch / median,
            "times_s": times}


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_bool("quick", False, "small CNN only, 2 repeats")
    flags.DEFINE_string("models", "small_cnn,vgg16,resnet18", None)
    flags.DEFINE_integer("repeats", 5, None)
    flags.DEFINE_integer("batch", 128, None)
    flags.DEFINE_string("out", None, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    models = common.models_flag(FLAGS.models, MODELS, FLAGS.quick)
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    if repeats < 1:
        raise app.UsageError("--repeats must be >= 1")
    results = []
    for model_name in models:
        for loss, tscnc in ROWS:
            r = _time_step(model_name, loss, tscnc, FLAGS.batch, repeats)
            results.append(r)
            print(f"{model_name:10s} {loss:7s} tscnc={tscnc!s:5s} {r['median_s'] * 1e3:9.1f} ms "
                  f"{r['images_per_s']:8.1f} img/s (first call {r['first_call_s']:.1f} s)",
                  flush=True)
    lines = [
        "# Training-step throughput",
        "",
        f"jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores; batch "
        f"{FLAGS.batch}; median of {repeats} steps after the first (compiling) call; float32.",
        "",
        "| model | loss | TSCNC | ms / step | images / s | TSCNC overhead |",
        "|---|---|---|---:|---:|---:|",
    ]
    base = {(r["model"], r["loss"]): r["median_s"] for r in results if not r["tscnc"]}
    for r in results:
        overhead = ""
        if r["tscnc"]:
            overhead = f"{100 * (r['median_s'] / base[(r['model'], r['loss'])] - 1):+.1f} %"
        lines.append(f"| {r['model']} | {r['loss']}{'-10' if r['loss'] != 'clean' else ''} | "
                     f"{'yes' if r['tscnc'] else 'no'} | {r['median_s'] * 1e3:.1f} | "
                     f"{r['images_per_s']:.1f} | {overhead} |")
    text = "\n".join(lines) + "\n"
    common.report(text, results, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
