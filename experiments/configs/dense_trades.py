"""Dense TRADES adversarial training (Zhang et al. 2019), no pruning: the dense reference.

    python -m experiments.main --config=experiments/configs/dense_trades.py \
        --workdir=runs/dense_trades
    # CIFAR-10 / SVHN (VGG-16-BN, eps 8/255; meant for accelerators):
    python -m experiments.main --config=experiments/configs/dense_trades.py:cifar10 \
        --workdir=runs/dense_trades_cifar10

Run time on the project's 2-core CPU: ``:quick`` 141 s (measured); the full Fashion-MNIST
recipe (small CNN, eps 0.1, 10 epochs, beta 6, 10-step attack: 4,290 steps, then PGD-20 and the
standard ensemble on the 10,000 test images) about 95 minutes, estimated from measured rates
(see ``base.py``). Expected result, measured with ``:quick`` (seed 0, first 1,000 test images):
clean 76.3 %, PGD-20 59.1 %, fast ensemble 55.2 %, standard ensemble 54.7 %. Full length: not
yet measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "dense_trades"
    c.stages = ("dense",)
    return base.finalize(c, variant)
