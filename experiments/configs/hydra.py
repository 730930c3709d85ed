"""HYDRA (Sehwag et al. 2020): dense TRADES, score-based pruning with TRADES, masked fine-tuning.

    python -m experiments.main --config=experiments/configs/hydra.py --workdir=runs/hydra \
        --config.prune.sparsity=0.99

Scores start as ``sqrt(6 / fan_in) * W / max|W|`` (the first mask is layer-wise magnitude
pruning) and are trained for 3 epochs with the weights frozen; the top-k mask is then fine-tuned
for 3 epochs. On MNIST-scale data the top-k is global (``prune.scope``, see ``base.py``); on
CIFAR/SVHN it is HYDRA's per-layer rule. The baseline TSCNC is compared against.

Run time on the project's 2-core CPU: ``:quick`` 204 s (measured); full Fashion-MNIST length
about 90 minutes, estimated from measured rates (see ``base.py``). Expected result, measured
with ``:quick`` at 99 % (seed 0, first 1,000 test images, fast ensemble): clean 48.5 %, PGD-20
30.5 %, ensemble 20.4 %; the global top-k puts the pruning in ``Dense_0`` (99.95 % of it
removed, some units left without inputs, so kappa = inf there). Full length: not yet measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra"
    return base.finalize(c, variant)
