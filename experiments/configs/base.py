"""Defaults shared by every config; keys equal the library's argument names where they map.

Every method config takes a variant after the colon: a dataset (``fashion_mnist`` by default,
``mnist``, ``cifar10``, ``svhn_cropped``), optionally followed by a size, ``,short``,
``,quick`` or ``,smoke``; a size alone applies to Fashion-MNIST::

    --config=experiments/configs/hydra_tscnc.py                  # Fashion-MNIST, small CNN
    --config=experiments/configs/hydra_tscnc.py:quick            # the same at the demo's length
    --config=experiments/configs/hydra_tscnc.py:cifar10          # CIFAR-10, VGG-16-BN
    --config=experiments/configs/hydra_tscnc.py:cifar10,smoke    # seconds, synthetic 32x32x3

``short`` is the reproduction study's CPU schedule (all the training data, 3 + 1 + 1 epochs,
the standard ensemble on a 500-image subset; see :func:`short`). ``quick`` keeps the real data
and model and shortens everything else to the ``make demo`` length (6,400 training images,
3 + 1 + 1 epochs, fast ensemble on 1,000 test images): a few minutes here, enough to see a
method's effect begin, not its converged numbers. ``smoke`` runs every
stage on synthetic data in seconds and means nothing.

Run times quoted in the configs' docstrings: ``:quick`` is measured (``python -m
experiments.sweep --workdir=runs/quick --variant=quick <configs>``, one run at a time on the
project's 2-core CPU, 2026-12-01; the summaries are kept in ``docs/results/quick/``). Full
Fashion-MNIST lengths are estimates from rates measured in those runs: about 0.55 s per TRADES-10
or PGD-AT-10 step of the small CNN at batch 128 including the per-epoch validation (10 epochs
are 4,290 steps, about 40 minutes), and 321 s for PGD-20 plus the standard ensemble on 1,000
test images of the 55 %-robust dense model (about 55 minutes on 10,000; the attacks after
APGD-CE only run on the points still robust, so a pruned model evaluates faster). All of these
predate the later speed work (custom convolution / pooling derivatives and
``tscnc_jax.xla_cpu.set_fast_cpu_flags``): a small-CNN TRADES-10 step now takes about 0.2 s
(``benchmarks/results/run.md``), so expect the quoted times to shrink by up to ~3x; they have not
been re-measured.

Configs are locked: overriding a key that does not exist (``--config.lerning_rate=...``) fails
with the key's name.
"""

from __future__ import annotations

import ml_collections

from tscnc_jax import defaults

DATASETS = ("fashion_mnist", "mnist", "cifar10", "svhn_cropped")


SIZES = ("full", "short", "quick", "smoke")


def parse_variant(variant: str | None) -> tuple[str, str]:
    """``"cifar10,smoke"`` -> ``("cifar10", "smoke")``; ``""`` -> ``("fashion_mnist", "full")``."""
    parts = [p.strip() for p in (variant or "").split(",") if p.strip()]
    sizes = [p for p in parts if p in SIZES]
    rest = [p for p in parts if p not in SIZES]
    if len(sizes) > 1 or len(rest) > 1 or (rest and rest[0] not in DATASETS):
        raise ValueError(f"Unknown config variant {variant!r}: use a dataset from {DATASETS}, "
                         f"optionally followed by one size from {SIZES[1:]} (',quick'), or a "
                         f"size alone.")
    return (rest[0] if rest else "fashion_mnist"), (sizes[0] if sizes else "full")


def _weight_stage(epochs: int, learning_rate: float) -> ml_collections.ConfigDict:
    """A stage that trains the weights (dense, finetune): Nesterov SGD with weight decay and the
    penalties' weights (0: off)."""
    s = ml_collections.ConfigDict()
    s.epochs = epochs
    s.learning_rate = learning_rate
    s.momentum = 0.9
    s.nesterov = True
    s.weight_decay = 5e-4
    s.cnc_weight = 0.0
    s.tsc_weight = 0.0
    s.gated_tsc_weight = 0.0
    return s


def get_base_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The shared defaults, specialised to the variant's dataset (see the module docstring)."""
    dataset, _ = parse_variant(variant)
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.seed = 0
    c.stages = ("dense", "prune", "finetune")
    # Workdir of a run whose finished earlier stages this run starts from (e.g. one dense model
    # shared by several pruning methods, or another method's: only the weights are taken from a
    # dense stage, not its optimizer state); None: this run's own workdir.
    c.init_dir = ml_collections.FieldReference(None, field_type=str)

    c.dataset = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | svhn_cropped | synthetic
    c.num_classes = 10
    c.data = ml_collections.ConfigDict()
    c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.allow_download = True
    c.data.num_val = 5000  # carved from the training set; model selection never sees test data
    # Seed of that split (and of the num_train subset): not the training seed, so runs with
    # different seeds train and select on the same examples.
    c.data.split_seed = 0
    c.data.num_train = 0  # > 0: train on the first num_train (shuffled) examples only
    c.data.synthetic_shape = (28, 28, 1)
    c.data.synthetic_train = 512
    c.data.synthetic_test = 256
    c.augment = False  # random crop (4-pixel padding) + flip, for CIFAR/SVHN-style data

    c.model = ml_collections.ConfigDict()
    c.model.name = "small_cnn"
    c.model.kwargs = ml_collections.ConfigDict()
    # Compute dtype (float32 | bfloat16; parameters, penalties and their SVDs stay float32) and
    # layer kernels (auto: the XLA:CPU-tuned ones only where lowered for the CPU | cpu | xla).
    c.model.dtype = "float32"
    c.model.conv_impl = "auto"

    # Adversarial training (docs/method.md section 5).
    c.loss = "trades"  # clean | pgd_at | trades | mart
    c.beta = 6.0
    c.eps = 0.1
    c.attack_steps = 10
    c.attack_step_size = ml_collections.FieldReference(None, field_type=float)  # 2.5 eps / steps
    c.batch_size = 128
    c.ema_decay = ml_collections.FieldReference(0.99, field_type=float)
    c.lr_milestones = (0.3, 0.6, 0.8)  # fractions of a stage's steps
    c.lr_factor = 0.2

    # The penalties' keyword arguments, exactly as the library takes them: config.cnc goes to
    # tscnc_jax.add_condition_number_penalty(**config.cnc), config.tsc to
    # add_transformed_sparsity_penalty, config.gated_tsc to add_gated_sparsity_penalty. Their
    # weights are per stage (config.dense.cnc_weight, ...).
    c.cnc = ml_collections.ConfigDict()
    c.cnc.temperature = defaults.CNC_TEMPERATURE
    c.cnc.delta = defaults.CNC_DELTA
    c.cnc.form = "smooth"  # smooth | log_det
    c.cnc.eps = 1e-5  # the log-det form's determinant offset
    c.cnc.reduce = defaults.CNC_REDUCE
    c.cnc.live = True  # each kernel's live spectrum (a pruned kernel's structural zeros left out)
    # exact: an SVD of every kernel per step | tracked: warm-started singular vectors
    # (tscnc_jax.spectral_tracking, smooth form only; k, iterations, resync_every below).
    c.cnc.estimator = "exact"
    c.cnc.k = 1
    c.cnc.iterations = 2
    c.cnc.resync_every = 100
    c.cnc_layers = "all"  # which kernels the CNC sees: all | classifier (the authors' code)
    c.tsc = ml_collections.ConfigDict()
    c.tsc.a = defaults.TSC_A
    c.tsc.eps = 0.0
    # sum: every weight gets tsc_weight * rho_a'(w) ~ 2 tsc_weight (a = 1), weight decay's scale
    # at tsc_weight ~ 1e-5 (tscnc_jax.transformed_sparsity_penalty); layer_mean | mean divide it.
    c.tsc.reduce = defaults.TSC_REDUCE
    # Gated (structured) TSC of the authors' code, for models with hard-concrete gates.
    c.gated_tsc = ml_collections.ConfigDict()
    c.gated_tsc.form = "textbook"  # textbook | authors_code
    c.gated_tsc.a = defaults.GATED_A
    c.gated_tsc.num_train = defaults.GATED_NUM_TRAIN  # the authors' constant N
    c.gated_tsc.weight_decay = defaults.GATED_WEIGHT_DECAY
    c.gated_tsc.lambda0 = defaults.GATED_LAMBDA0
    c.gated_tsc.prior_keep = defaults.GATED_PRIOR_KEEP
    c.clamp_gates = False  # the authors' per-step clamp of log_alpha to [log 0.01, log 100]

    c.dense = _weight_stage(epochs=10, learning_rate=0.05)

    c.prune = ml_collections.ConfigDict()
    c.prune.method = "hydra"  # hydra | lwm | global | random
    c.prune.sparsity = 0.99
    # HYDRA's top-k: "layer" (the same keep ratio in every layer, HYDRA's rule) or "global" (one
    # ranking of all scores, >= 1 weight per layer). The small CNN's 288-weight first conv keeps
    # 2 weights at 99 % layer-wise (num_to_prune), so the MNIST-scale presets use "global".
    c.prune.scope = "global"
    c.prune.epochs = 3
    c.prune.learning_rate = 0.1
    c.prune.momentum = 0.9
    c.prune.nesterov = False

    c.finetune = _weight_stage(epochs=3, learning_rate=0.01)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_val = 1000
    c.eval.num_test = 10000
    c.eval.pgd_steps = 20
    c.eval.pgd_step_size = ml_collections.FieldReference(None, field_type=float)
    c.eval.attacks = "standard"  # standard | fast
    # > 0 with attacks="fast": also the standard ensemble on the first num_standard test images,
    # reported beside the fast ensemble's accuracy on the same images (the fast-vs-standard gap).
    c.eval.num_standard = 0
    # Empirical local Lipschitz constant (tscnc_jax.local_lipschitz) on the first test images, in
    # the threat model's eps-ball: max over a PGD search of ||f(x') - f(x)||_2 / ||x' - x||_2.
    c.eval.num_lipschitz = 1000
    c.eval.lipschitz_steps = 20
    # Test images per chunk of the final evaluation (each chunk with its own attack keys; the
    # processes of a multi-process run share the chunks out). 0: one chunk per process. Give a
    # size to make the numbers independent of the number of processes.
    c.eval.chunk = 0
    c.eval.checkpoint = "final"  # final | best (best validation robust accuracy of the last stage)
    # False: train the stages and stop, without the test-set evaluation or a summary (a run
    # retrained only for the checkpoints other runs start from; see experiments.study).
    c.eval.final = True

    c.log_every = 50
    c.progress = True
    c.plots = True
    _DATASET_PRESETS[dataset](c)
    return c


def _mnist_like(c: ml_collections.ConfigDict) -> None:
    c.model.name = "small_cnn"


def _mnist(c: ml_collections.ConfigDict) -> None:
    c.dataset = "mnist"
    c.eps = 0.3
    c.attack_steps = 40
    c.attack_step_size = 0.01


def _cifar_like(c: ml_collections.ConfigDict) -> None:
    """VGG-16-BN at eps 8/255 with crop-and-flip augmentation (HYDRA's CIFAR recipe)."""
    c.prune.scope = "layer"
    c.model.name = "vgg"
    c.model.kwargs = ml_collections.ConfigDict({"depth": 16, "use_bn": True})
    c.data.synthetic_shape = (32, 32, 3)
    c.eps = 8 / 255
    c.attack_step_size = 2 / 255
    c.eval.pgd_step_size = 2 / 255
    c.augment = True
    c.dense.epochs = 100
    c.dense.learning_rate = 0.1
    c.prune.epochs = 20
    c.finetune.epochs = 20


def _cifar10(c: ml_collections.ConfigDict) -> None:
    _cifar_like(c)
    c.dataset = "cifar10"


def _svhn(c: ml_collections.ConfigDict) -> None:
    _cifar_like(c)  # the loader disables the horizontal flip for digits
    c.dataset = "svhn_cropped"
    c.dense.epochs = 50
    c.dense.learning_rate = 0.01  # SVHN diverges at CIFAR's 0.1 under adversarial training
    c.prune.learning_rate = 0.01
    c.finetune.learning_rate = 0.001


_DATASET_PRESETS = {"fashion_mnist": _mnist_like, "mnist": lambda c: (_mnist_like(c), _mnist(c)),
                    "cifar10": _cifar10, "svhn_cropped": _svhn}


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
    c.eval.lipschitz_steps = 3
    c.eval.attacks = "fast"
    c.log_every = 2
    c.progress = False
    c.plots = False
    shrink = {"small_cnn": {"width": 4}, "vgg": {"width": 1 / 16},
              "wide_resnet": {"depth": 10, "widen_factor": 1}}
    c.model.kwargs.update(shrink.get(c.model.name, {}))
    return c


def quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``make demo`` length on the real data and model: a few minutes per run here."""
    c.data.num_train = 6400  # a fixed subset, the same for every seed
    c.dense.epochs = 3
    c.prune.epochs = 1
    c.finetune.epochs = 1
    c.lr_milestones = (0.5, 0.75)
    c.eval.num_val = 500
    c.eval.num_test = 1000
    c.eval.attacks = "fast"
    c.log_every = 20
    return c


def short(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The reproduction study's CPU schedule: all the data, a third of the epochs, cheaper eval.

    The full 55,000-image training split, dense 3 epochs, prune 1, fine-tune 1; PGD-20 and the
    fast ensemble on all 10,000 test images, the standard ensemble on the first 500 (with the
    fast ensemble's accuracy on the same 500 for the gap) and the local Lipschitz estimate on the
    first 500. Measured on the project's 2-core CPU (2026-12-02, small CNN): 14-16 minutes for a
    dense TRADES run, 14.6 for a HYDRA run from that dense model (``--config.stages=prune,finetune``
    with ``init_dir``; 9 of them evaluation), 21-26 for HYDRA + CNC / TSCNC with their own
    penalised dense stage, 16 for the authors'-code TSCNC.
    """
    c.dense.epochs = 3
    c.prune.epochs = 1
    c.finetune.epochs = 1
    c.lr_milestones = (0.5, 0.75)
    c.eval.num_val = 500
    c.eval.attacks = "fast"
    c.eval.num_standard = 500
    c.eval.num_lipschitz = 500
    c.log_every = 100
    return c


# Keys of the one ``penalty`` section of configs from before the per-penalty sections, with
# their places now; the live spectrum did not exist then (the CNC saw every singular value).
_PENALTY_KEYS = {"temperature": ("cnc", "temperature"), "delta": ("cnc", "delta"),
                 "cnc_form": ("cnc", "form"), "reduce": ("cnc", "reduce"),
                 "live": ("cnc", "live"), "a": ("tsc", "a"), "tsc_eps": ("tsc", "eps"),
                 "tsc_reduce": ("tsc", "reduce"), "gated_form": ("gated_tsc", "form"),
                 "gated_a": ("gated_tsc", "a"), "gated_num_train": ("gated_tsc", "num_train"),
                 "gated_weight_decay": ("gated_tsc", "weight_decay"),
                 "gated_lambda0": ("gated_tsc", "lambda0"), "cnc_layers": (None, "cnc_layers"),
                 "clamp_gates": (None, "clamp_gates")}


def from_summary(config: dict) -> ml_collections.ConfigDict:
    """The config a run summary recorded, in today's layout (for restoring a finished run).

    Summaries written before the per-penalty sections hold one ``penalty`` section: its keys
    move to ``cnc`` / ``tsc`` / ``gated_tsc`` with the library's names, ``normalize=True``
    becomes ``tsc.reduce="mean"`` (``False``: ``"sum"``), and the CNC of such a run saw the whole
    spectrum (``cnc.live=False``) unless it says otherwise. Other keys are kept as they are.
    """
    config = dict(config)
    old = config.pop("penalty", None)
    if old is not None:
        sections = {"cnc": {"live": False, "eps": 1e-5}, "tsc": {}, "gated_tsc": {}}
        for key, value in old.items():
            if key == "normalize":
                sections["tsc"].setdefault("reduce", "mean" if value else "sum")
                continue
            section, name = _PENALTY_KEYS[key]
            if section is None:
                config[name] = value
            else:
                sections[section][name] = value
        config.update(sections)
    return ml_collections.ConfigDict(config)


def finalize(c: ml_collections.ConfigDict, variant: str | None) -> ml_collections.ConfigDict:
    """Applies the variant's size (``quick``, ``smoke``), if any, and locks the config."""
    _, size = parse_variant(variant)
    c = {"full": lambda c: c, "short": short, "quick": quick, "smoke": smoke}[size](c)
    c.lock()
    return c
