"""All benchmarks in one run: one markdown table per section, medians, ratios from the same run.

    python -m benchmarks.run [--quick] [--out benchmarks/results/run.md]

Sections (each measured side by side in this process, medians over ``--repeats`` after the first,
compiling call):

1. **Practical peak**: a jitted float32 ``N x N`` matmul (N = 4096; 1024 with ``--quick``), in
   GFLOP/s (``2 N^3`` per call).
2. **Training steps** at ``--batch`` (128): clean, PGD-AT-10, TRADES-10 and TRADES-10 + TSCNC
   (exact CNC + TSC) for the small CNN, VGG-16 and ResNet-18 (small CNN only with ``--quick``):
   ms, images/s, and achieved GFLOP/s in direct-convolution terms against the peak (re-measured
   before and after each row, the higher of the two: the machine drifts). The FLOPs of
   one forward pass come from XLA's cost analysis of the loop-free forward; a step counts
   ``F`` per forward, ``2F`` per backward with weight gradients and ``F`` per input-only backward
   (the attack's), i.e. clean ``3F``, PGD-AT-10 ``10 * 2F + 3F + F`` (the clean forward for the
   accuracy), TRADES-10 ``F + 10 * 2F + 2 * 3F``. (XLA's cost analysis counts a loop body once,
   so the step's own count would miss the attack iterations.)
3. **JAX vs PyTorch** (the three models' PyTorch twins, same architecture, loss, attack schedule
   and optimizer; ``benchmarks/torch_twin.py``): step times, interleaved, and the JAX / PyTorch
   ratio, when torch is installed (``pip install torch==2.13.0``; a benchmark-only dependency).
   ``--repeats`` for the small CNN, at most 3 for VGG-16 and ResNet-18. Then ResNet-18's
   convolutions pass by pass (forward, input gradient, weight gradient) in both frameworks
   (``benchmarks/conv_passes.py``); ``python -m benchmarks.profile_step`` shows where the rest
   of a step goes.
4. **Penalty overhead** per model: the optax update of the exact CNC, the tracked CNC
   (``add_tracked_condition_number_penalty``; k = 16 for every kernel, and ``k =
   minimal_k(params, cosine=0.99)``, each kernel's smallest k whose converged gradient cosine
   with the exact surrogate is >= 0.99 at the model's initialisation; steady state between
   resynchronisations) and the TSC, as ms and as a percentage of the same model's TRADES-10
   step from section 2.
5. **Attack throughput** (small CNN): images/s of PGD-20 and the fast ensemble (+ APGD-CE and the
   standard ensemble without ``--quick``), from ``benchmarks/attacks.py``; and, when torch and
   torchattacks are installed, the fast ensemble against torchattacks' APGD-CE + APGD-T + Square
   at the same budgets on the same weights (``benchmarks/torchattacks_twin.py``).
6. **Scaling**: exact vs tracked CNC value + gradient against kernel size (64x64 to 4608x512),
   and the small CNN's TRADES-10 step time against the batch size.

``--quick`` is a smoke run (about a minute here; the test suite runs it and asserts the tables,
never timings); it skips the PyTorch sections.
"""

from __future__ import annotations

import os

# As in experiments.main: one OpenBLAS thread, or the exact SVDs inside XLA's thread pool
# oversubscribe the cores (measured: the CNC's share of a step drops to noise). An explicit
# environment setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import functools

import jax
import jax.numpy as jnp
from absl import app, flags

import tscnc_jax as tj
from benchmarks import attacks as attack_bench
from benchmarks import (
    cnc_estimator,
    common,
    conv_passes,
    torch_twin,
    torchattacks_twin,
    train_step,
)
from tscnc_jax import spectral_tracking as st

LOSSES = [("clean", False), ("pgd_at", False), ("trades", False), ("trades", True)]
# Forward-pass equivalents per step (see the module docstring).
FORWARDS = {"clean": 3, "pgd_at": 10 * 2 + 3 + 1, "trades": 1 + 10 * 2 + 2 * 3}

FLAGS = flags.FLAGS


def _median_s(fn, *args, repeats: int) -> float:
    return common.median_ms(fn, *args, repeats=repeats) / 1e3


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


def peak(n: int, repeats: int) -> dict:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    sec = _median_s(jax.jit(jnp.matmul), a, b, repeats=repeats)
    return {"n": n, "seconds": sec, "gflops": 2 * n**3 / sec / 1e9}


def forward_flops(model_name: str, batch: int) -> float:
    make_model, shape = train_step.MODELS[model_name]
    model = make_model()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))
    x = jnp.zeros((batch, *shape))
    fwd = jax.jit(functools.partial(model.apply, train=False))
    return _flops(fwd.lower(variables, x).compile())


def train_steps(models, batch: int, repeats: int, peak_n: int) -> list[dict]:
    # The machine's speed drifts within a run (a 4096^2 matmul measured 203 GFLOP/s at the start
    # of one run and the steps after it ran 2x faster), so each row's percentage is against a
    # peak measured right before it, and the higher of that and one right after.
    rows = []
    for name in models:
        f = forward_flops(name, batch)
        for loss, tscnc in LOSSES:
            before = peak(peak_n, 3)["gflops"]
            r = train_step._time_step(name, loss, tscnc, batch, repeats)
            r["peak_gflops"] = max(before, peak(peak_n, 3)["gflops"])
            r["forward_flops"] = f
            r["gflops"] = FORWARDS[loss] * f / r["median_s"] / 1e9
            r["percent_of_peak"] = 100 * r["gflops"] / r["peak_gflops"]
            rows.append(r)
            print(f"{name} {loss} tscnc={tscnc}: {r['median_s'] * 1e3:.1f} ms, "
                  f"{r['gflops']:.1f} GFLOP/s", flush=True)
    return rows


def _have(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def torch_comparison(batch: int, repeats: int) -> dict | None:
    if not _have("torch"):
        return None
    rows = torch_twin.compare(batch, repeats, models=("small_cnn",))
    rows.update(torch_twin.compare(batch, min(repeats, 3), models=("vgg16", "resnet18")))
    return {"steps": rows, "conv_passes": conv_passes.compare(batch, max(repeats, 5))}


def torchattacks_comparison(batch: int, repeats: int) -> dict | None:
    if not _have("torch", "torchattacks"):
        return None
    return torchattacks_twin.compare(batch, repeats, 0.1)


def _update_seconds(tx, params, repeats: int) -> float:
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(lambda s, p: tx.update(zeros, s, p))
    state = tx.init(params)
    _, state = update(state, params)  # past the first update (the tracked CNC's exact seeding)
    return _median_s(lambda s: update(s, params)[0], state, repeats=repeats)


def penalty_overhead(models, trades_s: dict, repeats: int) -> list[dict]:
    rows = []
    for name in models:
        make_model, shape = train_step.MODELS[name]
        params = jax.jit(make_model().init)(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
        # Per kernel, the smallest k with converged gradient cosine >= 0.99 (a faithful gradient).
        ks = st.minimal_k(params, cosine=0.99)
        transforms = {
            "cnc_exact": tj.add_condition_number_penalty(0.01),
            "cnc_tracked_k16": tj.add_tracked_condition_number_penalty(0.01, k=16),
            "cnc_tracked_cos99": tj.add_tracked_condition_number_penalty(0.01, k=ks),
            "tsc": tj.add_transformed_sparsity_penalty(1e-5, a=1.0),
        }
        rows.append({"model": name, "trades_s": trades_s[name], "k_cos99": ks,
                     **{k: _update_seconds(tx, params, repeats) for k, tx in transforms.items()}})
    return rows


def attack_throughput(quick: bool, repeats: int) -> dict:
    only = ["pgd20", "fast"] if quick else ["pgd20", "apgd_ce", "fast", "fast_worst", "standard"]
    return attack_bench.run(quick, repeats, 32 if quick else 128, 0.1, only,
                            train_steps=10 if quick else 100)


def batch_scaling(batches, repeats: int) -> list[dict]:
    return [train_step._time_step("small_cnn", "trades", False, b, repeats) for b in batches]


def to_markdown(r: dict) -> str:
    p = r["peak"]
    m = r["machine"]
    machine = (f"{m['processor']}, {m['cpu_count']} cores, jax {m['jax']} ({m['backend']}, "
               f"{m['devices']} device(s)), OPENBLAS_NUM_THREADS={m['openblas_num_threads']}, "
               f"XLA_FLAGS='{m.get('xla_flags', '')}'")
    out = ["# Benchmarks", "", machine, "",
           "## 1. Practical peak", "",
           f"Jitted float32 {p['n']}x{p['n']} matmul: {p['gflops']:.1f} GFLOP/s "
           f"({p['seconds'] * 1e3:.1f} ms).", "",
           "## 2. Training steps", "",
           f"Batch {r['batch']}, median of {r['repeats']} steps; GFLOP/s in direct-convolution "
           f"terms (forward FLOPs from XLA's cost analysis x forward equivalents per step).", "",
           "| model | step | ms | images/s | GFLOP/s | adjacent peak GFLOP/s | % of peak |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for s in r["train_steps"]:
        step = s["loss"] + ("-10" if s["loss"] != "clean" else "") + (" + TSCNC" * s["tscnc"])
        out.append(f"| {s['model']} | {step} | {s['median_s'] * 1e3:.1f} | "
                   f"{s['images_per_s']:.1f} | {s['gflops']:.1f} | {s['peak_gflops']:.0f} | "
                   f"{s['percent_of_peak']:.1f} |")
    out += ["", "## 3. JAX vs PyTorch", ""]
    if r["torch"] is None:
        out.append("Skipped (`--quick`, or PyTorch not installed: `pip install torch==2.13.0`).")
    else:
        out += ["Same batch, steps of the two frameworks interleaved; medians.", ""]
        out += torch_twin.to_markdown(r["torch"]["steps"])
        out += ["", "ResNet-18 convolutions, each pass on its own (ms; ratio ours / PyTorch):",
                ""]
        out += conv_passes.to_markdown(r["torch"]["conv_passes"])
    out += ["", "## 4. Penalty overhead (optax update, every kernel)", "",
            "| model | TRADES-10 ms | CNC exact | CNC tracked k=16 | CNC tracked, cos >= 0.99 "
            "| TSC | TSC + CNC (cos >= 0.99) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for p_ in r["penalties"]:
        t = p_["trades_s"]
        both = p_["cnc_tracked_cos99"] + p_["tsc"]
        cells = [f"{p_[k] * 1e3:.2f} ms ({100 * p_[k] / t:.1f} %)"
                 for k in ("cnc_exact", "cnc_tracked_k16", "cnc_tracked_cos99", "tsc")]
        cells.append(f"{both * 1e3:.2f} ms ({100 * both / t:.1f} %)")
        out.append(f"| {p_['model']} | {t * 1e3:.1f} | " + " | ".join(cells) + " |")
    out += ["", "k per kernel for cos >= 0.99 (`minimal_k` at initialisation): "
            + "; ".join(f"{p_['model']}: " + ", ".join(f"{n.removesuffix('/kernel')} {k}"
                                                         for n, k in p_["k_cos99"].items())
                        for p_ in r["penalties"]) + "."]
    a = r["attacks"]
    out += ["", "## 5. Attack throughput (small CNN)", "",
            f"Batch {a['batch']}, eps {a['eps']}, synthetic data, model trained for "
            f"{a['train_steps']} steps.", "", "| attack | images/s | robust accuracy |",
            "|---|---:|---:|"]
    for name, w in a["workloads"].items():
        out.append(f"| {name} | {w['images_per_second']:.1f} | {w['robust_accuracy']:.3f} |")
    out += ["", "Against torchattacks (fast-ensemble budgets, same weights and batch, "
            "interleaved):", ""]
    if r["torchattacks"] is None:
        out.append("Skipped (`--quick`, or torch / torchattacks not installed).")
    else:
        out += torchattacks_twin.to_markdown(r["torchattacks"])
    out += ["", "## 6. Scaling", "", "CNC value + gradient per kernel (ms):", "",
            "| fan_in x fan_out | exact | tracked k=16 |", "|---|---:|---:|"]
    for k in r["kernels"]:
        out.append(f"| {k['matrix']} | {k['exact_ms']:.2f} | {k['tracked_ms'][16]:.2f} |")
    out += ["", "Small CNN TRADES-10 step against batch size:", "",
            "| batch | ms | images/s |", "|---:|---:|---:|"]
    for b in r["batches"]:
        out.append(f"| {b['batch']} | {b['median_s'] * 1e3:.1f} | {b['images_per_s']:.1f} |")
    return "\n".join(out) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_bool("quick", False, "smoke sizes (about a minute)")
    flags.DEFINE_integer("repeats", None, "default 5 (1 with --quick)")
    flags.DEFINE_integer("batch", None, "default 128 (16 with --quick)")
    flags.DEFINE_string("out", None, "write the markdown here and its JSON twin next to it")


def main(argv) -> None:
    common.check_no_arguments(argv)
    quick = FLAGS.quick
    repeats = FLAGS.repeats or (1 if quick else 5)
    batch = FLAGS.batch or (16 if quick else 128)
    if repeats < 1 or batch < 1:
        raise app.UsageError("--repeats and --batch must be >= 1")
    models = ["small_cnn"] if quick else ["small_cnn", "vgg16", "resnet18"]
    r = {"machine": common.machine_info(), "quick": quick, "batch": batch, "repeats": repeats}
    r["peak"] = peak(1024 if quick else 4096, repeats if quick else 10)
    r["train_steps"] = train_steps(models, batch, repeats, r["peak"]["n"])
    trades_s = {s["model"]: s["median_s"] for s in r["train_steps"]
                if s["loss"] == "trades" and not s["tscnc"]}
    r["torch"] = None if quick else torch_comparison(batch, repeats)
    r["penalties"] = penalty_overhead(models, trades_s, repeats)
    r["attacks"] = attack_throughput(quick, repeats)
    r["torchattacks"] = None if quick else torchattacks_comparison(batch, min(repeats, 3))
    matrices = cnc_estimator.MATRICES[:2] if quick else cnc_estimator.MATRICES
    r["kernels"] = cnc_estimator.bench_kernels(matrices, [16], repeats)
    r["batches"] = batch_scaling([8, 16] if quick else [32, 64, 128, 256], repeats)
    common.report(to_markdown(r), r, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
