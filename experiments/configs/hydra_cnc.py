"""HYDRA + CNC: the smooth condition-number constraint alone (ablation of TSCNC).

    python -m experiments.main --config=experiments/configs/hydra_cnc.py --workdir=runs/hydra_cnc

The smooth log-kappa surrogate (temperature 0.1, delta 1e-3, mean over kernels, weight 0.01) on
every kernel during dense training and on the *pruned* kernels during fine-tuning.

Run time on the project's 2-core CPU: ``:quick`` 199 s (measured; the exact SVDs add ~1 % to a
step with one OpenBLAS thread); full Fashion-MNIST length about 90 minutes, estimated from
measured rates (see ``base.py``). Expected result, measured with ``:quick`` at 99 % (seed 0,
first 1,000 test images, fast ensemble): clean 45.2 %, PGD-20 31.1 %, ensemble 24.6 % (HYDRA
alone: 48.5 / 30.5 / 20.4; one seed on 1,000 images, so differences of a few points are within
noise). Full length: not yet measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra_cnc"
    c.dense.cnc_weight = c.finetune.cnc_weight = 0.01
    return base.finalize(c, variant)
