"""Finished runs side by side: one results table and a kappa-per-layer figure.

Reads each run directory's ``summary.json``; :func:`compare` returns the table and, given a
directory, writes ``results.md`` and ``kappa_vs_layer.png`` there.
"""

from __future__ import annotations

import json
import pathlib

from experiments import evaluate
from experiments.reporting import plots


def load_summaries(run_dirs) -> list[dict]:
    """The ``summary.json`` of each run directory, with a clear error for an unfinished run."""
    summaries = []
    for d in map(pathlib.Path, run_dirs):
        path = d / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: the run in {d} has not finished "
                                    f"(rerun its command to resume it).")
        summaries.append(json.loads(path.read_text()))
    return summaries


def compare(run_dirs, out: str | pathlib.Path | None = None) -> str:
    """Returns the markdown table of ``run_dirs``; with ``out``, also writes it and the figure."""
    summaries = load_summaries(run_dirs)
    table = evaluate.results_markdown(summaries)
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table)
        plots.kappa_per_method(summaries, out / "kappa_vs_layer.png")
    return table
