"""Defaults shared by every config; keys equal the library's argument names where they map.

Configs are locked: overriding a key that does not exist (``--config.lerning_rate=...``) fails
with the key's name.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    c.stages = ("dense", "prune", "finetune")

    c.dataset = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | svhn_cropped | synthetic
    c.num_classes = 10
    c.data = ml_collections.ConfigDict()
    c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.allow_download = True
    c.data.num_val = 5000  # carved from the training set; model selection never sees test data
    c.data.synthetic_shape = (28, 28, 1)
    c.data.synthetic_train = 512
    c.data.synthetic_test = 256
    c.augment = False  # random crop (4-pixel padding) + flip, for CIFAR/SVHN-style data

    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"
    c.model.kwargs = ml_collections.ConfigDict()

    # Adversarial training (METHOD.md section 5).
    c.loss = "trades"  # clean | pgd_at | trades | mart
    c.beta = 6.0
    c.eps = 0.1
    c.attack_steps = 10
    c.attack_step_size = ml_collections.FieldReference(None, field_type=float)  # 2.5 eps / steps
    c.batch_size = 128
    c.ema_decay = ml_collections.FieldReference(0.99, field_type=float)
    c.lr_milestones = (0.3, 0.6, 0.8)  # fractions of a stage's steps
    c.lr_factor = 0.2

    c.penalty = ml_collections.ConfigDict()
    c.penalty.temperature = 0.1
    c.penalty.delta = 1e-3
    c.penalty.cnc_form = "smooth"  # smooth | log_det
    c.penalty.cnc_layers = "all"  # all | classifier
    c.penalty.reduce = "mean"
    c.penalty.a = 1.0
    c.penalty.tsc_eps = 0.0
    c.penalty.normalize = True

    c.dense = ml_collections.ConfigDict()
    c.dense.epochs = 10
    c.dense.learning_rate = 0.05
    c.dense.momentum = 0.9
    c.dense.nesterov = True
    c.dense.weight_decay = 5e-4
    c.dense.cnc_weight = 0.0
    c.dense.tsc_weight = 0.0

    c.prune = ml_collections.ConfigDict()
    c.prune.method = "hydra"  # hydra | lwm | global | random
    c.prune.sparsity = 0.99
    c.prune.epochs = 3
    c.prune.learning_rate = 0.1
    c.prune.momentum = 0.9
    c.prune.nesterov = False

    c.finetune = ml_collections.ConfigDict()
    c.finetune.epochs = 3
    c.finetune.learning_rate = 0.01
    c.finetune.momentum = 0.9
    c.finetune.nesterov = True
    c.finetune.weight_decay = 5e-4
    c.finetune.cnc_weight = 0.0
    c.finetune.tsc_weight = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_val = 1000
    c.eval.num_test = 10000
    c.eval.pgd_steps = 20
    c.eval.pgd_step_size = ml_collections.FieldReference(None, field_type=float)
    c.eval.attacks = "standard"  # standard | fast

    c.log_every = 50
    c.progress = True
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long variant on synthetic data: every stage runs, nothing is meaningful."""
    c.dataset = "synthetic"
    c.data.synthetic_train = 256
    c.data.synthetic_test = 64
    c.data.num_val = 64
    c.batch_size = 32
    c.attack_steps = 2
    c.dense.epochs = 1
    c.prune.epochs = 1
    c.finetune.epochs = 1
    c.eval.num_val = 64
    c.eval.num_test = 64
    c.eval.pgd_steps = 3
    c.eval.attacks = "fast"
    c.log_every = 2
    c.progress = False
    if c.model.name == "small_cnn":
        c.model.kwargs = ml_collections.ConfigDict({"width": 4})
    return c


def finalize(c: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    """Applies the command-line variant (``""`` or ``"smoke"``) and locks the config."""
    if variant == "smoke":
        c = smoke(c)
    elif variant not in (None, ""):
        raise ValueError(f"Unknown config variant {variant!r}; use '' or 'smoke'.")
    c.lock()
    return c
