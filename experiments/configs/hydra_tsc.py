"""HYDRA + TSC: the transformed-L1 sparse constraint alone (ablation of TSCNC).

    python -m experiments.main --config=experiments/configs/hydra_tsc.py --workdir=runs/hydra_tsc

The normalised TL1 penalty (a = 1, weight 1e-3) on every kernel during dense training and fine-
tuning. Fashion-MNIST: about 70 minutes on the project's 2-core CPU. Expected result: not yet
measured at this length; the README's demo has measured short runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra_tsc"
    c.dense.tsc_weight = c.finetune.tsc_weight = 1e-3
    return base.finalize(c, variant)
