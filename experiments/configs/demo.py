"""The ``make demo`` pipeline: a short dense TRADES stage, then HYDRA vs HYDRA + TSCNC at 99 %.

Variants (after the colon): ``dense``, ``hydra``, ``hydra_tscnc``, each optionally followed by
``,smoke``. ``python -m experiments.demo`` runs all three, each from the run before it
(:data:`STARTS_FROM`, through ``init_dir``): HYDRA prunes the dense run's network, and HYDRA +
TSCNC fine-tunes the HYDRA run's pruned network (its prune stage would be the same computation:
the penalties act in fine-tuning only); by hand::

    python -m experiments.main --config=experiments/configs/demo.py:dense --workdir=runs/demo/dense
    python -m experiments.main --config=experiments/configs/demo.py:hydra \
        --workdir=runs/demo/hydra --config.init_dir=runs/demo/dense
    python -m experiments.main --config=experiments/configs/demo.py:hydra_tscnc \
        --workdir=runs/demo/hydra_tscnc --config.init_dir=runs/demo/hydra

Fashion-MNIST, small CNN, eps 0.1, seed 0, a fixed 6,400-example training subset, batch 128:
dense TRADES (10-step attack) for 3 epochs (150 steps), HYDRA scores (global top-k) for 1 epoch
(50 steps) at 99 % sparsity, masked fine-tuning for 1 epoch (50 steps; with the smooth CNC + TL1
penalties in the ``hydra_tscnc`` branch only, so both branches prune the same dense network),
then PGD-20 and the fast ensemble (APGD-CE, APGD-T, Square) on the first 500 test images
(validation: PGD on 250 held-out training images per epoch). Measured wall time and table: see
the README.
"""

import ml_collections

from experiments.configs import base

METHODS = ("dense", "hydra", "hydra_tscnc")
#: The run each demo run starts from (``config.init_dir``), by method.
STARTS_FROM = {"dense": None, "hydra": "dense", "hydra_tscnc": "hydra"}


def get_config(variant: str = "hydra_tscnc"):
    parts = [p.strip() for p in variant.split(",") if p.strip()]
    smoke = "smoke" in parts
    methods = [p for p in parts if p != "smoke"]
    if len(methods) != 1 or methods[0] not in METHODS:
        raise ValueError(f"Unknown demo variant {variant!r}: use one of {METHODS}, optionally "
                         f"followed by ',smoke'.")
    method = methods[0]
    c = base.get_base_config()
    c.name = f"demo_{method}"
    c.model.kwargs = ml_collections.ConfigDict({"width": 32})
    c = base.quick(c)
    c.prune.sparsity = 0.99
    c.eval.num_test = 500
    c.eval.num_val = 250
    c.stages = {"dense": ("dense",), "hydra": ("prune", "finetune"),
                "hydra_tscnc": ("finetune",)}[method]
    if method == "hydra_tscnc":
        c.finetune.cnc_weight = 0.01
        c.finetune.tsc_weight = 3e-5
    c = base.smoke(c) if smoke else c
    if smoke:
        c.data.num_train = 0
        c.model.kwargs = ml_collections.ConfigDict({"width": 4})
    c.lock()
    return c
