"""Prepares and loads datasets once and prints their shapes.

    python -m experiments.data fashion_mnist [--data_dir=DIR] [--manual_dir=DIR] [--no_download]

Positional arguments: one or more of cifar10, fashion_mnist, mnist, svhn_cropped. Exits with 1
(the message on stderr) when a dataset is not prepared, its original files are not found and they
cannot be downloaded, and with 2 on a usage error.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging

from experiments.data.builders import load_dataset
from experiments.data.sources import DATASETS, DatasetNotFoundError

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags; called when it runs as a program only, so that importing
    the module (tests, other programs) never registers flags."""
    flags.DEFINE_string("data_dir", None, "tfds data directory for the prepared files (default "
                        "$TSCNC_TFDS_DIR, else tfds' default).")
    flags.DEFINE_string("manual_dir", None, "Directory with the original files (or with a "
                        "<name>/ subdirectory).")
    flags.DEFINE_bool("no_download", False, "Never download missing original files.")


def main(argv: Sequence[str]) -> int:
    """Loads each dataset named in ``argv[1:]``; 1 when one of them is not found, else 0."""
    names = list(argv[1:])
    choices = ", ".join(repr(n) for n in sorted(DATASETS))
    if not names:
        raise app.UsageError(f"Give one or more dataset names (choose from {choices}).",
                             exitcode=2)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise app.UsageError(f"Unknown dataset {', '.join(map(repr, unknown))} (choose from "
                             f"{choices}).", exitcode=2)
    # tfds logs each preparation step at INFO; its progress bars and the line printed here say
    # what matters.
    logging.set_verbosity(logging.WARNING)
    status = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            ds = load_dataset(name, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                              allow_download=not FLAGS.no_download)
        except DatasetNotFoundError as e:
            print(e, file=sys.stderr)
            status = 1
            continue
        print(f"{ds} in {time.perf_counter() - t0:.1f} s")
    return status


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; an unknown or malformed flag is a usage error (exit status 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        app.usage(shorthelp=True, detailed_error=e, exitcode=2)
        raise  # not reached: usage() exits


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
