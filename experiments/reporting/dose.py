"""The dose-response study's tables: each method against HYDRA, paired by seed.

The runs that record their convolutions' operator kappa (summaries from the live-spectrum CNC
on, :mod:`experiments.dose`): accuracy differences and conditioning factors per method, target
sparsity and seed, and each kernel's live kappa, reshaped and as a convolution operator.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from experiments.reporting.markdown import kernel_columns, pct, pm
from experiments.reporting.summaries import Record


def _median_log10(pairs) -> float:
    values = np.log10(np.array([v for _, v in pairs], np.float64))
    return float(np.median(values)) if values.size else math.nan


def dose_response(records: list[Record], baseline: str = "hydra") -> list[dict]:
    """The dose-response study's criteria (``docs/results.md``): every method against
    ``baseline`` on the same model, loss, target sparsity and seed, for the runs that record
    their convolutions' operator kappa (summaries from the live-spectrum CNC on).

    Per (model, loss, method, target) and seed: the differences in clean, PGD-20, configured
    (fast) and standard ensemble accuracy, and the factor by which the method lowers the median
    live kappa of the pruned network (reshaped kernels, and the convolutions' operators):
    ``baseline's kappa / method's kappa``, so > 1 is lower kappa. Then the mean (and sample
    standard deviation) over the paired seeds, the log-mean for the factors.
    """
    rs = [r for r in records if r.operator_kappa and r.target > 0]
    base = {(r.model, r.loss, r.target, r.seed): r for r in rs if r.method == baseline}
    groups = defaultdict(list)
    for r in rs:
        b = base.get((r.model, r.loss, r.target, r.seed))
        if r.method != baseline and b is not None:
            groups[(r.model, r.loss, r.method, r.target)].append((r, b))
    out = []
    for (model, loss, method, target), pairs in sorted(groups.items()):
        pairs.sort(key=lambda p: p[0].seed)
        row = {"model": model, "loss": loss, "method": method, "target": target,
               "seeds": [r.seed for r, _ in pairs], "per_seed": []}
        for r, b in pairs:
            row["per_seed"].append({
                "seed": r.seed,
                **{f: getattr(r, f) - getattr(b, f)
                   for f in ("clean", "pgd", "ensemble", "standard")},
                "kappa_factor": 10.0 ** (b.log10_live_kappa - r.log10_live_kappa),
                "operator_factor": 10.0 ** (_median_log10(b.operator_kappa)
                                            - _median_log10(r.operator_kappa))})
        for f in ("clean", "pgd", "ensemble", "standard"):
            d = np.array([p[f] for p in row["per_seed"]], np.float64)
            row[f] = float(d.mean())
            row[f + "_std"] = float(d.std(ddof=1)) if len(d) > 1 else math.nan
        for f in ("kappa_factor", "operator_factor"):
            row[f] = float(10.0 ** np.mean(np.log10([p[f] for p in row["per_seed"]])))
        out.append(row)
    return out


def dose_tables(records: list[Record]) -> list[str]:
    """The dose-response tables of :func:`dose_response` and the per-kernel kappa of its
    runs, reshaped and as operators; no lines without operator kappa."""
    rows = dose_response(records)
    runs = [r for r in records if r.operator_kappa]
    if not runs:
        return []
    out = ["", "## Dose response: each method against HYDRA, paired by seed", "",
           "Differences in points (method minus HYDRA, same model, loss, target sparsity and "
           "seed; mean ± sample standard deviation over the seeds, then seed by seed); kappa "
           "factors are HYDRA's median live kappa over the method's (> 1: the method's pruned "
           "network is better conditioned), for the reshaped kernels and for the convolutions' "
           "circular operators, geometric mean over the seeds. *standard* is AutoAttack's "
           "standard ensemble on each run's first N test images.", "",
           "| model | method | target | seeds | clean | PGD-20 | fast ensemble | standard | "
           "kappa factor | operator kappa factor | standard by seed |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        by_seed = ", ".join(f"{100 * p['standard']:+.2f}" for p in row["per_seed"])
        out.append(f"| {row['model']} | {row['method']} | {pct(row['target'])} | "
                   f"{', '.join(map(str, row['seeds']))} | {pm(row, 'clean')} | "
                   f"{pm(row, 'pgd')} | {pm(row, 'ensemble')} | {pm(row, 'standard')} | "
                   f"{row['kappa_factor']:.2f} | {row['operator_factor']:.2f} | {by_seed} |")
    convs = [k for r in runs for k, _ in r.operator_kappa]
    layers, short = kernel_columns(r.live_kappa for r in runs)
    op_layers = list(dict.fromkeys(convs))
    op_short = [k.replace("/kernel", "") + " (op.)" for k in op_layers]
    out += ["", "## Per-kernel log10 live kappa: reshaped kernels and convolution operators", "",
            "Mean over seeds of log10 live kappa per kernel (*op.*: the convolution's circular "
            "operator on its input grid); *dense* rows are the dense models the pruned runs "
            "started from (their own `dense_kappa`), *pruned* rows the evaluated networks. "
            "Weights below 1e-3: the fraction of all kernel weights (pruned ones included) and, "
            "in brackets, of the non-zero ones.", "",
            "| model | method | target | network | seeds | " + " | ".join(short + op_short)
            + " | weights below 1e-3 |",
            "|---|---|---:|---|---:|" + "---:|" * (len(layers) + len(op_layers)) + "---:|"]
    groups = defaultdict(list)
    for r in runs:
        groups[(r.model, r.method, r.target)].append(r)

    def cells(dicts, names):
        return [f"{np.mean([math.log10(d[k]) for d in dicts]):.2f}"
                if all(k in d and d[k] > 0 for d in dicts) else "-" for k in names]

    for (model, method, target), rs in sorted(groups.items()):
        kinds = [("pruned", [dict(r.live_kappa) for r in rs],
                  [dict(r.operator_kappa) for r in rs])]
        if target > 0 and all(r.dense_kappa for r in rs):
            kinds.insert(0, ("dense", [dict(r.dense_kappa) for r in rs],
                             [dict(r.dense_operator_kappa) for r in rs]))
        for kind, reshaped, operator in kinds:
            if kind == "pruned":
                below = (f"{pct(np.mean([r.weights_below for r in rs]))} % "
                         f"({pct(np.mean([r.nonzero_weights_below for r in rs]))} %)")
            else:
                below = f"{pct(np.mean([r.dense_weights_below for r in rs]))} %"
            out.append(f"| {model} | {method} | {pct(target)} | {kind} | {len(rs)} | "
                       + " | ".join(cells(reshaped, layers) + cells(operator, op_layers))
                       + f" | {below} |")
    return out
