"""The experiments' training loop before and after its data-parallel path, interleaved.

    python -m benchmarks.loop [--steps 20] [--repeats 5] [--batch 128] [--out FILE]

Three loops over the same Fashion-MNIST-shaped batches (random data; the small CNN, TRADES-10 +
TSCNC as in ``hydra_tscnc``), each timed per step over ``--steps`` steps after a warm-up, the
three alternating in every repeat (median of repeats):

* ``jit + per-step sync`` (the loop before): ``jax.jit(make_train_step(...))``, numpy batches,
  ``float(metrics["finite"])`` after every step;
* ``data_parallel + prefetch``: the loop now (``experiments/train.py``): the step built with
  ``axis_name`` and mapped by ``tscnc_jax.parallel.data_parallel`` over every device (one
  here), batches placed two ahead by ``parallel.prefetch``, finiteness read once per 50 steps;
* the same with ``conv_impl="cpu"`` forced: on the CPU, ``"auto"`` must compile to the same
  program (no regression from the backend gate).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags

import tscnc_jax as tj
from benchmarks import common
from tscnc_jax import parallel, training

FLAGS = flags.FLAGS


def _batches(n: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [common.random_batch(rng, batch, (28, 28, 1)) for _ in range(n)]


def _setup(conv_impl: str, axis_name):
    model = tj.create_model("small_cnn", conv_impl=conv_impl)
    tx = training.make_optimizer(0.05, cnc_weight=1.0, tsc_weight=3e-5)
    state = training.create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    step = training.make_train_step(model, tx, loss="trades", axis_name=axis_name,
                                    attack=training.default_attack("trades", eps=0.1, steps=10))
    return state, step


def make_loops(batch: int, steps: int) -> dict:
    """``{name: run()}``: each ``run`` trains ``steps`` steps from the same start state and
    returns the final state (blocked on)."""
    data = _batches(steps, batch)
    loops = {}
    state0, step = _setup("auto", None)
    jitted = jax.jit(step)

    def before():
        state = state0
        for b in data:
            state, metrics = jitted(state, b)
            if float(metrics["finite"]) != 1.0:  # the per-step sync of the old loop
                raise FloatingPointError("non-finite step")
        return jax.block_until_ready(state)

    loops["jit + per-step sync (before)"] = before
    mesh = parallel.make_mesh()
    for impl in ("auto", "cpu"):
        state_dp, step_dp = _setup(impl, parallel.BATCH_AXIS)
        mapped = parallel.data_parallel(step_dp, mesh=mesh)

        def after(mapped=mapped, state_dp=state_dp):
            state, pending = parallel.replicate(state_dp, mesh), []
            for i, b in enumerate(parallel.prefetch(data, mesh)):
                state, metrics = mapped(state, b)
                pending.append(metrics["finite"])
                if (i + 1) % 50 == 0 or i + 1 == len(data):
                    if any(float(f) != 1.0 for f in jax.device_get(pending)):
                        raise FloatingPointError("non-finite step")
                    pending = []
            return jax.block_until_ready(state)

        loops[f"data_parallel + prefetch, conv_impl={impl} (after)"] = after
    return loops


def define_flags() -> None:
    """This entry point's flags (defined when it runs as a program only; see :mod:`benchmarks`)."""
    flags.DEFINE_integer("steps", 20, "Steps per timed loop.")
    flags.DEFINE_integer("repeats", 5, None)
    flags.DEFINE_integer("batch", 128, None)
    flags.DEFINE_string("out", None, None)


def main(argv) -> None:
    common.check_no_arguments(argv)
    loops = make_loops(FLAGS.batch, FLAGS.steps)
    for run in loops.values():  # compile
        run()
    times = {name: [] for name in loops}
    names = list(loops)
    for r in range(FLAGS.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            loops[name]()
            times[name].append((time.perf_counter() - t0) / FLAGS.steps)
    base = statistics.median(times[names[0]])
    info = common.machine_info()
    lines = ["# The training loop before and after the data-parallel path", "",
             f"jax {info['jax']}, {info['backend']}, {info['devices']} device(s), "
             f"{info['cpu_count']} CPUs; small CNN, TRADES-10 + TSCNC (CNC 1.0, TSC 3e-5), batch "
             f"{FLAGS.batch}; {FLAGS.steps} steps per loop, the loops interleaved, median of "
             f"{FLAGS.repeats} repeats.", "",
             "| loop | ms / step | relative to before |", "|---|---:|---:|"]
    results = []
    for name in names:
        med = statistics.median(times[name])
        results.append({"loop": name, "ms_per_step": 1e3 * med, "times_s": times[name]})
        lines.append(f"| {name} | {1e3 * med:.1f} | {med / base:.3f} |")
    common.report("\n".join(lines) + "\n", {"machine": info, "rows": results}, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
