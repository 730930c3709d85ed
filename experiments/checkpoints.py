"""Atomic, resumable checkpoints of a :class:`tscnc_jax.TrainState` with orbax.

Layout: ``<dir>/<step>/`` written by ``orbax.checkpoint.CheckpointManager`` (it writes to a
temporary directory and renames it when complete, so a killed process never leaves a checkpoint
that looks finished). :func:`restore_latest` falls back loudly to the previous good checkpoint if
the latest cannot be read, and never silently starts from scratch.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tscnc_jax.training import TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory that has checkpoints could be restored."""


def _to_saveable(state: TrainState) -> dict:
    # Typed PRNG keys are stored as their raw key data.
    d = state._asdict()
    d["rng"] = jax.random.key_data(state.rng)
    return d


def _from_saveable(d: dict) -> TrainState:
    d = dict(d)
    d["rng"] = jax.random.wrap_key_data(jnp.asarray(d["rng"]))
    return TrainState(**d)


def manager(directory: str | pathlib.Path, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` keeping the ``max_to_keep`` most recent steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState, *, wait: bool = True) -> None:
    """Saves ``state`` as checkpoint ``step`` (atomically); waits for completion by default."""
    mgr.save(int(step), args=ocp.args.StandardSave(_to_saveable(state)), force=True)
    if wait:
        mgr.wait_until_finished()


def _with_template_optimizer(saved: dict, template: dict) -> dict:
    """``saved`` (restored without a target) with ``template``'s optimizer state; every other
    entry must match ``template``'s structure, shapes and dtypes, and is placed like it."""
    wanted = {k: v for k, v in template.items() if k != "opt_state"}
    got = {k: saved[k] for k in wanted if k in saved}
    if jax.tree.structure(got) != jax.tree.structure(wanted):
        raise ValueError(f"saved model state {jax.tree.structure(got)} does not match this "
                         f"run's {jax.tree.structure(wanted)} (another model?)")
    for (path, t), v in zip(jax.tree_util.tree_leaves_with_path(wanted), jax.tree.leaves(got),
                            strict=True):
        if t.shape != v.shape or t.dtype != v.dtype:
            raise ValueError(f"saved {jax.tree_util.keystr(path)} is {v.dtype}{list(v.shape)}, "
                             f"this run's is {t.dtype}{list(t.shape)} (another model?)")
    placed = jax.tree.map(lambda t, v: jax.device_put(v, t.sharding), wanted, got)
    return {**placed, "opt_state": template["opt_state"]}


def restore_latest(mgr: ocp.CheckpointManager, template: TrainState, *,
                   optimizer: bool = True) -> TrainState | None:
    """Restores the newest readable checkpoint into ``template``'s structure.

    Returns ``None`` when the directory has no checkpoint. If the newest is unreadable
    (truncated, corrupted), logs a warning naming it and tries the previous one; raises
    :class:`CheckpointError` when none can be read.

    With ``optimizer=False`` the saved optimizer state is not used and ``template``'s is kept:
    for loading a finished stage as the start of another (a dense model pruned by a method
    whose optimizer chain, e.g. with other penalties, differs from the one that trained it).
    Weights that do not match ``template``'s (another model) raise ``ValueError``.
    """
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        return None
    saveable = _to_saveable(template)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
    errors = []
    for step in steps:
        try:
            restored = mgr.restore(step, args=ocp.args.StandardRestore(
                abstract if optimizer else None))
        except Exception as e:  # any read failure means: try the previous one
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            log.warning("Checkpoint %s/%s is unreadable (%s); trying the previous one.",
                        mgr.directory, step, e)
            continue
        if not optimizer:  # a mismatch is not damage: an older checkpoint would not match either
            try:
                restored = _with_template_optimizer(restored, saveable)
            except ValueError as e:
                raise ValueError(f"checkpoint {mgr.directory}/{step}: {e}") from None
        if errors:
            log.warning("Resumed from checkpoint %s after %d unreadable newer one(s).", step,
                        len(errors))
        return _from_saveable(restored)
    raise CheckpointError(
        f"None of the checkpoints in {mgr.directory} could be restored:\n  " + "\n  ".join(errors)
        + "\nDelete the directory to start this stage from scratch."
    )
