"""What the kept runs say together: spread over seeds, paired differences, correlations.

Every function takes the :class:`~experiments.reporting.summaries.Record` of each run and
returns plain rows (dicts) that :mod:`experiments.reporting.tables` and
:mod:`experiments.reporting.plots` lay out.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from experiments.reporting.summaries import Record


def aggregate(records: list[Record]) -> list[dict]:
    """Mean, sample standard deviation and count over seeds per (model, loss, method, target)."""
    groups = defaultdict(list)
    for r in records:
        groups[(*r.group, r.target)].append(r)
    out = []
    for (model, loss, method, target), rs in groups.items():
        row = {"model": model, "loss": loss, "method": method, "target": target, "n": len(rs)}
        for f in ("clean", "pgd", "ensemble", "standard", "log10_live_kappa",
                  "log10_lipschitz_bound", "local_lipschitz"):
            v = np.array([getattr(r, f) for r in rs], np.float64)
            row[f] = float(v.mean())
            # No spread for one seed, nor around an infinite mean (a rank-deficient kernel).
            finite = len(v) > 1 and bool(np.isfinite(v).all())
            row[f + "_std"] = float(v.std(ddof=1)) if finite else math.nan
        out.append(row)
    return out


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    for value in np.unique(v):  # ties share their mean rank
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def correlations(records: list[Record], predictor: str, target: str = "ensemble") -> dict:
    """Pearson and Spearman correlation of ``target`` with ``predictor`` over the runs where
    both are finite; ``n`` is how many."""
    x = np.array([getattr(r, predictor) for r in records], np.float64)
    y = np.array([getattr(r, target) for r in records], np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(len(x)), "pearson": math.nan, "spearman": math.nan}
    return {"n": int(len(x)), "pearson": float(np.corrcoef(x, y)[0, 1]),
            "spearman": float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])}


def settings(records: list[Record], min_runs: int = 5) -> list[tuple[str, list[Record]]]:
    """The runs to correlate over: each (model, loss) with at least ``min_runs`` runs (a
    correlation over fewer says nothing), and, when there is more than one (model, loss), every
    run together (which mixes architectures and training losses)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r.model, r.loss)].append(r)
    out = [(f"{model}, {loss}", rs) for (model, loss), rs in sorted(groups.items())
           if len(rs) >= min_runs]
    if len(groups) > 1:
        out.append(("every run", records))
    return out


def paired_differences(records: list[Record], baseline: str = "hydra") -> list[dict]:
    """Every method minus ``baseline`` on the same model, loss, target sparsity and seed.

    Pairing by seed removes what the two runs share (the dense model they start from, the
    data order), so the mean difference is a sharper comparison than the difference of the
    two methods' means. Per (model, loss, method, target): the mean and sample standard
    deviation over the paired seeds of the clean and ensemble accuracy differences, and the
    seeds used.
    """
    base = {(r.model, r.loss, r.target, r.seed): r for r in records if r.method == baseline}
    groups = defaultdict(list)
    for r in records:
        b = base.get((r.model, r.loss, r.target, r.seed))
        if r.method != baseline and r.target > 0 and b is not None:
            groups[(r.model, r.loss, r.method, r.target)].append((r, b))
    out = []
    for (model, loss, method, target), pairs in sorted(groups.items()):
        row = {"model": model, "loss": loss, "method": method, "target": target,
               "n": len(pairs), "seeds": sorted(r.seed for r, _ in pairs)}
        for f in ("clean", "ensemble"):
            d = np.array([getattr(r, f) - getattr(b, f) for r, b in pairs], np.float64)
            row[f] = float(d.mean())
            row[f + "_std"] = float(d.std(ddof=1)) if len(d) > 1 else math.nan
        out.append(row)
    return out


def full_standard(records: list[Record], baseline: str = "hydra") -> list[dict]:
    """The runs with the standard ensemble on all their test images (``experiments.evaluate``),
    each with its difference to ``baseline`` on the same model, loss, target and seed under the
    standard and under the fast ensemble, when the baseline run has it too (else NaN)."""
    full = {(r.model, r.loss, r.method, r.target, r.seed): r for r in records
            if r.num_standard and r.num_standard == r.num_test}
    out = []
    for (model, loss, method, target, seed), r in sorted(full.items()):
        b = full.get((model, loss, baseline, target, seed))
        paired = b is not None and method != baseline
        out.append({"record": r, "gap": r.ensemble - r.standard,
                    "standard_vs_baseline": r.standard - b.standard if paired else math.nan,
                    "fast_vs_baseline": r.ensemble - b.ensemble if paired else math.nan})
    return out


def dense_reproduction(records: list[Record]) -> list[dict]:
    """For each run that pruned another run's dense stage (``init_dir``) whose summary is kept:
    how far the dense model it pruned is from the kept one, as the largest difference over
    kernels of log10 kappa (0: every kernel's kappa equal to the last digit, the same weights in
    practice). Dense models are retrained when their checkpoints are not on the machine, and
    XLA:CPU training is bitwise reproducible only on the same kind of CPU."""
    by_run = {r.run: r for r in records}
    out = []
    for r in records:
        source = by_run.get(r.dense_from)
        if source is None or not r.dense_kappa or not source.dense_kappa:
            continue
        kept, got = dict(source.dense_kappa), dict(r.dense_kappa)
        if set(kept) != set(got):
            continue
        diff = max(abs(math.log10(got[k]) - math.log10(kept[k])) for k in kept)
        out.append({"run": r.run, "source": source.run, "max_abs_log10_kappa_diff": diff})
    return out


def by_seed(records: list[Record], min_seeds: int = 3) -> list[dict]:
    """Each pruned run's ensemble accuracy laid out by seed, for every model, loss and target
    sparsity at which some method ran ``min_seeds`` seeds or more: per such setting, its seeds
    and per method ``{seed: ensemble accuracy}`` (a seed the method did not run is absent).
    A mean over seeds hides a two-valued outcome; this table shows it."""
    grid = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.target > 0:
            grid[(r.model, r.loss, r.target)][r.method][r.seed] = r.ensemble
    out = []
    for (model, loss, target), methods in sorted(grid.items()):
        if max(len(v) for v in methods.values()) >= min_seeds:
            seeds = sorted({seed for v in methods.values() for seed in v})
            out.append({"model": model, "loss": loss, "target": target, "seeds": seeds,
                        "methods": {m: dict(v) for m, v in sorted(methods.items())}})
    return out


def live_shapes(records: list[Record], min_seeds: int = 5) -> list[dict]:
    """What pruning left of each kernel, at every model, loss and target sparsity where some
    method ran ``min_seeds`` seeds or more (as :func:`by_seed`): per such setting, its pruned
    runs that recorded their live shapes, most robust (ensemble) first."""
    keep = {(s["model"], s["loss"], s["target"]) for s in by_seed(records, min_seeds)}
    groups = defaultdict(list)
    for r in records:
        if (r.model, r.loss, r.target) in keep and r.live_shape:
            groups[(r.model, r.loss, r.target)].append(r)
    return [{"model": model, "loss": loss, "target": target,
             "runs": sorted(rs, key=lambda r: (-r.ensemble, r.run))}
            for (model, loss, target), rs in sorted(groups.items())]
