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

import dataclasses
import json
import math
import pathlib
from collections import defaultdict

import matplotlib
import numpy as np
from absl import app, flags
from matplotlib.figure import Figure

FLAGS = flags.FLAGS

# The generated block of a hand-written document (``--splice``): everything between the two
# markers is the report's, everything outside them the author's.
BEGIN = "<!-- report:tables:begin -->"
END = "<!-- report:tables:end -->"


def _define_flags() -> None:
    # Defined when run as a program only: importing the module (tests, notebooks) must not
    # register flags that other entry points (experiments.compare, sweep) also define.
    flags.DEFINE_string("summaries", None, "Directory holding <run>/summary.json.")
    flags.DEFINE_string("out", None, "Directory for study_tables.md and the figures.")
    flags.DEFINE_string(
        "splice", None, "A Markdown document (docs/results.md) whose block between "
        f"{BEGIN!r} and {END!r} is replaced by the tables, headings one level down.")


@dataclasses.dataclass(frozen=True)
class Record:
    run: str
    method: str
    model: str
    loss: str
    target: float  # target sparsity, 0 for a dense run
    seed: int
    sparsity: float  # measured
    clean: float
    pgd: float
    ensemble: float
    log10_kappa: float  # median over kernels of the whole kernels' kappa, may be inf
    log10_live_kappa: float  # median over kernels of the live parts
    log10_lipschitz_bound: float
    local_lipschitz: float
    wall_seconds: float
    # The standard ensemble on the first num_standard test images and the fast ensemble's
    # accuracy on the same images (eval.num_standard > 0); NaN / 0 when the run has none.
    standard: float = math.nan
    fast_on_standard_subset: float = math.nan
    num_standard: int = 0
    num_test: int = 0
    live_kappa: tuple[tuple[str, float], ...] = ()  # per kernel, in the summary's order
    # per kernel, (rows, columns) of its live part: the inputs and outputs with a nonzero weight
    live_shape: tuple[tuple[str, tuple[int, int]], ...] = ()
    # The run whose finished dense stage this one pruned (config.init_dir's last part; "" when
    # it trained its own), and the per-kernel kappa of the dense model it started from: the
    # pruned run's "dense_kappa", or a dense-only run's own "kappa".
    dense_from: str = ""
    dense_kappa: tuple[tuple[str, float], ...] = ()
    # Live kappa of each stride-1 convolution's circular operator (newer summaries only), the
    # same for the dense model a pruned run started from, and the fraction of kernel weights
    # below 1e-3 (of all, and of the non-zero ones).
    operator_kappa: tuple[tuple[str, float], ...] = ()
    dense_operator_kappa: tuple[tuple[str, float], ...] = ()
    weights_below: float = math.nan
    nonzero_weights_below: float = math.nan
    dense_weights_below: float = math.nan

    @property
    def group(self) -> tuple[str, str, str]:
        return self.model, self.loss, self.method


def _record(run: str, s: dict) -> Record:
    c = s["config"]
    stages = s.get("stages", [])
    pruned = "prune" in stages or "finetune" in stages
    dense_kappa = s.get("dense_kappa") if pruned else s.get("kappa")
    pgd = next(v for k, v in s.items() if k.startswith("pgd") and k.endswith("_acc"))
    live = s.get("median_log10_live_kappa", s["median_log10_kappa"])
    # Summaries that say kappa_definition="live" keep the whole kernels' kappa as full_kappa.
    full = s.get("median_log10_full_kappa", s["median_log10_kappa"])
    dense_operator = s.get("dense_operator_kappa") if pruned else s.get("operator_kappa")
    return Record(run=run, method=c["name"], model=c["model"]["name"], loss=c["loss"],
                  target=float(c["prune"]["sparsity"]) if pruned else 0.0, seed=int(c["seed"]),
                  sparsity=float(s["sparsity"]), clean=float(s["clean_acc"]), pgd=float(pgd),
                  ensemble=float(s["ensemble_acc"]),
                  log10_kappa=float(full), log10_live_kappa=float(live),
                  log10_lipschitz_bound=math.log10(max(s["lipschitz_upper_bound"], 1e-300)),
                  local_lipschitz=float(s.get("local_lipschitz_mean", math.nan)),
                  wall_seconds=float(s.get("wall_seconds", math.nan)),
                  standard=float(s.get("standard_ensemble_acc", math.nan)),
                  fast_on_standard_subset=float(
                      s.get("fast_ensemble_acc_on_standard_subset", math.nan)),
                  num_standard=int(s.get("num_standard", 0)), num_test=int(s["num_test"]),
                  live_kappa=tuple((k, float(v)) for k, v in s.get("live_kappa", {}).items()),
                  live_shape=tuple((k, (int(v[0]), int(v[1])))
                                   for k, v in s.get("live_shape", {}).items()),
                  dense_from=(pathlib.PurePath(c["init_dir"]).name
                              if c.get("init_dir") and "dense" not in stages else ""),
                  dense_kappa=tuple((k, float(v)) for k, v in (dense_kappa or {}).items()),
                  operator_kappa=tuple((k, float(v))
                                       for k, v in s.get("operator_kappa", {}).items()),
                  dense_operator_kappa=tuple((k, float(v))
                                             for k, v in (dense_operator or {}).items()),
                  weights_below=float(s.get("weights_below_1e-3", math.nan)),
                  nonzero_weights_below=float(s.get("nonzero_weights_below_1e-3", math.nan)),
                  dense_weights_below=float(s.get("dense_weights_below_1e-3" if pruned
                                                  else "weights_below_1e-3", math.nan)))


def with_standard(summary: dict, standard: dict) -> dict:
    """``summary`` with its standard-ensemble numbers replaced by ``experiments.evaluate``'s
    (``standard.json``: the standard ensemble on more of the run's test images). The fast
    ensemble's accuracy on the same images is the run's own when they are all its test images;
    otherwise it is unknown (NaN)."""
    s = dict(summary)
    num = int(standard["num_standard"])
    s.update(num_standard=num, standard_ensemble_acc=standard["standard_ensemble_acc"],
             standard_per_attack=standard["standard_per_attack"],
             standard_attack_warnings=standard["standard_attack_warnings"],
             fast_ensemble_acc_on_standard_subset=(
                 summary["ensemble_acc"] if num == int(summary["num_test"]) else math.nan))
    return s


def _summary(path: pathlib.Path) -> dict:
    summary = json.loads(path.read_text())
    standard = path.parent / "standard.json"
    if standard.exists():
        summary = with_standard(summary, json.loads(standard.read_text()))
    spectral = path.parent / "spectral.json"  # recomputed with newer definitions
    if spectral.exists():
        summary = {**summary, **json.loads(spectral.read_text())}
    return summary


def load(summaries: str | pathlib.Path) -> list[Record]:
    """Every finished run under ``summaries``, sorted by model, loss, method, sparsity, seed;
    a run's ``standard.json`` (``experiments.evaluate``) replaces its standard-ensemble subset,
    its ``spectral.json`` (``experiments.evaluate --spectral``) its spectral fields."""
    root = pathlib.Path(summaries)
    records = [_record(p.parent.name, _summary(p)) for p in sorted(root.glob("*/summary.json"))]
    if not records:
        raise FileNotFoundError(f"no <run>/summary.json under {root}: run experiments.study "
                                f"with --summaries={root} first.")
    return sorted(records, key=lambda r: (r.model, r.loss, r.method, r.target, r.seed))


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


def _dose_tables(records: list[Record]) -> list[str]:
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
        out.append(f"| {row['model']} | {row['method']} | {_pct(row['target'])} | "
                   f"{', '.join(map(str, row['seeds']))} | {_pm(row, 'clean')} | "
                   f"{_pm(row, 'pgd')} | {_pm(row, 'ensemble')} | {_pm(row, 'standard')} | "
                   f"{row['kappa_factor']:.2f} | {row['operator_factor']:.2f} | {by_seed} |")
    convs = [k for r in runs for k, _ in r.operator_kappa]
    layers, short = _kernel_columns(r.live_kappa for r in runs)
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
                below = (f"{_pct(np.mean([r.weights_below for r in rs]))} % "
                         f"({_pct(np.mean([r.nonzero_weights_below for r in rs]))} %)")
            else:
                below = f"{_pct(np.mean([r.dense_weights_below for r in rs]))} %"
            out.append(f"| {model} | {method} | {_pct(target)} | {kind} | {len(rs)} | "
                       + " | ".join(cells(reshaped, layers) + cells(operator, op_layers))
                       + f" | {below} |")
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


def _by_seed_table(records: list[Record]) -> list[str]:
    settings_by_seed = by_seed(records)
    if not settings_by_seed:
        return []
    out = ["", "## Ensemble robust accuracy by seed", "",
           "Every method's ensemble robust accuracy (%) seed by seed, at each model, loss and "
           "target sparsity that some method ran with three seeds or more (-: not run)."]
    for s in settings_by_seed:
        out += ["", f"{s['model']}, {s['loss']}, {_pct(s['target'])} %:", "",
                "| method | " + " | ".join(f"seed {seed}" for seed in s["seeds"]) + " |",
                "|---|" + "---:|" * len(s["seeds"])]
        out += [f"| {m} | " + " | ".join(_pct(v[seed]) if seed in v else "-"
                                         for seed in s["seeds"]) + " |"
                for m, v in s["methods"].items()]
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


def _kernel_columns(per_run) -> tuple[list[str], list[str]]:
    """Every kernel named in ``per_run`` (one ``((kernel, value), ...)`` per run), in first-seen
    order, and its short column label."""
    layers = list(dict.fromkeys(k for pairs in per_run for k, _ in pairs))
    return layers, [k.replace("/kernel", "").replace("params/", "") for k in layers]


def _live_shape_table(records: list[Record]) -> list[str]:
    settings_shapes = live_shapes(records)
    if not settings_shapes:
        return []
    out = ["", "## What pruning left of each kernel", "",
           "At each model, loss and target sparsity that some method ran with five seeds or "
           "more: every pruned run, most robust first, with each kernel's live shape (input "
           "rows x output columns that keep a nonzero weight; a convolution's rows are its "
           "kernel positions times input channels)."]
    for s in settings_shapes:
        layers, short = _kernel_columns(r.live_shape for r in s["runs"])
        out += ["", f"{s['model']}, {s['loss']}, {_pct(s['target'])} %:", "",
                "| run | method | seed | ensemble | " + " | ".join(short) + " |",
                "|---|---|---:|---:|" + "---:|" * len(layers)]
        for r in s["runs"]:
            d = dict(r.live_shape)
            out.append(f"| {r.run} | {r.method} | {r.seed} | {_pct(r.ensemble)} | " + " | ".join(
                f"{d[k][0]} x {d[k][1]}" if k in d else "-" for k in layers) + " |")
    return out


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


def _crossed_table(records: list[Record]) -> list[str]:
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
        out.append(f"| {row['model']} | {_pct(row['target'])} | {row['seed']} | "
                   + " | ".join(_pct(row["cells"][c]) for c in cells) + " | "
                   + " | ".join(f"{100 * row['effects'][e]:+.2f}" for e in effects) + " |")
    for (model, _, target), rs in groups.items():
        if len(rs) < 2:
            continue
        stats = {}
        for name, values in [*((c, [r["cells"][c] for r in rs]) for c in cells),
                             *((e, [r["effects"][e] for r in rs]) for e in effects)]:
            v = np.array(values, np.float64)
            stats[name] = {"x": v.mean(), "x_std": v.std(ddof=1)}
        out.append(f"| {model} | {_pct(target)} | mean of {len(rs)} | "
                   + " | ".join(_pm(stats[c], "x") for c in cells) + " | "
                   + " | ".join(_pm(stats[e], "x") for e in effects) + " |")
    return out


PREDICTORS = {"log10_live_kappa": "median log10 live kappa",
              "log10_kappa": "median log10 kappa (full kernels)",
              "log10_lipschitz_bound": "log10 prod sigma_max (Lipschitz upper bound)",
              "local_lipschitz": "local Lipschitz estimate"}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _pm(row: dict, f: str, scale: float = 100.0) -> str:
    m, s = row[f] * scale, row[f + "_std"] * scale
    return f"{m:.2f}" if math.isnan(s) else f"{m:.2f} ± {s:.2f}"


def tables(records: list[Record]) -> str:
    lines = ["# Reproduction study: tables", "",
             "Generated by `python -m experiments.report` from the kept summaries.", "",
             "## Every run", "",
             "Accuracies in %; *ensemble* is the run's configured ensemble (`eval.attacks`) on "
             "its `num_test` test images; *standard (fast) on first N* is AutoAttack's standard "
             "ensemble on the first N of them (and the configured ensemble's accuracy on the same "
             "N), when the run has it.", "",
             "| run | model | loss | method | target | seed | sparsity | clean | PGD-20 | "
             "ensemble | standard (fast) on first N | median log10 kappa | "
             "median log10 live kappa | log10 prod sigma_max | local Lipschitz | wall min |",
             "|" + "---|" * 3 + "---|" + "---:|" * 12]
    for r in records:
        std = (f"{_pct(r.standard)} ({_pct(r.fast_on_standard_subset)}) on {r.num_standard}"
               if r.num_standard else "-")
        lines.append(
            f"| {r.run} | {r.model} | {r.loss} | {r.method} | {_pct(r.target)} | {r.seed} | "
            f"{_pct(r.sparsity)} | {_pct(r.clean)} | {_pct(r.pgd)} | {_pct(r.ensemble)} | "
            f"{std} | {r.log10_kappa:.2f} | {r.log10_live_kappa:.2f} | "
            f"{r.log10_lipschitz_bound:.2f} | {r.local_lipschitz:.3g} | "
            f"{r.wall_seconds / 60:.1f} |")
    lines += ["", "## Mean ± sample standard deviation over seeds", "",
              "| model | loss | method | target | seeds | clean | PGD-20 | ensemble | "
              "standard on first N | median log10 live kappa | log10 prod sigma_max | "
              "local Lipschitz |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in aggregate(records):
        lines.append(
            f"| {row['model']} | {row['loss']} | {row['method']} | {_pct(row['target'])} | "
            f"{row['n']} | {_pm(row, 'clean')} | {_pm(row, 'pgd')} | {_pm(row, 'ensemble')} | "
            f"{_pm(row, 'standard')} | {_pm(row, 'log10_live_kappa', 1.0)} | "
            f"{_pm(row, 'log10_lipschitz_bound', 1.0)} | {_pm(row, 'local_lipschitz', 1.0)} |")
    paired = paired_differences(records)
    if paired:
        lines += ["", "## Each method minus HYDRA, paired by seed", "",
                  "Accuracy differences in points, same model, loss, target sparsity and seed "
                  "(mean ± sample standard deviation over the paired seeds; positive: the method "
                  "beats HYDRA).", "",
                  "| model | loss | method | target | seeds | clean | ensemble |",
                  "|---|---|---|---:|---|---:|---:|"]
        for row in paired:
            lines.append(
                f"| {row['model']} | {row['loss']} | {row['method']} | {_pct(row['target'])} | "
                f"{', '.join(map(str, row['seeds']))} | {_pm(row, 'clean')} | "
                f"{_pm(row, 'ensemble')} |")
    lines += ["", "## Which quantity predicts ensemble robust accuracy", "",
              "Per model and training loss (a setting with at least 5 runs), and over every run "
              "when there are several settings. Over all of a setting's runs, sparsity drives "
              "both the predictor and the accuracy; its runs at one target sparsity (99 %) "
              "compare methods with sparsity held fixed.", "",
              "| setting | predictor | runs | Pearson r | Spearman rho |"
              " runs at 99 % | Pearson r at 99 % | Spearman rho at 99 % |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for setting, rs in settings(records):
        at99 = [r for r in rs if r.target == 0.99]
        for f, label in PREDICTORS.items():
            c, c99 = correlations(rs, f), correlations(at99, f)
            lines.append(f"| {setting} | {label} | {c['n']} | {c['pearson']:.3f} | "
                         f"{c['spearman']:.3f} | {c99['n']} | {c99['pearson']:.3f} | "
                         f"{c99['spearman']:.3f} |")
    gaps = np.array([r.fast_on_standard_subset - r.standard for r in records
                     if r.num_standard and math.isfinite(r.fast_on_standard_subset)], np.float64)
    if gaps.size:
        lines += ["", "## Configured (fast) ensemble versus the standard ensemble", "",
                  f"On the same first-N test images of {gaps.size} runs, the fast ensemble's "
                  f"robust accuracy minus the standard ensemble's: mean "
                  f"{100 * gaps.mean():.2f} points, largest {100 * gaps.max():.2f}, smallest "
                  f"{100 * gaps.min():.2f} (positive: the standard ensemble is stronger)."]
    full = full_standard(records)
    if full:
        lines += ["", "## The standard ensemble on every test image", "",
                  "Runs evaluated again with AutoAttack's standard ensemble on all their test "
                  "images (`python -m experiments.evaluate`); accuracies in %, differences in "
                  "points; *minus HYDRA* pairs the run with HYDRA's run of the same model, loss, "
                  "target sparsity and seed when that run has it too.", "",
                  "| run | clean | fast ensemble | standard ensemble | fast - standard | "
                  "minus HYDRA (standard) | minus HYDRA (fast) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in full:
            r = row["record"]
            diffs = ["-" if math.isnan(row[k]) else f"{100 * row[k]:+.2f}"
                     for k in ("standard_vs_baseline", "fast_vs_baseline")]
            lines.append(f"| {r.run} | {_pct(r.clean)} | {_pct(r.ensemble)} | "
                         f"{_pct(r.standard)} | {100 * row['gap']:.2f} | {diffs[0]} | "
                         f"{diffs[1]} |")
    lines += _dose_tables(records)
    lines += _by_seed_table(records)
    lines += _crossed_table(records)
    lines += _live_shape_table(records)
    lines += _layer_table(records)
    repro = dense_reproduction(records)
    if repro:
        lines += ["", "## The dense model each pruned run started from", "",
                  "A run that prunes another run's dense stage on a machine without that run's "
                  "checkpoints prunes a retrained copy, the same model only on the same kind of "
                  "CPU. Largest per-kernel difference of log10 kappa between the dense model the "
                  "run pruned and the kept run's (0: equal to the last digit, the same model).",
                  "",
                  "| run | dense model of | max abs difference of log10 kappa |",
                  "|---|---|---:|"]
        lines += [f"| {d['run']} | {d['source']} | {d['max_abs_log10_kappa_diff']:.2e} |"
                  for d in repro]
    return "\n".join(lines) + "\n"


def _layer_table(records: list[Record]) -> list[str]:
    """log10 kappa of the live part of every kernel, one row per run (pruned runs only)."""
    rows = [r for r in records if r.live_kappa and r.target > 0]
    if not rows:
        return []
    layers, short = _kernel_columns(r.live_kappa for r in rows)
    out = ["", "## Per-kernel log10 live kappa (pruned runs)", "",
           "| run | " + " | ".join(short) + " |", "|---|" + "---:|" * len(layers)]
    for r in rows:
        d = dict(r.live_kappa)
        out.append(f"| {r.run} | " + " | ".join(
            f"{math.log10(d[k]):.2f}" if k in d and d[k] > 0 else "-" for k in layers) + " |")
    return out


def _by_method(records: list[Record]) -> dict:
    out = defaultdict(list)
    for row in aggregate(records):
        out[(row["model"], row["loss"], row["method"])].append(row)
    return {k: sorted(v, key=lambda r: r["target"]) for k, v in out.items()}


def _label(key) -> str:
    model, loss, method = key
    return method + ("" if (model, loss) == ("small_cnn", "trades") else f" ({model}, {loss})")


def figures(records: list[Record], out: pathlib.Path) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    # One panel per model and loss, one colour per method throughout.
    by_method = _by_method(records)
    panels = sorted({key[:2] for key in by_method})
    cmap = matplotlib.colormaps["tab20"]
    colour = {m: cmap(i % 20) for i, m in enumerate(sorted({key[2] for key in by_method}))}
    for fname, field, ylabel, scale in (
            ("kappa_vs_sparsity.png", "log10_live_kappa", "median log10 live kappa", 1.0),
            ("robust_vs_sparsity.png", "ensemble", "ensemble robust accuracy (%)", 100.0),
            ("lipschitz_vs_sparsity.png", "log10_lipschitz_bound",
             "log10 prod sigma_max (Lipschitz upper bound)", 1.0)):
        fig = Figure(figsize=(5 * len(panels), 4.5))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels, strict=True):
            for key, rows in by_method.items():
                if key[:2] != panel:
                    continue
                x = [100 * r["target"] for r in rows]
                y = [scale * r[field] for r in rows]
                err = [0.0 if math.isnan(r[field + "_std"]) else scale * r[field + "_std"]
                       for r in rows]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=key[2],
                            color=colour[key[2]])
            ax.set_title(", ".join(panel), fontsize=9)
            ax.set_xlabel("target sparsity (%)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / fname))
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    groups = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    for key, rs in sorted(groups.items()):
        ax.plot([r.log10_live_kappa for r in rs], [100 * r.ensemble for r in rs], "o",
                label=_label(key))
    # The correlation of the setting with the most runs (correlating across architectures and
    # losses mixes unrelated scales).
    setting, rs = max(settings(records) or [("every run", records)], key=lambda x: len(x[1]))
    c = correlations(rs, "log10_live_kappa")
    ax.set_title(f"{setting}: Pearson r = {c['pearson']:.2f}, Spearman rho = "
                 f"{c['spearman']:.2f} ({c['n']} runs)", fontsize=9)
    ax.set_xlabel("median log10 live kappa")
    ax.set_ylabel("ensemble robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "robust_vs_kappa.png"))
    return paths


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(summaries: str | pathlib.Path, out: str | pathlib.Path) -> str:
    """Writes ``study_tables.md`` and the figures to ``out``; returns the tables."""
    records = load(summaries)
    out = pathlib.Path(out)
    text = tables(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_tables.md").write_text(text)
    figures(records, out)
    return text


def splice(document: str, tables_text: str) -> str:
    """Replaces the block between ``BEGIN`` and ``END`` in ``document`` with the tables.

    The tables go in from their first ``## `` section on (the page title and preamble of
    ``study_tables.md`` stay out), each heading one level deeper, so that they sit under a
    section of the host document. Splicing the same tables twice changes nothing.
    """
    if document.count(BEGIN) != 1 or document.count(END) != 1:
        raise ValueError(f"the document must hold {BEGIN!r} and {END!r} once each; it has "
                         f"{document.count(BEGIN)} and {document.count(END)}")
    head, rest = document.split(BEGIN)
    if END not in rest:
        raise ValueError(f"{END!r} comes before {BEGIN!r}")
    _, tail = rest.split(END)
    start = tables_text.find("\n## ")
    if start < 0:
        raise ValueError("the tables have no '## ' section to splice")
    body = "\n".join("#" + line if line.startswith("#") else line
                      for line in tables_text[start + 1:].rstrip("\n").split("\n"))
    return f"{head}{BEGIN}\n\n{body}\n\n{END}{tail}"


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
            spliced = splice(path.read_text(), text)
        except ValueError as e:
            raise app.UsageError(f"--splice={path}: {e}") from None
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(spliced)
        tmp.replace(path)  # atomic: a failed write leaves the document as it was
        print(f"tables spliced into {path}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
