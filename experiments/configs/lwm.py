"""Layer-wise magnitude pruning (LWM) of the dense TRADES model, then masked fine-tuning.

    python -m experiments.main --config=experiments/configs/lwm.py --workdir=runs/lwm \
        --config.prune.sparsity=0.99

Every kernel loses the same fraction of its smallest-magnitude weights (``ceil(s * n)``), then
the survivors are fine-tuned with TRADES. Fashion-MNIST: about 60 minutes on the project's 2-core
CPU (dense 10 epochs, fine-tune 3 epochs, evaluation). Expected result: not yet measured at this
length; the README's demo has measured short runs.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config(variant)
    c.name = "lwm"
    c.prune.method = "lwm"
    return base.finalize(c, variant)
