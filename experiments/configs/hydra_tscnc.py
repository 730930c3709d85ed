"""HYDRA + TSCNC, the principled form: smooth CNC on every kernel + normalised TL1 (TSC).

    python -m experiments.main --config=experiments/configs/hydra_tscnc.py \
        --workdir=runs/hydra_tscnc --config.prune.sparsity=0.99

Both constraints are active in dense training and in fine-tuning, where they act on the pruned
kernels (METHOD.md section 5). Fashion-MNIST: about 70 minutes on the project's 2-core CPU.
Expected result: not yet measured at this length; the README's demo has measured short runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra_tscnc"
    c.dense.cnc_weight = c.finetune.cnc_weight = 0.01
    c.dense.tsc_weight = c.finetune.tsc_weight = 1e-3
    return base.finalize(c, variant)
