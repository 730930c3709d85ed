"""Dense PGD adversarial training (Madry et al. 2018), no pruning.

    python -m experiments.main --config=experiments/configs/dense_pgd_at.py \
        --workdir=runs/dense_pgd_at

Run time on the project's 2-core CPU: ``:quick`` 140 s (measured); the full Fashion-MNIST
recipe (small CNN, eps 0.1, 10 epochs, 10-step PGD) about 95 minutes, estimated from measured
rates (see ``base.py``). Expected result, measured with ``:quick`` (seed 0, first 1,000 test
images, fast ensemble): clean 74.3 %, PGD-20 58.8 %, ensemble 55.5 %. Full length: not yet
measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "dense_pgd_at"
    c.stages = ("dense",)
    c.loss = "pgd_at"
    return base.finalize(c, variant)
