"""Runs several configs one after another and keeps every finished run's summary.

    python -m experiments.sweep --workdir=runs/quick --variant=quick \
        --summaries=docs/results/quick dense_trades dense_pgd_at lwm hydra hydra_tsc \
        hydra_cnc hydra_tscnc tscnc_authors
    python -m experiments.sweep --workdir=runs/s99 --set=prune.sparsity=0.99 --set=seed=1 hydra

Each positional argument is a config name (``experiments/configs/<name>.py``) or a
``name=config[:variant]`` pair that names the run differently (``hydra_95=hydra``). Every run is
``python -m experiments.main`` in its own process and workdir (``<workdir>/<name>``) with the
``--set`` overrides as ``--config.<key>=<value>``. A run whose ``summary.json`` exists is skipped
if that summary was made with the same config (``workdir.summary_differences``; otherwise the run
fails, naming the keys that differ, and the others go on), a killed or failed run resumes from its
checkpoints on the next invocation, and one run's failure does not stop the others. After each run
finished by this invocation its ``summary.json`` and ``results.md`` are copied to
``--summaries/<name>/`` (a skipped run's kept copy is left as it is, or made if missing). At the
end the comparison table of the selected finished runs is written to ``<workdir>/results.md`` and
printed, and ``--summaries/results.md`` gets one row per kept summary there, labelled by run name,
so a sweep of a few runs does not drop the others.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import time

from absl import app, flags

from experiments import evaluate
from experiments import workdir as workdir_lib
from experiments.reporting import compare

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_string("workdir", None, "Parent directory of the runs' workdirs.")
    flags.DEFINE_string("variant", "", "Config variant for every run (e.g. 'quick', 'cifar10').")
    flags.DEFINE_multi_string("set", [], "key=value config override for every run (repeatable).")
    flags.DEFINE_string("summaries", None,
                        "Directory that keeps a copy of each finished summary.")
# (Not marked required: experiments.study shares these flags and has a mode without a workdir.)

CONFIGS = pathlib.Path("experiments") / "configs"  # run from the repository root, as main is


def parse_run(arg: str, variant: str) -> tuple[str, str]:
    """``"hydra"`` -> ``("hydra", "experiments/configs/hydra.py:<variant>")``."""
    name, _, spec = arg.partition("=")
    spec = spec or name
    config, _, own_variant = spec.partition(":")
    path = CONFIGS / f"{config}.py"
    if not path.exists():
        known = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "base"))
        raise app.UsageError(f"No config {config!r} for run {name!r}: choose from {known}.")
    variant = own_variant or variant
    return name, f"{path}:{variant}" if variant else str(path)


def kept_runs(summaries: str | pathlib.Path) -> list[pathlib.Path]:
    """The directories under ``summaries`` that hold a kept ``summary.json``, sorted."""
    return sorted(p.parent for p in pathlib.Path(summaries).glob("*/summary.json"))


def resolve_config(config: str, extra: list[str]):
    """The config ``experiments.main --config=<config> <extra>`` would run (parsed here, with
    the same flag library, without running anything)."""
    from ml_collections import config_flags

    argv = ["sweep", f"--config={config}", *[a for a in extra if a.startswith("--config.")]]
    values = flags.FlagValues()
    # sys_argv: the flag finds its overrides there (not in this process's own command line).
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    resolved = values.config
    from experiments import train  # as main does: --config.stages=prune,finetune is two stages

    resolved.stages = train.split_stages(resolved.stages)
    return resolved


def mismatch(summary_file: pathlib.Path, config: str, extra: list[str]) -> str | None:
    """Why the kept ``summary_file`` does not stand for the run ``config`` + ``extra`` (the keys
    that differ), or ``None`` when it does."""
    import json

    from experiments.configs import base

    kept = base.from_summary(json.loads(summary_file.read_text())["config"]).to_dict()
    diff = workdir_lib.summary_differences(kept, resolve_config(config, extra).to_dict())
    if not diff:
        return None
    return "; ".join(f"{k}: kept {a!r}, planned {b!r}" for k, (a, b) in list(diff.items())[:8]) + (
        f"; and {len(diff) - 8} more" if len(diff) > 8 else "")


class KeptMismatchError(RuntimeError):
    """A finished or kept summary was made with another config than the run planned under its
    name."""


def run_all(runs: list[tuple[str, str, list[str]]], root: pathlib.Path,
            summaries: str | None, train_only: frozenset[str] = frozenset()) -> list[str]:
    """Runs ``(name, config, extra_flags)`` in order (see the module docstring); returns the
    names of the runs that failed. The comparison table of every finished run is written at the
    end.

    The runs named in ``train_only`` are trained for their checkpoints only (their flags say
    ``--config.eval.final=False``): they write no summary, so they always start (a finished one
    just loads its checkpoints) and nothing of theirs is kept.
    """
    failed = []
    for name, config, extra in runs:
        workdir = root / name
        skipped = name not in train_only and (workdir / "summary.json").exists()
        why = skipped and mismatch(workdir / "summary.json", config, extra)
        if why:
            print(f"{name}: FAILED: its finished summary in {workdir} was made with another "
                  f"config ({why}); use another --workdir or delete {workdir}", flush=True)
            failed.append(name)
            continue
        if skipped:
            print(f"{name}: finished earlier, skipped", flush=True)
        else:
            t0 = time.time()
            cmd = [sys.executable, "-m", "experiments.main", f"--config={config}",
                   f"--workdir={workdir}", *extra]
            print(" ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd).returncode != 0:
                failed.append(name)
                print(f"{name}: FAILED after {time.time() - t0:.0f} s", flush=True)
                continue
            print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        keep = pathlib.Path(summaries) / name if summaries and name not in train_only else None
        if keep is not None and not (skipped and (keep / "summary.json").exists()):
            keep.mkdir(parents=True, exist_ok=True)
            for f in ("summary.json", "results.md"):
                shutil.copy2(workdir / f, keep / f)
    done = [root / name for name, _, _ in runs if (root / name / "summary.json").exists()]
    if done:
        print(compare.compare(done, root))
    if summaries:
        kept = kept_runs(summaries)
        if kept:
            table = evaluate.results_markdown(compare.load_summaries(kept), [d.name for d in kept])
            (pathlib.Path(summaries) / "results.md").write_text(table)
    return failed


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("Give one or more config names.")
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required.")
    overrides = [f"--config.{kv}" for kv in FLAGS.set]
    runs = [(*parse_run(a, FLAGS.variant), overrides) for a in argv[1:]]
    failed = run_all(runs, pathlib.Path(FLAGS.workdir), FLAGS.summaries)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun to resume).")


if __name__ == "__main__":
    define_flags()
    app.run(main)
