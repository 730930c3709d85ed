"""Dense TRADES adversarial training (Zhang et al. 2019), no pruning: the dense reference.

    python -m experiments.main --config=experiments/configs/dense_trades.py \
        --workdir=runs/dense_trades
    # CIFAR-10 / SVHN (VGG-16-BN, eps 8/255; meant for accelerators):
    python -m experiments.main --config=experiments/configs/dense_trades.py:cifar10 \
        --workdir=runs/dense_trades_cifar10

Fashion-MNIST (small CNN, eps 0.1, 10 epochs, beta 6, 10-step attack): about 45 minutes on the
project's 2-core CPU (0.5 s per TRADES-10 step at batch 128, 4,290 steps, then PGD-20 and the
standard ensemble on the 10,000 test images). Expected result: not yet measured at this length
(the reproduction study will record it); the README's demo has measured short runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "dense_trades"
    c.stages = ("dense",)
    return base.finalize(c, variant)
