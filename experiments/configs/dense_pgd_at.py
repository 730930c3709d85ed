"""Dense PGD adversarial training (Madry et al. 2018), no pruning.

    python -m experiments.main --config=experiments/configs/dense_pgd_at.py \
        --workdir=runs/dense_pgd_at

Fashion-MNIST (small CNN, eps 0.1, 10 epochs, 10-step PGD): about 45 minutes on the project's
2-core CPU (a PGD-AT-10 step costs about as much as a TRADES-10 step). Expected result: not yet
measured at this length; the README's demo has measured short runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "dense_pgd_at"
    c.stages = ("dense",)
    c.loss = "pgd_at"
    return base.finalize(c, variant)
