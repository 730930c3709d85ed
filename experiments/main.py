"""Launches a pipeline run: ``python -m experiments.main --config=<file>[:smoke] --workdir=<dir>``.

Overrides: ``--config.prune.sparsity=0.95``; unknown keys are rejected. Rerunning the same command
resumes from the workdir's checkpoints.

Every run is data-parallel over all the devices it sees (``tscnc_jax.parallel``). Across hosts,
start one process per host with the same command plus ``jax.distributed``'s three settings::

    python -m experiments.main --config=... --workdir=/shared/run \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # on host 0
    ...                                    --num_processes=2 --process_id=1   # on host 1

or ``--distributed`` alone where JAX detects the cluster itself (TPU pods, SLURM, Open MPI,
Kubernetes jobs). Each process reads its own rows of every global batch; process 0 writes the
logs and the summary; checkpoints are saved and restored by every process together.
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

#: How long a finished process of a multi-process run waits for the others (JAX's default: 300).
SHUTDOWN_TIMEOUT_SECONDS = 3600


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    config_flags.DEFINE_config_file("config", None, "Config file (optionally :smoke).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host); "
                      "with none of the three flags below, JAX detects the cluster.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordination "
                        "service (implies --distributed).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
    flags.mark_flags_as_required(["config", "workdir"])


def distributed_arguments(distributed: bool, coordinator_address: str | None,
                          num_processes: int | None, process_id: int | None) -> dict | None:
    """The keyword arguments of ``jax.distributed.initialize`` the flags ask for (``None``: a
    single-process run); ``app.UsageError`` naming the flag for a bad or incomplete set."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if not distributed and all(v is None for v in given.values()):
        return None
    if any(v is None for v in given.values()):
        if all(v is None for v in given.values()):
            return {}  # --distributed alone: the cluster is detected
        missing = [f"--{k}" for k, v in given.items() if v is None]
        raise app.UsageError(f"{', '.join(missing)} missing: give --coordinator_address, "
                             f"--num_processes and --process_id together (or --distributed "
                             f"alone to detect the cluster).")
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise app.UsageError(f"--coordinator_address={coordinator_address!r} must be host:port.")
    if num_processes < 1:
        raise app.UsageError(f"--num_processes={num_processes} must be >= 1.")
    if not 0 <= process_id < num_processes:
        raise app.UsageError(f"--process_id={process_id} must be in [0, {num_processes}).")
    return given


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    init = distributed_arguments(FLAGS.distributed, FLAGS.coordinator_address,
                                 FLAGS.num_processes, FLAGS.process_id)
    if init is not None:
        import jax

        # A process that finishes first waits at the shutdown barrier for the others; the
        # final evaluation's last steps can leave them minutes apart on a loaded machine.
        jax.distributed.initialize(**init, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_SECONDS)
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
