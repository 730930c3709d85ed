"""Atomic, resumable checkpoints of a :class:`tscnc_jax.TrainState` with orbax.

Layout: ``<dir>/<step>/`` written by ``orbax.checkpoint.CheckpointManager`` (it writes to a
temporary directory and renames it when complete, so a killed process never leaves a checkpoint
that looks finished), and ``<dir>/<step>.sha256.json``: the SHA-256 of every saved array (its
dtype, shape and bytes), written atomically after the checkpoint and checked on restore.

:func:`restore_latest` treats a checkpoint that cannot be read, or whose arrays do not match
their recorded digests (a flipped bit restores without error otherwise), as damaged: it moves
it aside to ``<dir>/<step>.corrupt-<time>`` (kept for inspection; never read again), says so,
and falls back to the previous one; it never silently starts from scratch. A checkpoint saved
before digests were recorded restores unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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


def _host_copy(leaf) -> np.ndarray:
    """A host copy of ``leaf``; of a global array spanning other processes, this process's copy
    (the saved states are replicated: every process holds all of it)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError(f"cannot digest a sharded global array of shape {leaf.shape} from "
                             f"one process; checkpoints hold replicated states.")
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(jax.device_get(leaf))


def _sync(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def digests(tree) -> dict[str, str]:
    """``{path: sha256(dtype, shape, bytes)}`` of every array of ``tree`` (fetched to the host)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = _host_copy(leaf)
        h = hashlib.sha256(f"{a.dtype.str}{list(a.shape)}".encode())
        h.update(a.tobytes())
        out[_path_name(path)] = h.hexdigest()
    return out


def _path_name(path) -> str:
    """``a/b/0/count``: a path that does not depend on the containers (a tuple restored as a
    list, a named tuple as a dict), so a restore with or without a target names leaves alike."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def _digest_file(mgr: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(mgr.directory) / f"{int(step)}.sha256.json"


def _verify(mgr: ocp.CheckpointManager, step: int, restored: dict) -> None:
    """Raises ``ValueError`` naming the arrays whose digests differ from those recorded."""
    path = _digest_file(mgr, step)
    if not path.exists():
        log.info("Checkpoint %s/%s has no recorded digests (saved by an older version); "
                 "restored unverified.", mgr.directory, step)
        return
    recorded = json.loads(path.read_text())
    got = digests(restored)
    bad = sorted(k for k in recorded if got.get(k) != recorded[k])
    if bad or set(got) != set(recorded):
        raise ValueError(f"integrity check failed: {len(bad)} array(s) differ from their recorded "
                         f"SHA-256 ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")


def restore_as_saved(mgr: ocp.CheckpointManager, step: int) -> dict:
    """Checkpoint ``step`` as it was saved (its own tree, shapes and dtypes), on this process's
    first device, whatever devices saved it (a run on 2 devices read by a run on 1)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = mgr.item_metadata(step)
    metadata = getattr(metadata, "tree", metadata)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            metadata)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))


def _intact(mgr: ocp.CheckpointManager, step: int) -> bool:
    """Whether checkpoint ``step`` reads as saved and matches its recorded digests (a restore
    into a target can also fail because the target differs, which is not damage)."""
    try:
        _verify(mgr, step, restore_as_saved(mgr, step))
    except Exception:  # any failure to read means damage
        return False
    return True


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> epath.Path:
    """Renames a damaged checkpoint (and its digests) out of the manager's view (process 0
    renames; every process finds it damaged alike and waits for the rename)."""
    directory = epath.Path(mgr.directory)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = directory / f"{int(step)}.corrupt-{stamp}"
    _sync(f"tscnc_move_aside_{int(step)}_start")
    if jax.process_index() == 0:
        (directory / str(int(step))).rename(dest)
        if _digest_file(mgr, step).exists():
            _digest_file(mgr, step).rename(dest.with_name(dest.name + ".sha256.json"))
    _sync(f"tscnc_move_aside_{int(step)}_done")
    mgr.reload()
    return dest


def manager(directory: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` keeping the ``max_to_keep`` most recent steps. A local path is
    made absolute; a URL (``gs://bucket/run``) goes to orbax as it is."""
    directory = str(directory)
    if "://" not in directory:
        directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


def save(mgr: ocp.CheckpointManager, step: int, state: TrainState) -> None:
    """Saves ``state`` as checkpoint ``step`` (atomically) with its digests; waits for
    completion."""
    saveable = _to_saveable(state)
    if int(step) in mgr.all_steps():  # a replayed step (after a kill): the same state again
        mgr.delete(int(step))
    mgr.save(int(step), args=ocp.args.StandardSave(saveable), force=True)
    mgr.wait_until_finished()
    recorded = digests(saveable)  # on every process: the same replicated state
    if jax.process_index() != 0:
        return
    # After the checkpoint is complete: a crash in between leaves a valid checkpoint without
    # digests, which restores unverified (never a digest file of a half-written checkpoint).
    tmp = _digest_file(mgr, step).with_suffix(".tmp")
    tmp.write_text(json.dumps(recorded))
    tmp.replace(_digest_file(mgr, step))
    kept = {int(s) for s in mgr.all_steps()}
    for f in _digest_file(mgr, step).parent.glob("*.sha256.json"):  # of deleted checkpoints
        if f.name.split(".")[0].isdigit() and int(f.name.split(".")[0]) not in kept:
            f.unlink()


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
    (truncated, corrupted) or fails its integrity check, it is moved aside (module docstring)
    with a warning naming it, and the previous one is tried; raises :class:`CheckpointError`
    when none can be read (all of them moved aside).

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
            restored = (mgr.restore(step, args=ocp.args.StandardRestore(abstract)) if optimizer
                        else restore_as_saved(mgr, step))
            _verify(mgr, step, restored)
        except Exception as e:  # any read failure means: try the previous one
            if optimizer and _intact(mgr, step):  # not damage: this run's state differs
                raise CheckpointError(
                    f"Checkpoint {mgr.directory}/{step} is intact but does not match this run's "
                    f"state (another optimizer or model?): {type(e).__name__}: {e}") from None
            dest = _move_aside(mgr, step)
            errors.append(f"step {step}: {type(e).__name__}: {e} (moved to {dest.name})")
            log.warning("Checkpoint %s/%s is unreadable (%s); moved aside to %s, trying the "
                        "previous one.", mgr.directory, step, e, dest)
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
        + f"\nThey were moved aside in {mgr.directory}; rerun to start this stage from scratch."
    )
