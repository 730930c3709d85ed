"""HYDRA + CNC: the smooth condition-number constraint alone (ablation of TSCNC).

    python -m experiments.main --config=experiments/configs/hydra_cnc.py --workdir=runs/hydra_cnc

The smooth log-kappa surrogate (temperature 0.1, delta 1e-3, mean over kernels, weight 0.01) on
every kernel during dense training and on the *pruned* kernels during fine-tuning. Fashion-MNIST:
about 70 minutes on the project's 2-core CPU (the exact SVDs add ~1 % to a step with one OpenBLAS
thread). Expected result: not yet measured at this length; the README's demo has measured short
runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra_cnc"
    c.dense.cnc_weight = c.finetune.cnc_weight = 0.01
    return base.finalize(c, variant)
