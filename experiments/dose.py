"""The dose-response study of the live-spectrum CNC: does conditioning pruned kernels matter?

    python -m experiments.dose --list                                    # the plan, nothing run
    S="--workdir=runs/dose --summaries=docs/results/dose --variant=short --set=progress=False"
    taskset -c 0 python -m experiments.dose $S --only='_s[02]$'          # half the seeds per core
    taskset -c 1 python -m experiments.dose $S --only='_s[13]$'

Primary arm: the small CNN on Fashion-MNIST, TRADES (eps 0.1), the ``short`` schedule
(``experiments/configs/base.py:short``: 3 + 1 + 1 epochs on all 55,000 training images),
HYDRA's **layer-wise** top-k (``prune.scope=layer``: every kernel keeps the same fraction, so
the convolutions are as pruned as the dense layers), sparsities 99 and 95 %, seeds 0 and 1. Per
seed, in priority order:

1. ``hydra``: plain HYDRA (no penalty) from the seed's plain TRADES model ``dense_s<seed>``;
2. ``tscnc_w1`` and ``tscnc_w0_1``: TSCNC with the live-spectrum CNC at weight 1.0 and 0.1 in
   dense training and in fine-tuning, with the TSC at the config's default strength (sum of
   TL1 over the weights, ``tsc_weight`` in ``experiments/configs/hydra_tscnc.py``); each arm's
   99 % run trains its penalised dense stage, its 95 % run prunes that one;
3. ``tsc``: the same TSC without CNC (CNC weight 0 with TSC held fixed: the dose-response's own
   zero);
then, after the secondary arm, the wider doses ``tscnc_w10`` and ``tscnc_w0_01``.

Secondary arm (after both seeds' primary runs): LeNet-5 with the global top-k at 95 %, seeds 0-3,
TSCNC with CNC weight 0.1 and 1.0 (``lenet5_tscnc_w*``), and plain HYDRA on the same seeds
(``lenet5_hydra_95_s*``, the baseline the kept study also ran, rerun here for the same
evaluation).

Every run evaluates PGD-20 and the fast ensemble on all 10,000 test images and AutoAttack's
standard ensemble on the first 1,000 (``eval.num_standard=1000``), the local Lipschitz estimate
on the first 500, and records per kernel the live condition number of the reshaped kernel and,
for the convolutions, of the circular operator (``experiments.evaluate.spectral_report``). The
predictions and the criteria they are read with are in ``docs/results.md`` (written before the
runs). The runs share the study's machinery (:mod:`experiments.study`): resumable, each in its own
process and workdir, a kept summary is not rerun, and a run reusing a dense stage retrains it
when only the kept summary of its source exists.
"""

from __future__ import annotations

from absl import app

from experiments import study
from experiments.study import Run

SEEDS = (0, 1)
SPARSITIES = (0.99, 0.95)
#: CNC weights of the primary arm, in priority order (1.0 and 0.1 first, the wider doses last).
CNC_WEIGHTS = (1.0, 0.1, 10.0, 0.01)
LENET_SEEDS = (0, 1, 2, 3)
LENET_WEIGHTS = (1.0, 0.1)
LAYER = (("prune.scope", "layer"),)
EVAL = (("eval.num_standard", "1000"),)
LENET = (("model.name", "lenet5"), ("prune.scope", "global"))


def weight_tag(weight: float) -> str:
    """``1.0`` -> ``"w1"``, ``0.1`` -> ``"w0_1"``: the CNC weight in a run name."""
    return "w" + f"{weight:g}".replace(".", "_")


def _cnc(weight: float) -> tuple[tuple[str, str], ...]:
    return (("dense.cnc_weight", repr(weight)), ("finetune.cnc_weight", repr(weight)))


def _arm(name: str, config: str, seed: int, extra: tuple, prefix: str = "",
         shared_dense: str | None = None, sparsities=SPARSITIES) -> list[Run]:
    """One method at each sparsity; the first trains its own dense stage unless it prunes
    ``shared_dense``, the others reuse the first's."""
    runs = []
    for i, sp in enumerate(sparsities):
        dense = shared_dense if shared_dense else (None if i == 0 else runs[0].name)
        runs.append(Run(f"{prefix}{name}_{study._pct(sp)}_s{seed}", config,
                        (("seed", str(seed)), ("prune.sparsity", str(sp)), ("name", name),
                         *extra), dense))
    return runs


def primary(seed: int) -> list[Run]:
    """The small-CNN runs of one seed, in priority order: HYDRA, TSCNC at 1.0 and 0.1, TSC."""
    base = (*LAYER, *EVAL)
    runs = [Run(f"dense_s{seed}", "dense_trades", (("seed", str(seed)), *EVAL))]
    runs += _arm("hydra", "hydra", seed, base, shared_dense=f"dense_s{seed}")
    for weight in CNC_WEIGHTS[:2]:
        runs += _arm(f"tscnc_{weight_tag(weight)}", "hydra_tscnc", seed, (*base, *_cnc(weight)))
    return runs + _arm("tsc", "hydra_tsc", seed, base)


def wider_doses(seed: int) -> list[Run]:
    """The small-CNN runs at CNC weights 10 and 0.01, if the budget allows."""
    return [r for weight in CNC_WEIGHTS[2:]
            for r in _arm(f"tscnc_{weight_tag(weight)}", "hydra_tscnc", seed,
                          (*LAYER, *EVAL, *_cnc(weight)))]


def lenet(seed: int) -> list[Run]:
    """The LeNet-5 runs of one seed: TSCNC at each weight (own dense stage), then HYDRA."""
    runs = []
    for weight in LENET_WEIGHTS:
        runs += _arm(f"tscnc_{weight_tag(weight)}", "hydra_tscnc", seed,
                     (*LENET, *EVAL, *_cnc(weight)), prefix="lenet5_", sparsities=(0.95,))
    runs.append(Run(f"lenet5_dense_s{seed}", "dense_trades",
                    (("seed", str(seed)), ("model.name", "lenet5"), *EVAL)))
    runs += _arm("hydra", "hydra", seed, (*LENET, *EVAL), prefix="lenet5_",
                 shared_dense=f"lenet5_dense_s{seed}", sparsities=(0.95,))
    return runs


def plan() -> list[Run]:
    """Every run of the dose-response study, in priority order (see the module docstring)."""
    runs = [r for seed in SEEDS for r in primary(seed)]
    runs += [r for seed in LENET_SEEDS for r in lenet(seed)]
    return runs + [r for seed in SEEDS for r in wider_doses(seed)]


def main(argv):
    study.main(argv, plan)


if __name__ == "__main__":
    study.define_flags()
    app.run(main)
