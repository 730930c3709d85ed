"""Exact smooth CNC (an SVD per kernel) against the tracked estimator, per kernel and per model.

    python -m benchmarks.cnc_estimator [--quick] [--repeats N] [--ks 1,4,16,64]
                                       [--out benchmarks/results/cnc_estimator.md]

Per kernel (He-initialised ``fan_in x fan_out`` matrices, the shapes of VGG/WRN 3x3 convs), side
by side in one run, jitted, median over ``--repeats`` calls after compilation, float32:

* exact: ``jax.value_and_grad`` of :func:`tscnc_jax.smooth_log_condition_number` (full SVD);
* tracked ``k``: one step of :mod:`tscnc_jax.spectral_tracking` as the optax transformation runs
  it between resynchronisations (Gram matrix, Cholesky, 2 warm-started iterations per block,
  Rayleigh-Ritz, value and gradient of the tracked surrogate);
* resync: the exact seeding (a thin SVD), paid once every ``resync_every`` (100) steps;
* cos: the gradient cosine between tracked and exact surrogate at convergence for this matrix
  (:func:`tscnc_jax.spectral_tracking.converged_gradient_cosine`, tau 0.1, delta 1e-3), and the
  smallest ``k`` reaching 0.99.

Per model (the small CNN, 28x28x1, and VGG-16, CIFAR shapes, from :func:`tscnc_jax.create_model`
at their flax initialisation): the jitted ``update`` of
:func:`tscnc_jax.add_condition_number_penalty`
against :func:`~tscnc_jax.spectral_tracking.add_tracked_condition_number_penalty` on a
non-resynchronising step, plus the worst kernel's converged gradient cosine. ``--quick`` keeps
the kernels up to 1152x128, the small CNN and 3 repeats.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import tscnc_jax as tj
from benchmarks import common
from tscnc_jax import spectral_tracking as st

TAU, DELTA, ITERATIONS, RESYNC_EVERY = 0.1, 1e-3, 2, 100
MATRICES = [(64, 64), (256, 256), (576, 64), (1152, 128), (2304, 256), (4608, 512)]
MODELS = {
    "small_cnn": (lambda: tj.create_model("small_cnn"), (28, 28, 1)),
    "vgg16_cifar": (lambda: tj.create_model("vgg", depth=16), (32, 32, 3)),
}

FLAGS = flags.FLAGS


def _tracked_step(params, vectors):
    vectors = st.refine_tracked_vectors(params, vectors, iterations=ITERATIONS)
    value, grads = jax.value_and_grad(lambda p: st.tracked_condition_number_penalty(
        p, vectors, temperature=TAU, delta=DELTA))(params)
    return value, grads, vectors


def _cosines(s: np.ndarray, ks: list[int]) -> dict:
    cos = {k: st.converged_gradient_cosine(s, k=k, temperature=TAU, delta=DELTA) for k in ks}
    k99 = next(k for k in range(1, s.size + 1)
               if st.converged_gradient_cosine(s, k=k, temperature=TAU, delta=DELTA) >= 0.99)
    return {"cosine": cos, "k_for_0.99": k99}


def bench_kernels(matrices, ks, repeats) -> list[dict]:
    exact = jax.jit(jax.value_and_grad(
        lambda w: tj.smooth_log_condition_number(w, temperature=TAU, delta=DELTA)))
    tracked = jax.jit(_tracked_step)
    rows = []
    for i, (m, n) in enumerate(matrices):
        w = jax.random.normal(jax.random.key(i), (m, n)) * np.sqrt(2.0 / m)
        params = {"w": w}
        row = {"matrix": f"{m}x{n}", "exact_ms": common.median_ms(exact, w, repeats=repeats),
               "tracked_ms": {}, "resync_ms": {}}
        for k in ks:
            seed = jax.jit(lambda p, k=k: st.init_tracked_vectors(p, k=k))
            vectors = seed(params)
            row["tracked_ms"][k] = common.median_ms(tracked, params, vectors, repeats=repeats)
            row["resync_ms"][k] = common.median_ms(seed, params, repeats=repeats)
        row.update(_cosines(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False), ks))
        rows.append(row)
        print(f"  {row['matrix']}: exact {row['exact_ms']:.2f} ms, tracked "
              + ", ".join(f"k={k} {t:.2f}" for k, t in row["tracked_ms"].items()), flush=True)
    return rows


def bench_models(models, ks, repeats) -> dict:
    out = {}
    for name in models:
        make_model, shape = MODELS[name]
        params = jax.jit(make_model().init)(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
        zeros = jax.tree.map(jnp.zeros_like, params)
        spectra = tj.spectral.tree_singular_values(params)
        n_kernel = int(sum(np.prod(w.shape) for _, w, _ in tj.named_leaves(params)))
        exact_tx = tj.add_condition_number_penalty(1.0, temperature=TAU, delta=DELTA)
        exact_update = jax.jit(exact_tx.update)
        entry = {"kernels": len(spectra), "kernel_params": n_kernel,
                 "exact_ms": common.median_ms(exact_update, zeros, exact_tx.init(params), params,
                                        repeats=repeats),
                 "tracked": {}}
        for k in ks:
            tx = st.add_tracked_condition_number_penalty(
                1.0, temperature=TAU, delta=DELTA, k=k, iterations=ITERATIONS,
                resync_every=RESYNC_EVERY)
            update = jax.jit(tx.update)
            t0 = time.perf_counter()
            _, state = update(zeros, tx.init(params), params)  # count 0: exact seeding
            jax.block_until_ready(state)
            first_s = time.perf_counter() - t0
            seeded = state
            worst = min(st.converged_gradient_cosine(s, k=k, temperature=TAU, delta=DELTA)
                        for s, _ in spectra.values())
            entry["tracked"][k] = {
                "step_ms": common.median_ms(update, zeros, seeded, params, repeats=repeats),
                "first_call_s": first_s,
                "worst_kernel_cosine": worst,
            }
            print(f"  {name} k={k}: {entry['tracked'][k]['step_ms']:.2f} ms "
                  f"(exact {entry['exact_ms']:.2f})", flush=True)
        entry["k_for_0.99"] = {n: _cosines(s, [1])["k_for_0.99"] for n, (s, _) in spectra.items()}
        out[name] = entry
    return out



def to_markdown(results: dict) -> str:
    m, ks = results["machine"], results["ks"]
    lines = [
        "# CNC: exact SVD vs tracked extreme singular values",
        "",
        f"jax {m['jax']} on {m['backend']} ({m['cpu_count']} cores, {m['processor']}, "
        f"OPENBLAS_NUM_THREADS={m['openblas_num_threads']}); median of {results['repeats']} "
        f"runs after compilation, float32, tau {TAU}, delta {DELTA}, {ITERATIONS} iterations per "
        "step. Tracked = one step between resynchronisations; amortised adds the exact seeding "
        f"every {RESYNC_EVERY} steps. cos = converged gradient cosine with the exact surrogate "
        "at this (He-initialised) matrix.",
        "",
        "## Per kernel: value + gradient, ms",
        "",
        "| fan_in x fan_out | exact | " + " | ".join(f"tracked k={k}" for k in ks)
        + " | resync (SVD) | speed-up k=1 (amortised) | "
        + " | ".join(f"cos k={k}" for k in ks) + " | k for cos 0.99 |",
        "|---|---:|" + "---:|" * len(ks) + "---:|---:|" + "---:|" * len(ks) + "---:|",
    ]
    for r in results["kernels"]:
        k1 = ks[0]
        amortised = r["tracked_ms"][k1] + r["resync_ms"][k1] / RESYNC_EVERY
        lines.append(
            f"| {r['matrix']} | {r['exact_ms']:.2f} | "
            + " | ".join(f"{r['tracked_ms'][k]:.2f}" for k in ks)
            + f" | {r['resync_ms'][k1]:.2f} | {r['exact_ms'] / amortised:.1f}x | "
            + " | ".join(f"{r['cosine'][k]:.3f}" for k in ks)
            + f" | {r['k_for_0.99']} |")
    lines += [
        "",
        "## Whole model: the penalty transformation's update (value + gradient), ms",
        "",
        "| model | kernels | kernel params | exact | "
        + " | ".join(f"tracked k={k}" for k in ks) + " | "
        + " | ".join(f"worst cos k={k}" for k in ks) + " |",
        "|---|---:|---:|---:|" + "---:|" * (2 * len(ks)),
    ]
    for name, e in results["models"].items():
        lines.append(
            f"| {name} | {e['kernels']} | {e['kernel_params']:,} | {e['exact_ms']:.1f} | "
            + " | ".join(f"{e['tracked'][k]['step_ms']:.1f}" for k in ks) + " | "
            + " | ".join(f"{e['tracked'][k]['worst_kernel_cosine']:.3f}" for k in ks) + " |")
    for name, e in results["models"].items():
        lines += ["", f"Smallest k with converged gradient cosine >= 0.99, {name}: "
                  + ", ".join(f"{n.removesuffix('/kernel')} {k}"
                              for n, k in e["k_for_0.99"].items())]
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_bool("quick", False, "kernels up to 1152x128, small CNN only, 3 repeats")
    flags.DEFINE_integer("repeats", None, "default 10 (3 with --quick)")
    flags.DEFINE_string("ks", "1,4,16,64", "block sizes k to time")
    flags.DEFINE_string("out", None, "markdown output (JSON next to it); default "
                        "benchmarks/results/cnc_estimator[_quick].md")


def main(argv) -> None:
    common.check_no_arguments(argv)
    repeats = FLAGS.repeats if FLAGS.repeats is not None else (3 if FLAGS.quick else 10)
    if repeats < 1:
        raise app.UsageError("--repeats must be >= 1")
    try:
        ks = [int(k) for k in FLAGS.ks.split(",")]
    except ValueError:
        raise app.UsageError(f"--ks must be comma-separated integers, got {FLAGS.ks!r}") from None
    if not ks or min(ks) < 1:
        raise app.UsageError("--ks must be positive integers")
    out = FLAGS.out
    if out is None:
        name = "cnc_estimator_quick.md" if FLAGS.quick else "cnc_estimator.md"
        out = pathlib.Path(__file__).with_name("results") / name
    matrices = [mn for mn in MATRICES if not FLAGS.quick or mn[0] * mn[1] <= 1152 * 128]
    models = ["small_cnn"] if FLAGS.quick else list(MODELS)
    print("kernels:", flush=True)
    kernels = bench_kernels(matrices, ks, repeats)
    print("models:", flush=True)
    results = {"machine": common.machine_info(), "repeats": repeats, "ks": ks, "kernels": kernels,
               "models": bench_models(models, ks, repeats)}
    common.report(to_markdown(results), results, out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
