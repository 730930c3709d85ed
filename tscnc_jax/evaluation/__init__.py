"""Robustness evaluation: :func:`evaluate_robustness` and its report, checks and diagnostics
(:mod:`tscnc_jax.evaluation.driver`)."""

from tscnc_jax.evaluation.driver import (
    MIN_BUCKET,
    AttackSoundnessError,
    AutoAttackCheckWarning,
    GradientMaskingWarning,
    LogitsFn,
    RobustnessReport,
    autoattack_checks,
    check_adversarial,
    clear_compile_cache,
    evaluate_robustness,
)

__all__ = [
    "MIN_BUCKET",
    "AttackSoundnessError",
    "AutoAttackCheckWarning",
    "GradientMaskingWarning",
    "LogitsFn",
    "RobustnessReport",
    "autoattack_checks",
    "check_adversarial",
    "clear_compile_cache",
    "evaluate_robustness",
]
