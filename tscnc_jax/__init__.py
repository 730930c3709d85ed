"""tscnc_jax: compact and robust neural networks in JAX.

Implements TSCNC (Feng, Lin, Gao, Wei, "Lipschitz Constant Meets Condition Number: Learning Robust
and Compact Deep Neural Networks", arXiv 2503.20454): a smooth condition-number constraint (CNC)
and a transformed sparse constraint (TSC) for adversarially trained, heavily pruned networks.
"""

from tscnc_jax.models import create_model
from tscnc_jax.penalties import (
    DEFAULT_DELTA,
    DEFAULT_TEMPERATURE,
    condition_number_penalty,
    transformed_sparsity_penalty,
)
from tscnc_jax.pruning import (
    LayerSparsity,
    MaskFn,
    PruningState,
    SparsitySummary,
    global_channel_masks,
    global_magnitude_masks,
    init_scores,
    intersect_masks,
    layerwise_channel_masks,
    layerwise_magnitude_masks,
    masked_params_from_scores,
    nonzero_masks,
    num_to_prune,
    random_masks,
    scores_to_masks,
    sparsify,
    summarize_sparsity,
    topk_mask,
    topk_mask_ste,
)
from tscnc_jax.schedules import (
    IterativeSchedule,
    OneShotSchedule,
    PolynomialSchedule,
    PruningSchedule,
    check_sparsity,
)
from tscnc_jax.sparsity import (
    clamp_log_alpha,
    gated_tsc_penalty,
    hard_concrete_gate,
    hard_concrete_prob_nonzero,
    hard_concrete_sample,
    init_log_alpha,
    transformed_l1,
)
from tscnc_jax.spectral import (
    as_matrix,
    condition_number,
    log_det_condition_penalty,
    singular_values,
    smooth_log_condition_number,
    tree_condition_numbers,
)
from tscnc_jax.transforms import (
    ConditionNumberPenaltyState,
    SparsityPenaltyState,
    add_condition_number_penalty,
    add_transformed_sparsity_penalty,
    penalty_values,
    tscnc,
)
from tscnc_jax.tree_utils import apply_masks, check_masks, is_kernel, named_leaves, path_to_str

__version__ = "0.1.0"

__all__ = [
    "ConditionNumberPenaltyState",
    "DEFAULT_DELTA",
    "DEFAULT_TEMPERATURE",
    "IterativeSchedule",
    "LayerSparsity",
    "MaskFn",
    "OneShotSchedule",
    "PolynomialSchedule",
    "PruningSchedule",
    "PruningState",
    "SparsityPenaltyState",
    "SparsitySummary",
    "add_condition_number_penalty",
    "add_transformed_sparsity_penalty",
    "apply_masks",
    "as_matrix",
    "check_masks",
    "check_sparsity",
    "clamp_log_alpha",
    "condition_number",
    "condition_number_penalty",
    "create_model",
    "gated_tsc_penalty",
    "global_channel_masks",
    "global_magnitude_masks",
    "hard_concrete_gate",
    "hard_concrete_prob_nonzero",
    "hard_concrete_sample",
    "init_log_alpha",
    "init_scores",
    "intersect_masks",
    "is_kernel",
    "layerwise_channel_masks",
    "layerwise_magnitude_masks",
    "log_det_condition_penalty",
    "masked_params_from_scores",
    "named_leaves",
    "nonzero_masks",
    "num_to_prune",
    "path_to_str",
    "penalty_values",
    "random_masks",
    "scores_to_masks",
    "singular_values",
    "smooth_log_condition_number",
    "sparsify",
    "summarize_sparsity",
    "topk_mask",
    "topk_mask_ste",
    "transformed_l1",
    "transformed_sparsity_penalty",
    "tree_condition_numbers",
    "tscnc",
]
