"""Compares finished runs: one results table and a kappa-per-layer figure.

    python -m experiments.compare runs/hydra runs/hydra_tscnc --out=runs/compare

Reads each run directory's ``summary.json``; writes ``<out>/results.md`` and
``<out>/kappa_vs_layer.png`` and prints the table.
"""

from __future__ import annotations

from absl import app, flags

from experiments.reporting.compare import compare

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_string("out", None, "Directory for results.md and kappa_vs_layer.png.")


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("Give one or more run directories.")
    print(compare(argv[1:], FLAGS.out))


if __name__ == "__main__":
    define_flags()
    app.run(main)
