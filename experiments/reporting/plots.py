"""PNG figures of a run, of several runs side by side, and of a study's kept runs.

Figures are :class:`matplotlib.figure.Figure` objects saved directly, so importing this module
neither selects a backend nor touches pyplot's state (notebooks keep their inline figures).

* ``accuracy.png``: training clean / adversarial accuracy (logged steps) and validation clean /
  robust accuracy (after each epoch), stage by stage on one step axis.
* ``kappa_layers.png``: per-layer log10 condition number of the dense network before pruning
  and of the final (pruned) network.
* :func:`kappa_per_method` (used by :mod:`experiments.reporting.compare`): log10 kappa against
  layer for several runs.
* :func:`figures` (the study's report): median log10 live kappa, ensemble robust accuracy and
  the Lipschitz bound against target sparsity per method, and robust accuracy against kappa.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections import defaultdict

import matplotlib
from matplotlib.figure import Figure

from experiments.reporting.statistics import aggregate, correlations, settings
from experiments.reporting.summaries import Record

STAGE_COLORS = {"dense": "tab:blue", "prune": "tab:orange", "finetune": "tab:green"}


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, skipping a torn last line (a killed run)."""
    records = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _short(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("kernel", "conv", "params")]
    return "/".join(parts) or name


def _log10(values) -> list[float]:
    return [math.log10(v) if v > 0 and math.isfinite(v) else math.inf for v in values]


def _plot_log_kappa(ax, values, style: str, label: str) -> None:
    """log10 kappa per layer; infinite values (rank-deficient kernels) as ^ markers at the top."""
    logk = _log10(values)
    x = list(range(len(logk)))
    finite = [v if math.isfinite(v) else math.nan for v in logk]
    (line,) = ax.plot(x, finite, style, label=label)
    inf_x = [i for i, v in enumerate(logk) if not math.isfinite(v)]
    if inf_x:
        ax.plot(inf_x, [1.0] * len(inf_x), "^", color=line.get_color(), markersize=10,
                transform=ax.get_xaxis_transform(), clip_on=False)


def _finish_kappa_axes(ax, names: list[str]) -> None:
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("log10 condition number (^ at the top: infinite)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def accuracy_curves(records: list[dict], out: str | pathlib.Path) -> pathlib.Path:
    """Training and validation accuracy against the global step, one colour per stage."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    offsets, total = {}, 0
    for stage in STAGE_COLORS:  # stages run in this order; each restarts its step count
        steps = [r["step"] for r in records if r["stage"] == stage]
        if steps:
            offsets[stage], total = total, total + max(steps)
    for stage, color in STAGE_COLORS.items():
        rows = [r for r in records if r["stage"] == stage]
        if not rows:
            continue
        o = offsets[stage]
        train = [r for r in rows if "clean_acc" in r]
        val = [r for r in rows if "val_clean_acc" in r]
        if train:
            steps = [o + r["step"] for r in train]
            ax.plot(steps, [r["clean_acc"] for r in train], color=color, alpha=0.35, lw=1)
            ax.plot(steps, [r["adv_acc"] for r in train], color=color, alpha=0.35, lw=1, ls="--")
        if val:
            steps = [o + r["step"] for r in val]
            ax.plot(steps, [r["val_clean_acc"] for r in val], "o-", color=color,
                    label=f"{stage}: val clean")
            ax.plot(steps, [r["val_robust_acc"] for r in val], "s--", color=color,
                    label=f"{stage}: val robust (PGD)")
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("thin: training batches (solid clean, dashed adversarial)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out)


def kappa_before_after(summary: dict, out: str | pathlib.Path) -> pathlib.Path:
    """Per-layer log10 kappa of the dense kernels and of the final (pruned) kernels."""
    after = summary["kappa"]
    names = list(after)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if "dense_kappa" in summary:
        before = summary["dense_kappa"]
        _plot_log_kappa(ax, [before[n] for n in names], "o-", "dense (before pruning)")
    _plot_log_kappa(ax, [after[n] for n in names], "s-",
                    f"final ({100 * summary['sparsity']:.1f} % sparse)")
    ax.set_title(summary["config"].get("name", "run"))
    _finish_kappa_axes(ax, names)
    return _save(fig, out)


def kappa_per_method(summaries: list[dict], out: str | pathlib.Path) -> pathlib.Path:
    """log10 kappa against layer, one line per run (runs must share the architecture)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    names = list(summaries[0]["kappa"])
    for s in summaries:
        _plot_log_kappa(ax, [s["kappa"].get(n, math.nan) for n in names], "o-",
                        f"{s['config'].get('name', 'run')} ({100 * s['sparsity']:.1f} %)")
    _finish_kappa_axes(ax, names)
    return _save(fig, out)


def run_plots(workdir: str | pathlib.Path, summary: dict) -> list[pathlib.Path]:
    """Writes ``accuracy.png`` and ``kappa_layers.png`` into ``workdir``."""
    workdir = pathlib.Path(workdir)
    out = [kappa_before_after(summary, workdir / "kappa_layers.png")]
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        out.append(accuracy_curves(read_metrics(metrics), workdir / "accuracy.png"))
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
    """Writes the study's figures into ``out``: ``kappa_vs_sparsity.png``,
    ``robust_vs_sparsity.png`` and ``lipschitz_vs_sparsity.png`` (mean and spread over seeds per
    method, one panel per model and loss) and ``robust_vs_kappa.png`` (every run)."""
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


def _save(fig, out: str | pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
