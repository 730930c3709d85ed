"""Data parallelism: one path that maps a per-device step over a device mesh, on one host or many.

A step written once per device with named-axis collectives (``lax.pmean(grads, BATCH_AXIS)``; see
:func:`tscnc_jax.training.make_train_step` with ``axis_name=BATCH_AXIS``) runs on every device of
every host without code changes:

* :func:`make_mesh`: a 1-D mesh over all devices (``jax.devices()``: every process's, after
  ``jax.distributed.initialize()``), axis :data:`BATCH_AXIS`.
* :func:`data_parallel`: ``jax.jit(jax.shard_map(step))`` over the mesh; the state is replicated,
  the batch is split along its leading axis, the outputs come back replicated (on every device,
  and so readable on every process).
* :func:`shard_batch` / :func:`local_rows`: each process holds only its own rows of a global
  batch (:func:`local_rows` says which); :func:`shard_batch` assembles the global array from them.
  :func:`prefetch` keeps the next batches on their way to the devices while a step runs.
* :func:`replicate`: the same pytree on every device of the mesh (each process passes the same
  values); :func:`local_copy`: back to one copy per process, on its own devices
  (:func:`local_mesh`).

The numbers equal the single-device step on the full batch up to float32 reduction order
(tested on fake CPU devices and with two processes). Multi-device CPU runs
(``--xla_force_host_platform_device_count``) need a configuration that cannot deadlock: see
:func:`cpu_multi_device_flags`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

#: The name of the data-parallel mesh axis, used by the training step's collectives, by
#: synchronised BatchNorm (``bn_axis_name``) and by the mesh: defined once, here.
BATCH_AXIS = "batch"


def cpu_multi_device_flags(num_devices: int, *, collective_timeout_seconds: int = 3600) -> str:
    """``XLA_FLAGS`` for ``num_devices`` fake CPU devices whose collectives do not abort.

    Set them in the environment before JAX is imported (e.g. in a subprocess). The failure they
    avoid: all fake devices share the host's thread pool, so on a loaded 2-core machine one device
    can reach a collective long before another (which may not even have started its part of the
    step). XLA:CPU's rendezvous then gives up after a fixed timeout ("only 1 of 2 threads
    arrived") and aborts the process, which looks like a random deadlock. The flags keep each
    device's work on one thread (no intra-op Eigen threads competing across devices) and raise
    the rendezvous termination timeout well above any step's duration; a true deadlock must then
    be caught by the caller (the tests watch such processes for stalls).
    """
    t = int(collective_timeout_seconds)
    return (f"--xla_force_host_platform_device_count={int(num_devices)} "
            "--xla_cpu_multi_thread_eigen=false "
            f"--xla_cpu_collective_call_terminate_timeout_seconds={t} "
            f"--xla_cpu_collective_timeout_seconds={t}")


def make_mesh(devices: Sequence[jax.Device] | None = None, *,
              axis_name: str = BATCH_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device.")
    return Mesh(np.asarray(devices), (axis_name,))


def local_rows(global_batch: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``global_batch`` examples this process holds on ``mesh``.

    Rows are split evenly over the mesh's devices in mesh order; a process's devices must be
    consecutive in the mesh (as in :func:`make_mesh`'s default order), so its rows are one
    contiguous block. ``ValueError`` if ``global_batch`` is not a multiple of the device count.
    """
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"the global batch of {global_batch} examples is not divisible by the "
                         f"{n} devices; use a batch size that is a multiple of {n}.")
    per = global_batch // n
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError(f"process {jax.process_index()}'s devices are not consecutive in the "
                         f"mesh (positions {mine}).")
    return slice(mine[0] * per, (mine[-1] + 1) * per)


def _batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def shard_batch(local: PyTree, mesh: Mesh) -> PyTree:
    """The global batch (split along its leading axis over ``mesh``) from this process's rows
    (:func:`local_rows`); leaves that already are global arrays pass through."""
    sharding = _batch_sharding(mesh)
    n_local = len(mesh.local_devices)

    def put(path, x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        if x.shape[0] % n_local:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has {x.shape[0]} rows on "
                             f"this process, not divisible by its {n_local} devices.")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, local)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` on every device of ``mesh`` (fully replicated global arrays). Every process must
    pass the same values (as after restoring the same checkpoint or the same initialisation)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def local_copy(tree: PyTree) -> PyTree:
    """This process's copy of every fully replicated global array of ``tree``, replicated over
    this process's devices (:func:`local_mesh`), for work each process does on its own data
    (the final evaluation); other leaves pass through."""
    mesh = local_mesh()

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"local_copy: an array of shape {x.shape} is sharded across "
                                 f"processes, not replicated.")
            return replicate(x.addressable_data(0), mesh)
        return x

    return jax.tree.map(local, tree)


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices (axis :data:`BATCH_AXIS`): data parallelism for
    work a process does on its own examples (``evaluate_robustness(mesh=...)``)."""
    return make_mesh(jax.local_devices())


def prefetch(batches: Iterable[PyTree], mesh: Mesh, size: int = 2) -> Iterator[PyTree]:
    """Yields :func:`shard_batch` of each of ``batches``, keeping ``size`` of them on their way
    to the devices (transfers are asynchronous) while the caller computes on the current one."""
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in iterator:
        queue.append(shard_batch(batch, mesh))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def data_parallel(
    step_fn: Callable[..., Any],
    *,
    mesh: Mesh | None = None,
    donate_state: bool = False,
) -> Callable[[PyTree, PyTree], Any]:
    """Maps a per-device ``step_fn(state, batch)`` over ``mesh``'s (one) axis.

    ``step_fn`` must average what has to agree across devices (gradients, BatchNorm statistics,
    metrics) with ``lax.pmean(..., axis_name)`` over the mesh's axis name (:data:`BATCH_AXIS` for
    :func:`make_mesh`'s), as the training step does when built with ``axis_name``; its outputs
    are then replicated.

    Args:
      step_fn: the per-device function ``(state, batch) -> outputs``.
      mesh: a 1-D device mesh (default :func:`make_mesh`: all devices of all processes).
      donate_state: donate the state's buffers to the step (saves memory on accelerators).

    Returns:
      ``parallel_step(state, batch)``: ``state`` replicated on the mesh (:func:`replicate`; a
      host value is replicated on the way in), ``batch`` this process's rows of the global
      batch (:func:`local_rows`; numpy, or global arrays from :func:`shard_batch` /
      :func:`prefetch`); outputs are replicated global arrays.
    """
    mesh = make_mesh() if mesh is None else mesh
    if len(mesh.axis_names) != 1:
        raise ValueError(f"data_parallel needs a 1-D mesh, got axes {mesh.axis_names}.")
    axis = mesh.axis_names[0]
    # check_vma=False: the attacks' loops carry per-example bookkeeping created from constants,
    # which shard_map's varying-axis type check rejects; replication of the outputs is
    # guaranteed by the step's pmean instead (and tested against the single-device step).
    sharded = jax.jit(
        jax.shard_map(step_fn, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axis)),
                      out_specs=PartitionSpec(), check_vma=False),
        donate_argnums=(0,) if donate_state else ())

    def parallel_step(state, batch):
        return sharded(replicate(state, mesh), shard_batch(batch, mesh))

    return parallel_step
