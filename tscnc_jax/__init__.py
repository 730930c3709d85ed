"""tscnc_jax: compact and robust neural networks in JAX.

Implements TSCNC (Feng, Lin, Gao, Wei, "Lipschitz Constant Meets Condition Number: Learning Robust
and Compact Deep Neural Networks", arXiv 2503.20454): a smooth condition-number constraint (CNC)
and a transformed sparse constraint (TSC) for adversarially trained, heavily pruned networks.

The top level holds what a user composes: the penalties (functions and optax transformations)
and the spectral quantities they rest on, the pruning masks and the ``sparsify`` wrapper, the
training step and optimizer, the robustness evaluation, the models. The rest lives in
sub-namespaces, as in optax:

* :mod:`tscnc_jax.attacks`: FGSM, PGD, APGD(-T), FAB(-T), Square, the AutoAttack-style
  ensemble, the attack losses;
* :mod:`tscnc_jax.pruning`: also the top-k engine and the schedules;
* :mod:`tscnc_jax.sparsity`: transformed L1 and the hard-concrete gates;
* :mod:`tscnc_jax.spectral_tracking`: the SVD-free CNC's internals;
* :mod:`tscnc_jax.training`: the TRADES / MART losses; :mod:`tscnc_jax.parallel`: data
  parallelism; :mod:`tscnc_jax.xla_cpu`: XLA:CPU settings for entry points;
  :mod:`tscnc_jax.defaults`: every penalty default.

Names that moved there from the top level still resolve here, with a ``DeprecationWarning``
naming their new place.
"""

import importlib as _importlib
import warnings as _warnings

from tscnc_jax import (
    attacks,
    defaults,
    metrics,
    parallel,
    pruning,
    sparsity,
    spectral,
    spectral_tracking,
    training,
    tree_utils,
    xla_cpu,
)
from tscnc_jax.evaluation import (
    AttackSoundnessError,
    GradientMaskingWarning,
    RobustnessReport,
    check_adversarial,
    evaluate_robustness,
)
from tscnc_jax.metrics import local_lipschitz
from tscnc_jax.models import create_model
from tscnc_jax.penalties import (
    DEFAULT_DELTA,
    DEFAULT_TEMPERATURE,
    condition_number_penalty,
    gated_sparsity_penalty,
    transformed_sparsity_penalty,
)
from tscnc_jax.pruning import (
    IterativeSchedule,
    LayerSparsity,
    MaskFn,
    OneShotSchedule,
    PolynomialSchedule,
    PruningSchedule,
    PruningState,
    SparsitySummary,
    global_channel_masks,
    global_magnitude_masks,
    init_scores,
    layerwise_channel_masks,
    layerwise_magnitude_masks,
    masked_params_from_scores,
    nonzero_masks,
    random_masks,
    scores_to_masks,
    sparsify,
    summarize_sparsity,
)
from tscnc_jax.sparsity import gated_tsc_penalty, transformed_l1
from tscnc_jax.spectral import (
    as_matrix,
    condition_number,
    conv_operator_singular_values,
    live_singular_value_count,
    log_det_condition_penalty,
    singular_values,
    smooth_log_condition_number,
    tree_condition_numbers,
    tree_live_condition_numbers,
)
from tscnc_jax.spectral_tracking import add_tracked_condition_number_penalty
from tscnc_jax.training import (
    TrainState,
    create_train_state,
    default_attack,
    ema_update,
    make_eval_step,
    make_optimizer,
    make_train_step,
)
from tscnc_jax.transforms import (
    ConditionNumberPenaltyState,
    SparsityPenaltyState,
    add_condition_number_penalty,
    add_gated_sparsity_penalty,
    add_transformed_sparsity_penalty,
    clamp_log_alpha_updates,
    penalty_values,
    tscnc,
)
from tscnc_jax.tree_utils import apply_masks, check_masks, is_kernel, named_leaves, path_to_str

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_TEMPERATURE",
    "AttackSoundnessError",
    "ConditionNumberPenaltyState",
    "GradientMaskingWarning",
    "IterativeSchedule",
    "LayerSparsity",
    "MaskFn",
    "OneShotSchedule",
    "PolynomialSchedule",
    "PruningSchedule",
    "PruningState",
    "RobustnessReport",
    "SparsityPenaltyState",
    "SparsitySummary",
    "TrainState",
    "add_condition_number_penalty",
    "add_gated_sparsity_penalty",
    "add_tracked_condition_number_penalty",
    "add_transformed_sparsity_penalty",
    "apply_masks",
    "as_matrix",
    "attacks",
    "check_adversarial",
    "check_masks",
    "clamp_log_alpha_updates",
    "condition_number",
    "condition_number_penalty",
    "conv_operator_singular_values",
    "create_model",
    "create_train_state",
    "default_attack",
    "defaults",
    "ema_update",
    "evaluate_robustness",
    "gated_sparsity_penalty",
    "gated_tsc_penalty",
    "global_channel_masks",
    "global_magnitude_masks",
    "init_scores",
    "is_kernel",
    "layerwise_channel_masks",
    "layerwise_magnitude_masks",
    "live_singular_value_count",
    "local_lipschitz",
    "log_det_condition_penalty",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "masked_params_from_scores",
    "metrics",
    "named_leaves",
    "nonzero_masks",
    "parallel",
    "path_to_str",
    "penalty_values",
    "pruning",
    "random_masks",
    "scores_to_masks",
    "singular_values",
    "smooth_log_condition_number",
    "sparsify",
    "sparsity",
    "spectral",
    "spectral_tracking",
    "summarize_sparsity",
    "training",
    "transformed_l1",
    "transformed_sparsity_penalty",
    "tree_condition_numbers",
    "tree_live_condition_numbers",
    "tree_utils",
    "tscnc",
    "xla_cpu",
]

# Top-level names of earlier versions and where they live now.
_MOVED = {
    **dict.fromkeys(
        ("AUTOATTACK_ATTACKS", "AUTOATTACK_FAST", "AUTOATTACK_STANDARD", "AutoAttackConfig",
         "AutoAttackResult", "apgd", "apgd_ce", "apgd_t", "auto_attack", "autoattack_members",
         "cross_entropy_loss", "dlr_loss", "fgsm", "get_attack", "kl_loss", "margin_loss",
         "perturbation_norm", "pgd", "pgd_loss_curve", "square"), "tscnc_jax.attacks"),
    **dict.fromkeys(("intersect_masks", "num_to_prune", "topk_mask", "topk_mask_ste",
                     "check_sparsity"), "tscnc_jax.pruning"),
    **dict.fromkeys(("clamp_log_alpha", "hard_concrete_gate", "hard_concrete_prob_nonzero",
                     "hard_concrete_sample", "init_log_alpha"), "tscnc_jax.sparsity"),
    "tracked_condition_number_penalty": "tscnc_jax.spectral_tracking",
    "mart_loss": "tscnc_jax.training",
    "trades_loss": "tscnc_jax.training",
    "set_fast_cpu_flags": "tscnc_jax.xla_cpu",
}


def __getattr__(name: str):
    if name in _MOVED:
        _warnings.warn(f"tscnc_jax.{name} moved to {_MOVED[name]}.{name}; the top-level name "
                       f"will be removed.", DeprecationWarning, stacklevel=2)
        return getattr(_importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'tscnc_jax' has no attribute {name!r}")
