"""Launches a pipeline run: ``python -m experiments.main --config=<file>[:smoke] --workdir=<dir>``.

Overrides: ``--config.prune.sparsity=0.95``; unknown keys are rejected. Rerunning the same command
resumes from the workdir's checkpoints. ``--distributed`` calls ``jax.distributed.initialize()``
first (multi-host runs); nothing else changes.
"""

import os

# The SVDs of the condition-number penalty run in LAPACK (OpenBLAS) inside XLA's own thread pool;
# OpenBLAS threads then compete with XLA's and, on a busy CPU, spin: measured here, the CNC
# penalty's cost inside a TRADES step fell to within noise with one OpenBLAS thread. Set before
# NumPy/JAX load OpenBLAS; an explicit environment setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app, flags, logging
from ml_collections import config_flags

import tscnc_jax as tj
from experiments import evaluate, train

# XLA:CPU's faster convolution path for our models (tscnc_jax/xla_cpu.py); before any computation.
tj.xla_cpu.set_fast_cpu_flags()

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    config_flags.DEFINE_config_file("config", None, "Config file (optionally :smoke).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    # orbax logs every save at INFO; the progress bar and metrics.jsonl say what matters.
    logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    config.stages = train.split_stages(config.stages)  # --config.stages=prune,finetune
    summary = evaluate.train_and_evaluate(config, FLAGS.workdir)
    if config.eval.final:
        print(evaluate.results_markdown([summary]))
    else:
        print(f"Trained {','.join(summary['stages'])} to step {summary['trained_step']} in "
              f"{FLAGS.workdir}; not evaluated (config.eval.final=False).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
