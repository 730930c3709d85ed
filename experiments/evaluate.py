"""AutoAttack's standard ensemble on a finished run's test images, resumable chunk by chunk.

    python -m experiments.evaluate --workdir=runs/study/lenet5_hydra_95_s0 \\
        --summaries=docs/results/study                  # all the run's test images
    python -m experiments.evaluate --workdir=... --num=2000 --chunk=500
    python -m experiments.evaluate --workdir=... --spectral --summaries=...  # see spectral()

A run evaluates the standard ensemble on the first ``config.eval.num_standard`` test images only
(the short schedule: 500), because on a CPU it costs about 4 s per image for a robust model; this
module runs it afterwards on up to all of the run's ``num_test`` images, from the run's final
checkpoints (it never trains: an unfinished run is an error that names the missing checkpoint).

Each chunk of ``--chunk`` images is one call of :func:`tscnc_jax.evaluate_robustness` with the
key ``fold_in(key(seed + 8), first image)``; the first chunk uses the run's own ``key(seed + 8)``,
so one chunk of the run's ``num_standard`` images reproduces its numbers exactly. Its per-image
outcome (clean-correct, index of the first attack that broke it) is written atomically to
``<workdir>/standard/<first>.json`` as soon as it is done; a killed evaluation resumes at the
first missing chunk. When every chunk is there, the totals go to ``<workdir>/standard.json``
and, with ``--summaries``, to ``<summaries>/<run>/standard.json``, where
:mod:`experiments.report` reads them in place of the run's own standard-ensemble numbers.
Chunks are independent: two processes may share a run's chunks (``--first``/``--last`` select
a range), each pinned to one core; a chunk another process finished meanwhile is skipped (one
being evaluated by both at once is done twice, with the same result).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in experiments.main

import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags, logging

import tscnc_jax as tj
from experiments import train
from experiments.configs import base

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined when run as a program only: importing the module (tests) must not register flags
    # that other entry points (experiments.main, demo, study) also define.
    flags.DEFINE_string("workdir", None, "A finished run's directory (holds summary.json).")
    flags.DEFINE_integer("num", None, "Test images to evaluate (default: the run's num_test).")
    flags.DEFINE_integer("chunk", 500, "Images per resumable chunk.")
    flags.DEFINE_integer("first", 0, "Evaluate only chunks starting at or after this image.")
    flags.DEFINE_integer("last", None, "Evaluate only chunks starting before this image.")
    flags.DEFINE_string("summaries", None, "Also copy standard.json to <summaries>/<run>/.")
    flags.DEFINE_bool("spectral", False, "Instead of attacking: recompute the run's spectral "
                      "report (kappa, operator kappa, ...) with the current definitions into "
                      "spectral.json (and <summaries>/<run>/), which the report reads in place "
                      "of the summary's.")
    flags.mark_flags_as_required(["workdir"])

ATTACKS = "standard"


def chunk_starts(num: int, chunk: int) -> list[int]:
    """First image of every chunk of ``chunk`` images covering ``num``."""
    if num <= 0 or chunk <= 0:
        raise ValueError(f"--num={num} and --chunk={chunk} must be positive.")
    return list(range(0, num, chunk))


def evaluate_chunk(config, logits_fn, x: np.ndarray, y: np.ndarray, start: int) -> dict:
    """The standard ensemble on one chunk; per-image outcomes plus what the report needs."""
    batches = [(x[i:i + config.batch_size], y[i:i + config.batch_size])
               for i in range(0, len(y), config.batch_size)]
    key = train.standard_key(config)  # the run's own
    t0 = time.time()
    rep = tj.evaluate_robustness(
        logits_fn, batches, eps=config.eps, attacks=ATTACKS,
        key=key if start == 0 else jax.random.fold_in(key, start), progress=config.progress)
    return {"start": start, "num": len(y), "attacks": list(rep.attacks),
            "clean_correct": [int(v) for v in rep.clean_correct],
            "broken_by": [int(v) for v in rep.broken_by],
            "warnings": list(rep.warnings), "seconds": time.time() - t0}


def combine(chunks: list[dict], num: int) -> dict:
    """Totals over chunks that cover images ``0 .. num - 1`` exactly once.

    ``standard_per_attack`` is cumulative (accuracy after each attack, in order, as AutoAttack
    prints it); ``standard_ensemble_acc`` is the accuracy after all of them.
    """
    chunks = sorted(chunks, key=lambda c: c["start"])
    covered = [i for c in chunks for i in range(c["start"], c["start"] + c["num"])]
    if covered != list(range(num)):
        raise ValueError(f"chunks cover images {covered[:1]}..{covered[-1:]} "
                         f"({len(covered)} in all), not exactly 0..{num - 1}.")
    names = chunks[0]["attacks"]
    if any(c["attacks"] != names for c in chunks):
        raise ValueError("chunks were evaluated with different attacks.")
    clean = np.concatenate([np.asarray(c["clean_correct"], bool) for c in chunks])
    broken = np.concatenate([np.asarray(c["broken_by"], np.int64) for c in chunks])
    robust = clean & (broken < 0)
    per_attack = {name: float(np.mean(clean & ((broken < 0) | (broken > i))))
                  for i, name in enumerate(names)}
    return {"num_standard": num, "standard_attacks": names,
            "standard_clean_acc": float(np.mean(clean)),
            "standard_ensemble_acc": float(np.mean(robust)),
            "standard_per_attack": per_attack,
            "standard_attack_warnings": [f"images {c['start']}-{c['start'] + c['num'] - 1}: {w}"
                                         for c in chunks for w in c["warnings"]],
            "standard_seconds": float(sum(c["seconds"] for c in chunks)),
            "chunk_starts": [c["start"] for c in chunks]}


def run(workdir: str | pathlib.Path, *, num: int | None = None, chunk: int = 500,
        first: int = 0, last: int | None = None) -> dict | None:
    """Evaluates the missing chunks in ``[first, last)``; returns the totals once all exist."""
    workdir = pathlib.Path(workdir)
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} does not exist: --workdir must be a finished run "
                                f"(python -m experiments.main ... --workdir={workdir}).")
    summary = json.loads(summary_path.read_text())
    config = base.from_summary(summary["config"])
    num_test = int(summary["num_test"])
    num = num_test if num is None else num
    if not 0 < num <= num_test:
        raise ValueError(f"--num={num} must be in [1, {num_test}] (the run's num_test).")
    starts = chunk_starts(num, chunk)
    out_dir = workdir / "standard"
    out_dir.mkdir(exist_ok=True)
    for path in sorted(out_dir.glob("*.json")):  # chunks kept from an earlier call
        start = int(path.stem)
        if start < num and (start not in starts
                            or json.loads(path.read_text())["num"] != min(chunk, num - start)):
            raise ValueError(f"{out_dir} holds chunks of another --chunk size ({path.name}); "
                             f"use that size, or delete the directory to start again.")
    todo = [s for s in starts if s >= first and (last is None or s < last)
            and not (out_dir / f"{s:06d}.json").exists()]
    if todo:
        _, _, trained = _finished_run(workdir)
        logits_fn = train.logits_function(config, trained.model, trained.state)
        x, y = train.test_arrays(trained.data, num)
        for s in todo:
            path = out_dir / f"{s:06d}.json"
            if path.exists():  # another process sharing this run's chunks finished it meanwhile
                continue
            result = evaluate_chunk(config, logits_fn, x[s:s + chunk], y[s:s + chunk], s)
            train._write_atomic(path, json.dumps(result))
            logging.warning("%s: images %d-%d, standard ensemble %.2f %% in %.0f s", workdir,
                            s, s + result["num"] - 1,
                            100 * np.mean(np.asarray(result["clean_correct"], bool)
                                          & (np.asarray(result["broken_by"]) < 0)),
                            result["seconds"])
    paths = [out_dir / f"{s:06d}.json" for s in starts]
    if not all(p.exists() for p in paths):
        return None
    chunks = [json.loads(p.read_text()) for p in paths]
    totals = combine(chunks, num)
    if num == num_test and abs(totals["standard_clean_acc"] - summary["clean_acc"]) >= 1e-9:
        raise ValueError(f"clean accuracy {totals['standard_clean_acc']} differs from the "
                         f"summary's {summary['clean_acc']}: not the model the summary evaluated.")
    train._write_atomic(workdir / "standard.json", json.dumps(totals, indent=2))
    return totals


def _finished_run(workdir: pathlib.Path):
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} does not exist: --workdir must be a finished run "
                                f"(python -m experiments.main ... --workdir={workdir}).")
    summary = json.loads(summary_path.read_text())
    config = base.from_summary(summary["config"])
    trained = train.restore(config, workdir)
    if int(trained.state.step) != int(summary["evaluated_step"]):
        raise ValueError(f"{workdir}'s checkpoint is at step {int(trained.state.step)}, its "
                         f"summary at step {summary['evaluated_step']}.")
    return summary, config, trained


def spectral(workdir: str | pathlib.Path) -> dict:
    """The run's spectral report recomputed with the current definitions (``spectral.json``).

    ``experiments.train.spectral_report`` of the evaluated network and of the dense model a
    pruned run started from. Summaries keep what their run measured; when a definition changes
    (the live rank, the operator's live channels), this records the new values beside them and
    :mod:`experiments.report` reads them instead. The spectral norms do not depend on any such
    definition: they must equal the summary's, or the checkpoints are not the summarised model.
    """
    workdir = pathlib.Path(workdir)
    summary, config, trained = _finished_run(workdir)
    params = train.evaluated_params(config, trained.state)
    report = train.spectral_report(params, trained.masks,
                                   train.conv_inputs(trained.model, trained.state, trained.data))
    for name, value in summary["sigma_max"].items():
        if not np.isclose(report["sigma_max"][name], value, rtol=1e-6, atol=0.0):
            raise ValueError(f"{workdir}: sigma_max of {name} is {report['sigma_max'][name]}, the "
                             f"summary's {value}: not the model the summary evaluated.")
    out = dict(report)
    if trained.dense_report is not None:
        before = trained.dense_report
        out.update(dense_kappa=before["kappa"], dense_sigma_max=before["sigma_max"],
                   **{"dense_weights_below_1e-3": before["weights_below_1e-3"]})
        if "operator_kappa" in before:
            out["dense_operator_kappa"] = before["operator_kappa"]
    train._write_atomic(workdir / "spectral.json", json.dumps(out, indent=2))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    tj.xla_cpu.set_fast_cpu_flags()
    if FLAGS.spectral:
        workdir = pathlib.Path(FLAGS.workdir)
        spectral(workdir)
        if FLAGS.summaries:
            dest = pathlib.Path(FLAGS.summaries) / workdir.name
            if not (dest / "summary.json").exists():
                raise FileNotFoundError(f"{dest / 'summary.json'} does not exist: --summaries "
                                        f"must hold this run's kept summary.")
            train._write_atomic(dest / "spectral.json", (workdir / "spectral.json").read_text())
        print(f"{workdir}: spectral report recomputed into spectral.json")
        return
    totals = run(FLAGS.workdir, num=FLAGS.num, chunk=FLAGS.chunk, first=FLAGS.first,
                 last=FLAGS.last)
    if totals is None:
        print(f"{FLAGS.workdir}: chunks in [{FLAGS.first}, {FLAGS.last}) done; others missing.")
        return
    workdir = pathlib.Path(FLAGS.workdir)
    if FLAGS.summaries:
        dest = pathlib.Path(FLAGS.summaries) / workdir.name
        if not (dest / "summary.json").exists():
            raise FileNotFoundError(f"{dest / 'summary.json'} does not exist: --summaries must "
                                    f"hold this run's kept summary.")
        train._write_atomic(dest / "standard.json", (workdir / "standard.json").read_text())
    print(f"{workdir}: standard ensemble {100 * totals['standard_ensemble_acc']:.2f} % on "
          f"{totals['num_standard']} images (clean {100 * totals['standard_clean_acc']:.2f} %), "
          f"{totals['standard_seconds'] / 60:.1f} min; per attack "
          + ", ".join(f"{k} {100 * v:.2f}" for k, v in totals["standard_per_attack"].items()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
