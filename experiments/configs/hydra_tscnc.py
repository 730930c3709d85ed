"""HYDRA + TSCNC, the principled form: live-spectrum smooth CNC on every kernel + summed TL1 (TSC).

    python -m experiments.main --config=experiments/configs/hydra_tscnc.py \
        --workdir=runs/hydra_tscnc --config.prune.sparsity=0.99

Both constraints are active in dense training and in fine-tuning, where they act on the pruned
kernels: the CNC (weight 0.01) on each kernel's live spectrum, the TSC as in ``hydra_tsc.py``
(weight 3e-5). The quick numbers below predate both the live-spectrum CNC and that TSC scale.

Run time on the project's 2-core CPU: ``:quick`` 198 s (measured); full Fashion-MNIST length
about 90 minutes, estimated from measured rates (see ``base.py``). Expected result, measured
with ``:quick`` at 99 % (seed 0, first 1,000 test images, fast ensemble): clean 51.8 %, PGD-20
30.2 %, ensemble 21.4 % (HYDRA alone: 48.5 / 30.5 / 20.4; one seed on 1,000 images, so
differences of a few points are within noise). Full length: not yet measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra_tscnc"
    c.dense.cnc_weight = c.finetune.cnc_weight = 0.01
    c.dense.tsc_weight = c.finetune.tsc_weight = 3e-5
    return base.finalize(c, variant)
