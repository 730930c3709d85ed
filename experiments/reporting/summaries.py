"""The kept run summaries of a study, one :class:`Record` per run.

A study keeps ``<summaries>/<run>/summary.json`` for each finished run (:mod:`experiments.study`),
with, beside it, ``standard.json`` when ``experiments.evaluate`` ran the standard ensemble on more
of the run's test images and ``spectral.json`` when ``experiments.evaluate --spectral``
recomputed its spectral fields with newer definitions; :func:`load` reads all three.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib


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
