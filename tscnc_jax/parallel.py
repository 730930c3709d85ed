"""Data parallelism: one place that maps a per-device step over devices.

A step written once per device with named-axis collectives (``lax.pmean(grads, axis_name)``; see
:func:`tscnc_jax.training.make_train_step`) runs on every device and host without code changes:

* ``backend="shard_map"`` (default): ``jax.jit(jax.shard_map(step))`` over a 1-D mesh of all
  devices (across hosts after ``jax.distributed.initialize()``). The state is replicated, the batch
  is sharded along its leading axis; arguments and results are ordinary (global) arrays.
* ``backend="pmap"``: ``jax.pmap(step)``; the state carries a leading device axis
  (:func:`replicate` / :func:`unreplicate`) and the batch is reshaped to ``(devices, B / devices,
  ...)`` by :func:`split_batch`.

Both give the same numbers as the single-device step on the full batch, up to float32 reduction
order (tested on fake CPU devices).

Multi-device CPU runs (``--xla_force_host_platform_device_count``) need a configuration that
cannot deadlock: see :func:`cpu_multi_device_flags`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any


def cpu_multi_device_flags(num_devices: int, *, collective_timeout_seconds: int = 3600) -> str:
    """``XLA_FLAGS`` for ``num_devices`` fake CPU devices whose collectives do not abort.

    Set them in the environment before JAX is imported (e.g. in a subprocess). The failure they
    avoid: all fake devices share the host's thread pool, so on a loaded 2-core machine one device
    can reach a collective long before another (which may not even have started its part of the
    step). XLA:CPU's rendezvous then gives up after a fixed timeout ("only 1 of 2 threads
    arrived") and aborts the process, which looks like a random deadlock. The flags keep each
    device's work on one thread (no intra-op Eigen threads competing across devices) and raise
    the rendezvous termination timeout well above any step's duration; a true deadlock must then
    be caught by the caller's own timeout (the tests run these processes with one).
    """
    t = int(collective_timeout_seconds)
    return (f"--xla_force_host_platform_device_count={int(num_devices)} "
            "--xla_cpu_multi_thread_eigen=false "
            f"--xla_cpu_collective_call_terminate_timeout_seconds={t} "
            f"--xla_cpu_collective_timeout_seconds={t}")


def split_batch(batch: PyTree, num_devices: int) -> PyTree:
    """Reshapes every leaf ``(B, ...)`` to ``(num_devices, B // num_devices, ...)``.

    Raises ``ValueError`` naming the leaf when ``B`` is not divisible by ``num_devices``.
    """

    _check_divisible(batch, num_devices)
    return jax.tree.map(
        lambda x: (x if isinstance(x, jax.Array) else np.asarray(x)).reshape(
            num_devices, x.shape[0] // num_devices, *x.shape[1:]), batch)


def replicate(tree: PyTree, num_devices: int | None = None) -> PyTree:
    """Adds a leading device axis (for ``pmap``) by broadcasting every leaf."""
    n = jax.local_device_count() if num_devices is None else num_devices
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def unreplicate(tree: PyTree) -> PyTree:
    """Takes device 0's copy of a ``pmap``-replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def _check_divisible(batch: PyTree, n: int) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if np.shape(x)[0] % n:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading size {np.shape(x)[0]}, not "
                f"divisible by the {n} devices; use a batch size that is a multiple of {n}."
            )


def data_parallel(
    step_fn: Callable[..., Any],
    *,
    axis_name: str = "batch",
    backend: Literal["shard_map", "pmap"] = "shard_map",
    devices: Sequence[jax.Device] | None = None,
    donate_state: bool = False,
) -> Callable[[PyTree, PyTree], Any]:
    """Maps a per-device ``step_fn(state, batch)`` over devices along ``axis_name``.

    ``step_fn`` must average what has to agree across devices (gradients, BatchNorm statistics,
    metrics) with ``lax.pmean(..., axis_name)``, as the training step does when built with
    ``axis_name``; its outputs are then replicated.

    Args:
      step_fn: the per-device function ``(state, batch) -> outputs``.
      axis_name: name of the mapped axis (must match the step's).
      backend: ``"shard_map"`` (jit of shard_map over a mesh) or ``"pmap"``.
      devices: the devices to use (default: all, ``jax.devices()``).
      donate_state: donate the state's buffers to the step (saves memory on accelerators).

    Returns:
      ``parallel_step(state, batch)``. For ``shard_map``: global arrays in and out, the batch's
      leading size must be divisible by the number of devices. For ``pmap``: the state replicated
      with :func:`replicate`; the batch is split here.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    donate = (0,) if donate_state else ()
    if backend == "pmap":
        mapped = jax.pmap(step_fn, axis_name=axis_name, devices=devices, donate_argnums=donate)

        def pmap_step(state, batch):
            return mapped(state, split_batch(batch, n))

        return pmap_step
    if backend != "shard_map":
        raise ValueError(f"`backend` must be 'shard_map' or 'pmap', got {backend!r}.")
    mesh = Mesh(np.asarray(devices), (axis_name,))
    # check_vma=False: the attacks' loops carry per-example bookkeeping created from constants,
    # which shard_map's varying-axis type check rejects; replication of the outputs is
    # guaranteed by the step's pmean instead (and tested against the single-device step).
    sharded = jax.jit(
        jax.shard_map(step_fn, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axis_name)),
                      out_specs=PartitionSpec(), check_vma=False),
        donate_argnums=donate,
    )
    batch_sharding = NamedSharding(mesh, PartitionSpec(axis_name))

    def shard_map_step(state, batch):
        # Each process passes its own slice of the global batch (all of it on one host).
        _check_divisible(batch, len(mesh.local_devices))
        batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)), batch)
        return sharded(state, batch)

    return shard_map_step
