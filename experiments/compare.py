"""Compares finished runs: one results table and a kappa-per-layer figure.

    python -m experiments.compare runs/hydra runs/hydra_tscnc --out=runs/compare

Reads each run directory's ``summary.json``; writes ``<out>/results.md`` and
``<out>/kappa_vs_layer.png`` and prints the table.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

from experiments import evaluate, plots

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Directory for results.md and kappa_vs_layer.png.")


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


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("Give one or more run directories.")
    print(compare(argv[1:], FLAGS.out))


if __name__ == "__main__":
    app.run(main)
