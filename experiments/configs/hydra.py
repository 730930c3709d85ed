"""HYDRA (Sehwag et al. 2020): dense TRADES, score-based pruning with TRADES, masked fine-tuning.

    python -m experiments.main --config=experiments/configs/hydra.py --workdir=runs/hydra \
        --config.prune.sparsity=0.99

Scores start as ``sqrt(6 / fan_in) * W / max|W|`` (the first mask is layer-wise magnitude
pruning) and are trained for 3 epochs with the weights frozen; the top-k mask is then fine-tuned
for 3 epochs. On MNIST-scale data the top-k is global (``prune.scope``, see ``base.py``); on
CIFAR/SVHN it is HYDRA's per-layer rule. The baseline TSCNC is compared against. Fashion-MNIST:
about 70 minutes on the project's 2-core CPU. Expected result: not yet measured at this length;
the README's demo has measured short runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra"
    return base.finalize(c, variant)
