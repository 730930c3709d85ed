"""Helpers shared by the benchmark entry points."""

from __future__ import annotations

import json
import pathlib
from typing import Any


def report(text: str, results: Any, out: pathlib.Path | None) -> None:
    """Prints ``text``; with ``out``, writes it there and ``results`` as JSON next to it."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
