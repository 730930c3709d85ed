"""The crossed-stage ablation: which stage carries TSCNC's gain over HYDRA.

Each pairing of a dense model (plain TRADES, or HYDRA + TSCNC's penalised one) with a pruning
and fine-tuning pipeline (HYDRA's, or HYDRA + TSCNC's), run by :data:`experiments.study.CROSSED`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from experiments.reporting.markdown import pct, pm
from experiments.reporting.summaries import Record

# The crossed-stage ablation (experiments.study.CROSSED): the method name of each pair of a
# dense model (plain TRADES or HYDRA + TSCNC's penalised one) and a pruning + fine-tuning
# pipeline (HYDRA's or HYDRA + TSCNC's).
CROSSED_CELLS = {("plain", "hydra"): "hydra",
                 ("plain", "hydra_tscnc"): "hydra_tscnc_from_plain_dense",
                 ("penalised", "hydra"): "hydra_from_tscnc_dense",
                 ("penalised", "hydra_tscnc"): "hydra_tscnc"}
# What each cell adds to HYDRA (plain dense model, HYDRA's pipeline).
CROSSED_EFFECTS = {"penalised dense model": ("penalised", "hydra"),
                   "TSCNC's pruning and fine-tuning": ("plain", "hydra_tscnc"),
                   "both (HYDRA + TSCNC)": ("penalised", "hydra_tscnc")}


def crossed_stages(records: list[Record]) -> list[dict]:
    """The crossed-stage ablation, per model, loss, target sparsity and seed that has all four
    cells of :data:`CROSSED_CELLS`: each cell's ensemble accuracy (``cells``) and, per
    :data:`CROSSED_EFFECTS`, that cell minus the plain-dense HYDRA run (``effects``)."""
    index = {(r.model, r.loss, r.target, r.seed, r.method): r for r in records}
    keys = sorted({(r.model, r.loss, r.target, r.seed) for r in records
                   if r.method == CROSSED_CELLS[("penalised", "hydra")]})
    out = []
    for key in keys:
        cells = {c: index.get((*key, m)) for c, m in CROSSED_CELLS.items()}
        if any(r is None for r in cells.values()):
            continue
        base = cells[("plain", "hydra")].ensemble
        out.append({"model": key[0], "loss": key[1], "target": key[2], "seed": key[3],
                    "cells": {c: r.ensemble for c, r in cells.items()},
                    "effects": {e: cells[c].ensemble - base for e, c in CROSSED_EFFECTS.items()}})
    return out


def crossed_table(records: list[Record]) -> list[str]:
    """The table of :func:`crossed_stages`, seed by seed and the mean over seeds; no lines
    without a complete crossing."""
    rows = crossed_stages(records)
    if not rows:
        return []
    cells, effects = list(CROSSED_CELLS), list(CROSSED_EFFECTS)
    out = ["", "## Which stage carries TSCNC's gain (crossed stages)", "",
           "Ensemble robust accuracy (%) of each pairing of a dense model (plain TRADES, or "
           "HYDRA + TSCNC's, trained with the penalties) with a pruning and fine-tuning "
           "pipeline (HYDRA's, or HYDRA + TSCNC's with the penalties), and what each adds to "
           "HYDRA (points; the mean row: mean ± sample standard deviation over seeds).", "",
           "| model | target | seed | " + " | ".join(f"{d} dense, {p}" for d, p in cells)
           + " | " + " | ".join(f"+ {e}" for e in effects) + " |",
           "|---|---:|---:|" + "---:|" * (len(cells) + len(effects))]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["loss"], row["target"])].append(row)
        out.append(f"| {row['model']} | {pct(row['target'])} | {row['seed']} | "
                   + " | ".join(pct(row["cells"][c]) for c in cells) + " | "
                   + " | ".join(f"{100 * row['effects'][e]:+.2f}" for e in effects) + " |")
    for (model, _, target), rs in groups.items():
        if len(rs) < 2:
            continue
        stats = {}
        for name, values in [*((c, [r["cells"][c] for r in rs]) for c in cells),
                             *((e, [r["effects"][e] for r in rs]) for e in effects)]:
            v = np.array(values, np.float64)
            stats[name] = {"x": v.mean(), "x_std": v.std(ddof=1)}
        out.append(f"| {model} | {pct(target)} | mean of {len(rs)} | "
                   + " | ".join(pm(stats[c], "x") for c in cells) + " | "
                   + " | ".join(pm(stats[e], "x") for e in effects) + " |")
    return out
