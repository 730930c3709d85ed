"""Cost of the TSCNC penalties on real architectures' kernels.

    python -m benchmarks.penalties [--quick] [--repeats N] [--out benchmarks/results/penalties.md]

Times ``jax.value_and_grad`` of the full CNC penalty (exact SVD of every kernel) and of the TSC
penalty, jitted, on the kernels of the small CNN (Fashion-MNIST scale, 421k parameters) and of
VGG-16 (CIFAR-10 shapes, 15M parameters), plus the per-layer CNC cost. Medians over repeats after
compilation; all numbers come from one run on one machine.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

import tscnc_jax as tj
from benchmarks import common

VGG16_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]

FLAGS = flags.FLAGS


def small_cnn_shapes() -> dict[str, tuple[int, ...]]:
    """Conv3x3(1->32), Conv3x3(32->64), Dense(3136->128), Dense(128->10): 421,642 parameters."""
    return {
        "Conv_0/kernel": (3, 3, 1, 32),
        "Conv_1/kernel": (3, 3, 32, 64),
        "Dense_0/kernel": (7 * 7 * 64, 128),
        "Dense_1/kernel": (128, 10),
    }


def vgg16_shapes() -> dict[str, tuple[int, ...]]:
    """VGG-16 for 32x32 inputs: 13 3x3 convs, then a 512 -> 10 classifier."""
    shapes, c_in = {}, 3
    for i, c_out in enumerate(VGG16_CHANNELS):
        shapes[f"Conv_{i}/kernel"] = (3, 3, c_in, c_out)
        c_in = c_out
    shapes["Dense_0/kernel"] = (512, 10)
    return shapes


def _init(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: jax.random.normal(k, s) * np.sqrt(2.0 / np.prod(s[:-1]))
        for k, (name, s) in zip(keys, shapes.items(), strict=True)
    }




def run(quick: bool, repeats: int) -> dict:
    cnc = jax.jit(jax.value_and_grad(lambda p: tj.condition_number_penalty(p, temperature=0.1,
                                                                           delta=1e-3)))
    tsc = jax.jit(jax.value_and_grad(lambda p: tj.transformed_sparsity_penalty(p, a=1.0)))
    kernel_cnc = jax.jit(jax.value_and_grad(
        lambda w: tj.smooth_log_condition_number(w, temperature=0.1, delta=1e-3)))
    kernel_value = jax.jit(lambda w: tj.smooth_log_condition_number(w, temperature=0.1,
                                                                    delta=1e-3))
    models = {"small_cnn": small_cnn_shapes(), "vgg16_cifar": vgg16_shapes()}
    results = {"machine": common.machine_info(), "repeats": repeats, "models": {}}
    for model, shapes in models.items():
        params = _init(shapes)
        n_params = int(sum(np.prod(s) for s in shapes.values()))
        entry = {
            "kernel_params": n_params,
            "cnc_value_and_grad_ms": common.median_ms(cnc, params, repeats=repeats),
            "tsc_value_and_grad_ms": common.median_ms(tsc, params, repeats=repeats),
            "layers": {},
        }
        if not quick:
            for name, w in params.items():
                m, n = int(np.prod(w.shape[:-1])), w.shape[-1]
                entry["layers"][name] = {
                    "matrix": f"{m}x{n}",
                    "value_ms": common.median_ms(kernel_value, w, repeats=repeats),
                    "value_and_grad_ms": common.median_ms(kernel_cnc, w, repeats=repeats),
                }
        results["models"][model] = entry
    return results



def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Penalty cost",
        "",
        f"jax {m['jax']} on {m['backend']} ({m['cpu_count']} cores, {m['processor']}); "
        f"median of {results['repeats']} runs after compilation, float32.",
        "",
        "| model | kernel params | CNC value+grad (exact SVD) ms | TSC value+grad ms |",
        "|---|---:|---:|---:|",
    ]
    for model, e in results["models"].items():
        lines.append(f"| {model} | {e['kernel_params']:,} | {e['cnc_value_and_grad_ms']:.2f} | "
                     f"{e['tsc_value_and_grad_ms']:.2f} |")
    for model, e in results["models"].items():
        if not e["layers"]:
            continue
        lines += ["", f"## {model}: per kernel", "",
                  "| kernel | matrix | CNC value ms | CNC value+grad ms |", "|---|---|---:|---:|"]
        for name, layer in e["layers"].items():
            lines.append(f"| {name} | {layer['matrix']} | {layer['value_ms']:.2f} | "
                         f"{layer['value_and_grad_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_bool("quick", False, "skip the per-layer breakdown")
    flags.DEFINE_integer("repeats", 10, None)
    flags.DEFINE_string("out", None, "write markdown here (and JSON next to it)")


def main(argv) -> None:
    common.check_no_arguments(argv)
    if FLAGS.repeats < 1:
        raise app.UsageError("--repeats must be >= 1")
    results = run(FLAGS.quick, FLAGS.repeats)
    text = to_markdown(results)
    common.report(text, results, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
