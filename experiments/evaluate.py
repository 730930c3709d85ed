"""Evaluation of trained runs, one code path: the final evaluation every run ends with, and
AutoAttack's standard ensemble on more of a finished run's test images, resumable chunk by chunk.

    python -m experiments.evaluate --workdir=runs/study/lenet5_hydra_95_s0 \\
        --summaries=docs/results/study                  # all the run's test images
    python -m experiments.evaluate --workdir=... --num=2000 --chunk=500
    python -m experiments.evaluate --workdir=... --spectral --summaries=...  # see spectral()

:func:`train_and_evaluate` is the pipeline: it trains (or loads) the stages of a config
(``experiments.train``), then :func:`final_evaluation` measures on the first ``eval.num_test``
test images the clean accuracy, PGD (``eval.pgd_steps``) and the ``eval.attacks`` ensemble through
:func:`tscnc_jax.evaluate_robustness` (which asserts that every adversarial example lies in the
eps-ball and in [0, 1]), AutoAttack's standard ensemble on the first ``eval.num_standard``, the
local Lipschitz estimate on the first ``eval.num_lipschitz``, and the spectral report
(:func:`spectral_report`); it writes ``summary.json``, ``results.md`` and the figures. The
test images are shared out in chunks (``eval.chunk``) over the processes of a multi-process run,
and each process attacks its chunks data-parallel over its own devices
(``evaluate_robustness(mesh=tscnc_jax.parallel.local_mesh())``); the per-image outcomes are
gathered, so every process holds the same summary.

The standard ensemble costs about 4 s per image for a robust model on a CPU, so a run evaluates
it on a subset only (the short schedule: 500 images); the command line runs it afterwards on up
to all of the run's ``num_test`` images from the run's final checkpoints (it never trains: an
unfinished run is an error that names the missing checkpoint). Each chunk of ``--chunk`` images
is one :func:`evaluate_chunk`, the function the final evaluation calls too, with the key
``fold_in(key(seed + 8), first image)``; the first chunk uses the run's own ``key(seed + 8)``, so
one chunk of the run's ``num_standard`` images reproduces its numbers exactly. Its per-image
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

import contextlib
import functools
import json
import logging as py_logging
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

import tscnc_jax as tj
from experiments import train
from experiments import workdir as workdir_lib
from experiments.configs import base
from experiments.reporting import plots
from tscnc_jax import models as tj_models
from tscnc_jax import spectral as tj_spectral

log = py_logging.getLogger(__name__)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
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


# ----------------------------------------------------------------------------------------------
# The spectral report.
# ----------------------------------------------------------------------------------------------


def spectral_report(params, masks=None, conv_inputs: dict | None = None) -> dict:
    """Per-layer condition numbers (float64) of the (pruned) kernels, and the product of sigma_max.

    ``kappa`` is each kernel's *live* condition number: the all-zero rows and columns a pruned
    kernel has (dead inputs, dead units) are dropped first, since their singular values are zero
    by structure (``tscnc_jax.spectral.tree_live_condition_numbers``); ``full_kappa`` is the whole
    matrix's, infinite wherever such a row or column exists. Dense kernels have none, so both
    agree there. ``live_kappa`` repeats ``kappa`` under the name older summaries used.
    ``operator_kappa`` is, for each stride-1 convolution in ``conv_inputs``
    (``models.conv_input_shapes``), the live condition number of its circularly padded operator
    on the layer's input grid (``tscnc_jax.spectral.host_conv_operator_condition_number``).
    The weight fractions count kernel entries with ``|w| < 1e-3``, of all and of the non-zero ones.
    """
    spectra = tj_spectral.tree_singular_values(params, masks)  # one SVD per kernel
    full = {name: tj_spectral.host_condition_number(s, shape)
            for name, (s, shape) in spectra.items()}
    sigma_max = {name: float(s[0]) for name, (s, _) in spectra.items()}
    live = tj_spectral.tree_live_condition_numbers(params, masks)
    kappa = {k: v["kappa"] for k, v in live.items()}

    def log10(values):
        return np.log10(np.array(list(values), np.float64))

    report = {"kappa_definition": "live", "kappa": kappa, "full_kappa": full,
              "sigma_max": sigma_max,
              "median_log10_kappa": float(np.median(log10(kappa.values()))),
              "max_log10_kappa": float(np.max(log10(kappa.values()))),
              "median_log10_full_kappa": float(np.median(log10(full.values()))),
              "max_log10_full_kappa": float(np.max(log10(full.values()))),
              "live_kappa": kappa,
              "live_shape": {k: [v["live_rows"], v["live_cols"]] for k, v in live.items()},
              "live_rank": {k: v["live_rank"] for k, v in live.items()},
              "median_log10_live_kappa": float(np.median(log10(kappa.values()))),
              "max_log10_live_kappa": float(np.max(log10(kappa.values()))),
              "lipschitz_upper_bound": float(np.prod(list(sigma_max.values())))}
    weights = [np.abs(np.asarray(jax.device_get(w), np.float64)
                      * (1.0 if m is None else np.asarray(jax.device_get(m), np.float64))).ravel()
               for _, w, m in tj.named_leaves(params, masks)]
    w = np.concatenate(weights) if weights else np.zeros(0)
    report["weights_below_1e-3"] = float(np.mean(w < 1e-3)) if w.size else float("nan")
    nonzero = w[w != 0]
    report["nonzero_weights_below_1e-3"] = (float(np.mean(nonzero < 1e-3)) if nonzero.size
                                            else float("nan"))
    operator = {}
    flat = {name: (leaf, m) for name, leaf, m in tj.named_leaves(params, masks)}
    for name, where in (conv_inputs or {}).items():
        if name in flat and tuple(where["strides"]) == (1, 1):
            leaf, m = flat[name]
            operator[name] = tj_spectral.host_conv_operator_condition_number(
                leaf, where["input"][:2], m)["kappa"]
    if operator:
        report["operator_kappa"] = operator
        report["median_log10_operator_kappa"] = float(np.median(log10(operator.values())))
    return report


def conv_inputs(model, state: tj.TrainState, data) -> dict:
    """Each convolution's input grid, strides and padding (``models.conv_input_shapes``)."""
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    return tj_models.conv_input_shapes(model, variables, data.train_images.shape[1:])


def dense_spectral_fields(config, trained: train.Trained) -> dict:
    """The spectral fields (``dense_kappa``, ``dense_sigma_max``, ...) of the dense model a pruned
    run was pruned from; none for a dense run."""
    if trained.dense is None:
        return {}
    dense = trained.dense
    before = spectral_report(train.evaluated_params(config, dense),
                             conv_inputs=conv_inputs(trained.model, dense, trained.data))
    out = {"dense_kappa": before["kappa"], "dense_sigma_max": before["sigma_max"],
           "dense_weights_below_1e-3": before["weights_below_1e-3"]}
    if "operator_kappa" in before:
        out["dense_operator_kappa"] = before["operator_kappa"]
    return out


# ----------------------------------------------------------------------------------------------
# The final evaluation of a run.
# ----------------------------------------------------------------------------------------------


def logits_function(config, model, state: tj.TrainState):
    """The jitted inference-mode ``x -> logits`` of a trained state."""
    variables = {"params": train.evaluated_params(config, state)}
    if jax.tree.leaves(state.batch_stats):
        variables["batch_stats"] = state.batch_stats
    return jax.jit(functools.partial(model.apply, variables, train=False))


def test_arrays(data, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` test images as float32 in [0, 1] and their int32 labels."""
    return (data.test_images[:n].astype(np.float32) / 255.0,
            data.test_labels[:n].astype(np.int32))


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple]:
    """``(x, y)`` in consecutive batches of ``batch_size`` (the last one shorter)."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def standard_key(config) -> jax.Array:
    """The key of a run's standard ensemble (in the final evaluation and every chunk)."""
    return jax.random.key(config.seed + 8)


def pgd_member(config):
    """The evaluation PGD (``eval.pgd_steps``, ``eval.pgd_step_size``; cross-entropy from a
    uniform start, one key per example) as an ``evaluate_robustness`` attack."""
    attack = train.eval_attack(config)

    def member(logits_fn, x, y, *, key, eps, norm, bounds):
        del eps, norm, bounds  # the config's, which evaluate_robustness is given too
        return attack(logits_fn, x, y, jax.random.split(key, x.shape[0]))

    return member


def evaluate_chunk(config, logits_fn, x: np.ndarray, y: np.ndarray, start: int) -> dict:
    """The standard ensemble on one chunk; per-image outcomes plus what the report needs."""
    key = standard_key(config)  # the run's own
    t0 = time.time()
    rep = tj.evaluate_robustness(
        logits_fn, batches(x, y, config.batch_size), eps=config.eps, attacks=ATTACKS,
        key=key if start == 0 else jax.random.fold_in(key, start), progress=config.progress,
        mesh=tj.parallel.local_mesh())
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


def _chunk_key(key: jax.Array, start: int) -> jax.Array:
    """The key of the chunk of test images starting at ``start`` (``key`` itself for the first,
    so a one-chunk evaluation keeps the run's key)."""
    return key if start == 0 else jax.random.fold_in(key, start)


def _outcomes(report) -> dict:
    return {"attacks": list(report.attacks),
            "clean_correct": [int(v) for v in report.clean_correct],
            "broken_by": [int(v) for v in report.broken_by], "warnings": list(report.warnings)}


def _evaluate_test_chunk(config, logits_fn, x, y, start: int, n_std: int, n_lip: int) -> dict:
    """Every per-image outcome of the final evaluation on the test images ``start ..``
    (``x``, ``y``): PGD, the configured ensemble, the standard ensemble on those of the first
    ``n_std`` images, the local Lipschitz estimate on those of the first ``n_lip``."""
    bs, mesh = config.batch_size, tj.parallel.local_mesh()
    pgd = tj.evaluate_robustness(
        logits_fn, batches(x, y, bs), eps=config.eps, attacks={"pgd": pgd_member(config)},
        key=_chunk_key(jax.random.key(config.seed + 5), start), sanity_checks=False,
        progress=config.progress, mesh=mesh)
    report = tj.evaluate_robustness(
        logits_fn, batches(x, y, bs), eps=config.eps, attacks=config.eval.attacks,
        key=_chunk_key(jax.random.key(config.seed + 6), start), progress=config.progress,
        mesh=mesh)
    out = {"start": start, "num": len(y), "pgd": _outcomes(pgd), "ensemble": _outcomes(report)}
    k_std = max(0, min(n_std - start, len(y)))
    if k_std:
        out["standard"] = evaluate_chunk(config, logits_fn, x[:k_std], y[:k_std], start)
    k_lip = max(0, min(n_lip - start, len(y)))
    lip_jit = jax.jit(lambda xb, kb: tj.local_lipschitz(
        logits_fn, xb, key=kb, eps=config.eps, steps=config.eval.lipschitz_steps))
    lip_key, lip = jax.random.key(config.seed + 7), []
    for i in range(0, k_lip, bs):  # padded to a multiple of the devices (rows are independent)
        xb = x[i:min(i + bs, k_lip)]
        padded = np.concatenate([xb, np.repeat(xb[:1], -len(xb) % mesh.devices.size, 0)])
        values = lip_jit(tj.parallel.shard_batch(padded, mesh),
                         jax.random.fold_in(lip_key, start + i))
        lip += [float(v) for v in np.asarray(values)[:len(xb)]]
    out["lipschitz"] = lip
    return out


def _gather_json(local: list) -> list:
    """Every process's ``local`` list (JSON-serialisable), concatenated in process order."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:raw.size] = raw
    every = multihost_utils.process_allgather(padded)
    return [item for p in range(jax.process_count())
            for item in json.loads(bytes(every[p][:int(sizes[p][0])]).decode())]


def _cascade(records: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Per-image clean correctness and first breaking attack over chunks (in order), the
    attacks' names and the warnings (labelled with their images when there are several
    chunks)."""
    clean = np.concatenate([np.asarray(r["clean_correct"], bool) for r in records])
    broken = np.concatenate([np.asarray(r["broken_by"], np.int64) for r in records])
    several = len(records) > 1
    warnings = [f"images {r['start']}-{r['start'] + len(r['broken_by']) - 1}: {w}" if several
                else w for r in records for w in r["warnings"]]
    return clean, broken, records[0]["attacks"], warnings


def final_evaluation(config, trained: train.Trained) -> dict:
    """The test-set numbers and the spectral report of a trained run (module docstring).

    The test images are evaluated in chunks of ``config.eval.chunk`` (0: one chunk per
    process), each with its own keys (``_chunk_key``); the processes of a multi-process run
    share the chunks out and gather the per-image outcomes, so every process computes the same
    summary, equal to a one-process evaluation with the same chunk size.
    """
    model, data, state, masks = trained.model, trained.data, trained.state, trained.masks
    params = train.evaluated_params(config, state)
    logits_fn = logits_function(config, model, state)
    n = min(config.eval.num_test, data.test_images.shape[0])
    x, y = test_arrays(data, n)
    chunk = config.eval.chunk or -(-n // jax.process_count())
    n_std, n_lip = min(config.eval.num_standard, n), min(config.eval.num_lipschitz, n)
    t0 = time.time()
    mine = chunk_starts(n, chunk)[jax.process_index()::jax.process_count()]
    records = sorted(_gather_json([
        _evaluate_test_chunk(config, logits_fn, x[s:s + chunk], y[s:s + chunk], s, n_std, n_lip)
        for s in mine]), key=lambda r: r["start"])
    clean, fast_broken, names, warnings = _cascade(
        [{**r["ensemble"], "start": r["start"]} for r in records])
    pgd_clean, pgd_broken, _, _ = _cascade([{**r["pgd"], "start": r["start"]} for r in records])
    robust = clean & (fast_broken < 0)
    standard = {}
    if n_std:
        chunks = [r["standard"] for r in records if "standard" in r]
        totals = combine(chunks, n_std)
        standard = {"num_standard": n_std,
                    "standard_ensemble_acc": totals["standard_ensemble_acc"],
                    "fast_ensemble_acc_on_standard_subset": float(np.mean(robust[:n_std])),
                    "standard_per_attack": totals["standard_per_attack"],
                    "standard_attack_warnings": (chunks[0]["warnings"] if len(chunks) == 1
                                                 else totals["standard_attack_warnings"]),
                    "standard_seconds": totals["standard_seconds"]}
    lip = np.asarray([v for r in records for v in r["lipschitz"]], np.float64)
    sparsity = tj.summarize_sparsity(tj.nonzero_masks(params))
    result = {
        "num_test": n,
        "clean_acc": float(np.mean(clean)),
        f"pgd{config.eval.pgd_steps}_acc": float(np.mean(pgd_clean & (pgd_broken < 0))),
        "ensemble_acc": float(np.mean(robust)),
        "per_attack": {name: float(np.mean(clean & ((fast_broken < 0) | (fast_broken > i))))
                       for i, name in enumerate(names)},
        "attack_warnings": warnings,
        "sparsity": float(sparsity.sparsity),
        "layer_sparsity": {name: float(layer.sparsity) for name, layer in sparsity.layers.items()},
        "local_lipschitz_mean": float(np.mean(lip)) if n_lip else float("nan"),
        "local_lipschitz_median": float(np.median(lip)) if n_lip else float("nan"),
        "num_lipschitz": n_lip,
        "eval_seconds": time.time() - t0,
        **standard,
    }
    result.update(spectral_report(params, masks, conv_inputs(model, state, data)))
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Runs the pipeline of ``config`` in ``workdir`` (resuming) and returns the summary.

    With ``config.eval.final=False`` it only trains: no test-set evaluation, no ``summary.json``,
    and the returned dict holds just ``config``, ``stages`` and ``trained_step``.

    The process holds ``workdir``'s lock throughout (``workdir.exclusive``: a second process on
    the same directory fails at once), and ``workdir/config.json`` records the config of the
    first start: a resume whose training keys differ raises ``workdir.ConfigMismatchError``
    naming them (``workdir.RESUMABLE_KEYS`` may change).
    """
    workdir = pathlib.Path(workdir)
    main = jax.process_index() == 0  # the process that writes the run's files
    with workdir_lib.exclusive(workdir) if main else contextlib.nullcontext():
        train.validate(config)  # before the config is recorded: a bad one is never kept
        workdir_lib.check_config(workdir, config.to_dict(), record=main)
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: pathlib.Path) -> dict:
    t0 = time.time()
    trained = train.train(config, workdir)
    # Each process evaluates its own test images with its own copy of the (replicated) trained
    # state, data-parallel over its devices.
    trained = trained._replace(state=tj.parallel.local_copy(trained.state),
                               dense=tj.parallel.local_copy(trained.dense))
    stages, step = config.stages, int(trained.state.step)
    if not config.eval.final:
        log.info("config.eval.final=False: trained %s to step %d, no evaluation or summary",
                 ",".join(stages), step)
        return {"config": config.to_dict(), "stages": list(stages), "trained_step": step}
    summary = {"config": config.to_dict(), "stages": list(stages), "evaluated_step": step}
    summary.update(final_evaluation(config, trained))
    summary.update(dense_spectral_fields(config, trained))
    summary["wall_seconds"] = time.time() - t0
    if jax.process_index() == 0:
        workdir_lib.write_atomic(workdir / "summary.json",
                                 json.dumps(summary, indent=2, default=str))
        workdir_lib.write_atomic(workdir / "results.md", results_markdown([summary]))
        if config.plots:
            plots.run_plots(workdir, summary)
    return summary


def results_markdown(summaries: list[dict], names: list[str] | None = None) -> str:
    """A results table, one row per run summary, labelled by ``names`` (default: each run's
    config name)."""
    lines = ["| run | sparsity | clean | PGD | ensemble | median log10 kappa | max log10 kappa | "
             "max log10 live kappa | prod sigma_max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if names is None:
        names = [s["config"].get("name", "run") for s in summaries]
    for s, name in zip(summaries, names, strict=True):
        pgd = next(v for k, v in s.items() if k.startswith("pgd") and k.endswith("_acc"))
        # Summaries written before the live kappa existed have no such field.
        live = s.get("max_log10_live_kappa")
        live = "-" if live is None else f"{live:.2f}"
        lines.append(
            f"| {name} | {100 * s['sparsity']:.2f} % | {100 * s['clean_acc']:.2f} | "
            f"{100 * pgd:.2f} | {100 * s['ensemble_acc']:.2f} | {s['median_log10_kappa']:.2f} | "
            f"{s['max_log10_kappa']:.2f} | {live} | {s['lipschitz_upper_bound']:.3g} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The standard ensemble on more of a finished run's test images.
# ----------------------------------------------------------------------------------------------


def chunk_starts(num: int, chunk: int) -> list[int]:
    """First image of every chunk of ``chunk`` images covering ``num``."""
    if num <= 0 or chunk <= 0:
        raise ValueError(f"--num={num} and --chunk={chunk} must be positive.")
    return list(range(0, num, chunk))


def run(workdir: str | pathlib.Path, *, num: int | None = None, chunk: int = 500,
        first: int = 0, last: int | None = None) -> dict | None:
    """Evaluates the missing chunks in ``[first, last)``; returns the totals once all exist."""
    workdir = pathlib.Path(workdir)
    summary, config = _kept_summary(workdir)
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
        logits_fn = logits_function(config, trained.model, trained.state)
        x, y = test_arrays(trained.data, num)
        for s in todo:
            path = out_dir / f"{s:06d}.json"
            if path.exists():  # another process sharing this run's chunks finished it meanwhile
                continue
            result = evaluate_chunk(config, logits_fn, x[s:s + chunk], y[s:s + chunk], s)
            workdir_lib.write_atomic(path, json.dumps(result))
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
    workdir_lib.write_atomic(workdir / "standard.json", json.dumps(totals, indent=2))
    return totals


def _kept_summary(workdir: pathlib.Path):
    """A finished run's summary and its config (old configs migrated)."""
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} does not exist: --workdir must be a finished run "
                                f"(python -m experiments.main ... --workdir={workdir}).")
    summary = json.loads(summary_path.read_text())
    return summary, base.from_summary(summary["config"])


def _finished_run(workdir: pathlib.Path):
    """A finished run's summary, config and restored state, checked to be the summarised one."""
    summary, config = _kept_summary(workdir)
    trained = train.restore(config, workdir)
    if int(trained.state.step) != int(summary["evaluated_step"]):
        raise ValueError(f"{workdir}'s checkpoint is at step {int(trained.state.step)}, its "
                         f"summary at step {summary['evaluated_step']}.")
    return summary, config, trained


def spectral(workdir: str | pathlib.Path) -> dict:
    """The run's spectral report recomputed with the current definitions (``spectral.json``).

    :func:`spectral_report` of the evaluated network and of the dense model a
    pruned run started from. Summaries keep what their run measured; when a definition changes
    (the live rank, the operator's live channels), this records the new values beside them and
    :mod:`experiments.report` reads them instead. The spectral norms do not depend on any such
    definition: they must equal the summary's, or the checkpoints are not the summarised model.
    """
    workdir = pathlib.Path(workdir)
    summary, config, trained = _finished_run(workdir)
    params = train.evaluated_params(config, trained.state)
    report = spectral_report(params, trained.masks,
                             conv_inputs(trained.model, trained.state, trained.data))
    for name, value in summary["sigma_max"].items():
        if not np.isclose(report["sigma_max"][name], value, rtol=1e-6, atol=0.0):
            raise ValueError(f"{workdir}: sigma_max of {name} is {report['sigma_max'][name]}, the "
                             f"summary's {value}: not the model the summary evaluated.")
    out = {**report, **dense_spectral_fields(config, trained)}
    workdir_lib.write_atomic(workdir / "spectral.json", json.dumps(out, indent=2))
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
            workdir_lib.write_atomic(dest / "spectral.json",
                                     (workdir / "spectral.json").read_text())
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
        workdir_lib.write_atomic(dest / "standard.json", (workdir / "standard.json").read_text())
    print(f"{workdir}: standard ensemble {100 * totals['standard_ensemble_acc']:.2f} % on "
          f"{totals['num_standard']} images (clean {100 * totals['standard_clean_acc']:.2f} %), "
          f"{totals['standard_seconds'] / 60:.1f} min; per attack "
          + ", ".join(f"{k} {100 * v:.2f}" for k, v in totals["standard_per_attack"].items()))


if __name__ == "__main__":
    define_flags()
    app.run(main)
