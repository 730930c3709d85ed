"""Fashion-MNIST, small CNN, TRADES at eps 0.1: dense -> HYDRA 99 % -> fine-tune with TSCNC.

The principled TSCNC: smooth log-condition-number penalty on every pruned kernel plus the
normalised transformed-L1 penalty, active in the dense and fine-tuning stages.

    python -m experiments.main --config=experiments/configs/fmnist_hydra_tscnc.py \
        --workdir=runs/fmnist_hydra_tscnc
    python -m experiments.main --config=experiments/configs/fmnist_hydra_tscnc.py:smoke \
        --workdir=/tmp/smoke

Run time and results on the project's 2-core CPU machine are not measured yet.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config()
    c.name = "fmnist_hydra_tscnc"
    c.dense.cnc_weight = 0.01
    c.dense.tsc_weight = 1e-3
    c.finetune.cnc_weight = 0.01
    c.finetune.tsc_weight = 1e-3
    return base.finalize(c, variant)
