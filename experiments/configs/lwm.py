"""Layer-wise magnitude pruning (LWM) of the dense TRADES model, then masked fine-tuning.

    python -m experiments.main --config=experiments/configs/lwm.py --workdir=runs/lwm \
        --config.prune.sparsity=0.99

Every kernel loses the same fraction of its smallest-magnitude weights (``ceil(s * n)``), then
the survivors are fine-tuned with TRADES.

Run time on the project's 2-core CPU: ``:quick`` 154 s (measured); full Fashion-MNIST length
(dense 10 epochs, fine-tune 3 epochs, evaluation) about 75 minutes, estimated from measured
rates (see ``base.py``). Expected result, measured with ``:quick`` at 99 % (seed 0, first 1,000
test images): 8.7 % clean and robust, i.e. a constant prediction. At 99 % every layer keeps 1 %
of its weights, the 288-weight first conv 3 of them, and every kernel is rank deficient (kappa =
inf in all four); one epoch of fine-tuning did not revive it. Use
``--config.prune.sparsity=0.9`` for a network that still works. Full length: not yet measured.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "lwm"
    c.prune.method = "lwm"
    return base.finalize(c, variant)
