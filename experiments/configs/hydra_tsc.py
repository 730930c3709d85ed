"""HYDRA + TSC: the transformed-L1 sparse constraint alone (ablation of TSCNC).

    python -m experiments.main --config=experiments/configs/hydra_tsc.py --workdir=runs/hydra_tsc

The TL1 penalty (a = 1, summed over the weights, weight 3e-5: a pull of about 6e-5 per weight,
a few times weight decay's 5e-4 * |w| at the trained kernels' median |w| ~ 0.013) on every kernel
during dense training and fine-tuning. Measured on one epoch of dense TRADES it moved the
fraction of kernel weights below 1e-3 from 4.0 % to 45 % (``docs/results.md``, TSC scale); the
runs quoted below used the earlier, per-weight-normalised form at weight 1e-3, which had no
measurable effect.

Run time on the project's 2-core CPU: ``:quick`` 197 s (measured); full Fashion-MNIST length
about 90 minutes, estimated from measured rates (see ``base.py``). Expected result, measured
with ``:quick`` at 99 % (seed 0, first 1,000 test images, fast ensemble): clean 49.9 %, PGD-20
29.2 %, ensemble 18.6 % (HYDRA alone: 48.5 / 30.5 / 20.4). Full length: not yet measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "hydra_tsc"
    c.dense.tsc_weight = c.finetune.tsc_weight = 3e-5
    return base.finalize(c, variant)
