"""Tables, figures and correlations of the reproduction study, from its kept run summaries.

    python -m experiments.report --summaries=docs/results/study --out=docs/results/study \
        --splice=docs/results.md

Reads every ``<summaries>/<run>/summary.json`` (what :mod:`experiments.study` keeps) and writes
``<out>/study_tables.md`` (one row per run; mean and spread over seeds; correlations) and three
figures: ``kappa_vs_sparsity.png`` (median log10 condition number of the live part of the pruned
kernels, per method), ``robust_vs_sparsity.png`` (ensemble robust accuracy per method),
``lipschitz_vs_sparsity.png`` (log10 of the product of the kernels' largest singular values) and
``robust_vs_kappa.png`` (ensemble robust accuracy against median log10 live kappa, every run).
Correlations are reported per model and training loss and over every run; the last table
checks that each pruned run started from the same dense model as the kept run it names in
``init_dir`` (a dense model retrained on another kind of CPU is not bitwise the same).
``--splice=docs/results.md`` also puts the tables into the study's write-up, between its
``<!-- report:tables:begin -->`` and ``<!-- report:tables:end -->`` markers.
A run is described by its config: method (``config.name``), model, loss, target sparsity (0 for
a dense run), seed. Missing runs are simply absent: the report of a partly finished study is
the report of its finished runs.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments.reporting.write import BEGIN, END, report, splice_file

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_string("summaries", None, "Directory holding <run>/summary.json.")
    flags.DEFINE_string("out", None, "Directory for study_tables.md and the figures.")
    flags.DEFINE_string(
        "splice", None, "A Markdown document (docs/results.md) whose block between "
        f"{BEGIN!r} and {END!r} is replaced by the tables, headings one level down.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.summaries or not FLAGS.out:
        raise app.UsageError("--summaries and --out are required.")
    text = report(FLAGS.summaries, FLAGS.out)
    print(text)
    if FLAGS.splice:
        path = pathlib.Path(FLAGS.splice)
        try:
            splice_file(path, text)  # atomic: a failed write leaves the document as it was
        except ValueError as e:
            raise app.UsageError(f"--splice={path}: {e}") from None
        print(f"tables spliced into {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
