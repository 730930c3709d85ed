"""Where a training step's time goes on XLA:CPU: one traced step, op time by kind.

    python -m benchmarks.profile_step [--model resnet18] [--loss trades] [--top 8]

Runs the step of :mod:`benchmarks.torch_twin` (batch 128) twice, then once under
``jax.profiler.trace`` (Perfetto JSON), and sums the traced duration of every XLA op, grouped by
kind read from the compiled HLO: convolutions (split into input-gradient convolutions with a
dilated input, i.e. strided convs' input gradients, and the rest), YNNPACK fusions,
fusions that write a transposed layout (``transpose_copy_fusion``: XLA:CPU's weight-gradient
convolutions need activations and output gradients with the batch moved into the feature
position), copies, and other fusions. Op events cover the work XLA attributes to an op; Eigen
convolutions run in its thread pool and are only partly attributed, so the sums are a lower
bound of where the time goes, not a partition of the wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common, torch_twin, train_step

_HLO_OP = re.compile(r"^\s*%?([\w.\-]+) = \S+ (convolution|fusion|copy)\((.*)$", re.M)

FLAGS = flags.FLAGS


def _kinds(hlo: str) -> dict[str, str]:
    out = {}
    for name, op, rest in _HLO_OP.findall(hlo):
        if op == "convolution":
            out[name] = "conv, dilated input (strided conv's input grad)" if (
                "lhs_dilate" in rest) else "conv, other"
        elif name.startswith("ynn_fusion"):
            out[name] = "YNNPACK fusion"
        elif "transpose" in name:
            out[name] = "transposing fusion"
        elif op == "copy" or name.startswith("copy"):
            out[name] = "copy"
        else:
            out[name] = "other fusion"
    return out


def profile(model: str, loss: str, batch_size: int = 128) -> dict:
    batch = common.random_batch(np.random.default_rng(0), batch_size, train_step.MODELS[model][1])
    step, state = torch_twin.jax_train_step(model, loss)
    compiled = step.lower(state, batch).compile()
    kinds = _kinds(compiled.as_text())
    for _ in range(2):
        state = jax.block_until_ready(compiled(state, batch))[0]  # the state is donated
    t0 = time.perf_counter()
    state = jax.block_until_ready(compiled(state, batch))[0]
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(compiled(state, batch))
        trace = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = str(e.get("name", ""))
        if e.get("ph") == "X" and (name in kinds or name.startswith("conv_general_dilated")):
            per_op[e["name"]] += e.get("dur", 0) / 1e6
            calls[e["name"]] += 1
    by_kind: dict = collections.defaultdict(lambda: {"seconds": 0.0, "ops": []})
    for name, sec in per_op.items():
        kind = kinds.get(name, "conv, other")
        by_kind[kind]["seconds"] += sec
        by_kind[kind]["ops"].append((sec, name, calls[name]))
    return {"model": model, "loss": loss, "batch": batch_size, "wall_seconds": wall,
            "kinds": {k: {"seconds": v["seconds"], "ops": sorted(v["ops"], reverse=True)}
                      for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["seconds"])}}


def to_markdown(r: dict, top: int = 8) -> list[str]:
    lines = [f"{r['model']} {r['loss']} step, batch {r['batch']}: {r['wall_seconds']:.2f} s wall "
             "(untraced run).", "", "| kind | traced s | % of wall | largest ops (s x calls) |",
             "|---|---:|---:|---|"]
    for kind, v in r["kinds"].items():
        ops = ", ".join(f"{n} {s:.3f} x{c}" for s, n, c in v["ops"][:top])
        lines.append(f"| {kind} | {v['seconds']:.2f} | {100 * v['seconds'] / r['wall_seconds']:.1f}"
                     f" | {ops} |")
    return lines


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_enum("model", "resnet18", sorted(train_step.MODELS), None)
    flags.DEFINE_enum("loss", "trades", ("clean", "pgd_at", "trades"), None)
    flags.DEFINE_integer("top", 4, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    print("\n".join(to_markdown(profile(FLAGS.model, FLAGS.loss), FLAGS.top)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
