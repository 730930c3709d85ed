"""Fashion-MNIST, small CNN, TRADES at eps 0.1: dense -> HYDRA 99 % -> fine-tune (no TSCNC).

    python -m experiments.main --config=experiments/configs/fmnist_hydra.py \
        --workdir=runs/fmnist_hydra

Run time and results on the project's 2-core CPU machine are not measured yet.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config()
    c.name = "fmnist_hydra"
    return base.finalize(c, variant)
