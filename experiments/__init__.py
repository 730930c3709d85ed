"""Experiment pipeline for tscnc_jax: configs, data loading, training, checkpoints."""
