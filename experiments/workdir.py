"""The files of a run directory, each written so that a crash never leaves half of one."""

from __future__ import annotations

import json
import pathlib

__all__ = ["append_jsonl", "write_atomic"]


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a reader (or a rerun
    after a crash) sees the old file or the new one, never a part."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def append_jsonl(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` to the JSON-lines file ``path`` as one line."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
