"""Cells, column labels and per-setting sections of the report's Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Callable


def pct(x: float) -> str:
    """A fraction as a percentage with two decimals."""
    return f"{100 * x:.2f}"


def pm(row: dict, f: str, scale: float = 100.0) -> str:
    """``row[f]`` and, unless it is NaN, its spread ``row[f + "_std"]``, both times ``scale``."""
    m, s = row[f] * scale, row[f + "_std"] * scale
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def kernel_columns(per_run) -> tuple[list[str], list[str]]:
    """Every kernel named in ``per_run`` (one ``((kernel, value), ...)`` per run), in first-seen
    order, and its short column label."""
    layers = list(dict.fromkeys(k for pairs in per_run for k, _ in pairs))
    return layers, [k.replace("/kernel", "").replace("params/", "") for k in layers]


def setting_sections(heading: str, intro: str, settings: list[dict],
                     table: Callable[[dict], list[str]]) -> list[str]:
    """A ``## heading`` section: ``intro``, then per setting (a dict with its ``model``,
    ``loss`` and ``target`` sparsity) a caption and the lines of ``table(setting)``; no lines at
    all without settings."""
    if not settings:
        return []
    out = ["", f"## {heading}", "", intro]
    for s in settings:
        out += ["", f"{s['model']}, {s['loss']}, {pct(s['target'])} %:", "", *table(s)]
    return out
