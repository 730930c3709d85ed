"""``make demo``: dense TRADES, then HYDRA vs HYDRA + TSCNC at 99 % sparsity, on Fashion-MNIST.

    python -m experiments.demo --workdir=runs/demo

Runs the three runs of ``experiments/configs/demo.py`` (HYDRA prunes the dense run's network,
HYDRA + TSCNC fine-tunes HYDRA's pruned network), then prints and writes the comparison table
(``<workdir>/results.md``) and ``kappa_vs_layer.png``. Rerunning resumes; finished runs are
read back from their checkpoints and re-evaluated.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see experiments/main.py

import pathlib
import time
from typing import Any

from absl import app, flags, logging

import tscnc_jax as tj
from experiments import evaluate
from experiments.configs import demo as demo_config
from experiments.reporting import compare

tj.xla_cpu.set_fast_cpu_flags()  # see tscnc_jax/xla_cpu.py

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_string("workdir", "runs/demo", "Directory of the three runs and the comparison.")
    flags.DEFINE_bool("smoke", False, "Seconds-long version on synthetic data (tests).")


def run(workdir: str | pathlib.Path, *, smoke: bool = False,
        overrides: dict[str, Any] | None = None) -> str:
    """Runs the demo in ``workdir`` and returns the comparison table (markdown).

    ``overrides`` maps dotted config keys to values applied to all three runs, e.g.
    ``{"data.num_train": 2048, "eval.num_test": 200}`` (unknown keys raise, as on the command
    line).
    """
    workdir = pathlib.Path(workdir)
    suffix = ",smoke" if smoke else ""
    dirs = []
    for method in demo_config.METHODS:
        config = demo_config.get_config(method + suffix)
        for key, value in (overrides or {}).items():
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = getattr(node, p)
            setattr(node, leaf, value)  # a locked ConfigDict rejects unknown keys by name
        if demo_config.STARTS_FROM[method]:
            with config.unlocked():
                config.init_dir = str(workdir / demo_config.STARTS_FROM[method])
        t0 = time.time()
        evaluate.train_and_evaluate(config, workdir / method)
        print(f"{method}: {time.time() - t0:.0f} s", flush=True)
        dirs.append(workdir / method)
    return compare.compare(dirs, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    t0 = time.time()
    table = run(FLAGS.workdir, smoke=FLAGS.smoke)
    data = "synthetic data (smoke)" if FLAGS.smoke else "Fashion-MNIST"
    num_test = demo_config.get_config("dense,smoke" if FLAGS.smoke else "dense").eval.num_test
    print(f"\n{data}, small CNN, eps 0.1, seed 0; accuracies in % on the first {num_test:,} "
          f"test images (PGD-20; ensemble = APGD-CE, APGD-T, Square); {time.time() - t0:.0f} s "
          f"in all.\n")
    print(table)


if __name__ == "__main__":
    define_flags()
    app.run(main)
