"""Data parallelism over a device mesh: the batch is split across devices, the model is not.

One mechanism, `jax.jit` with `NamedSharding` (GSPMD): parameters, optimiser state and keys are
replicated on every device of a one-axis mesh ("batch"), and an algorithm marks the batch it
draws inside its jitted update (episodes, rollouts, packed rows) with `shard_batch`, a
`with_sharding_constraint` along the leading axis. XLA then runs the rollout and the forward and
backward passes of each device's slice of the batch on that device and all-reduces the
gradients, so the same program runs on 1 or N devices and gives the same numbers up to the order
of floating-point sums. No `pmap`, no `shard_map`: no collective has to be written by hand.

Without a mesh (`mesh=None`, the default everywhere) `shard_batch` is the identity and nothing
about a run changes.

Several hosts: every process runs the same program on the same replicated state (so the state's
key must NOT differ per process: the jitted update is one global computation and each process
computes its slice of the one global batch). `initialize_distributed` connects the processes
first; `jax.devices()` then lists every process's devices and the mesh spans them all. Only
process 0 writes logs (`is_logging_process`); every process takes part in orbax checkpointing,
which writes replicated arrays from the primary host only and synchronises the processes
itself. Keys are not folded by process index (as one might do with pmap-style per-host programs):
each process draws its slice of the same global batch from the same key.
On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`, jax's default
once `jax.distributed` is initialised), so no flag is needed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hrl.infra.config import check

BATCH_AXIS = "batch"


@dataclasses.dataclass
class MeshConfig:
    """How many devices the batch is split over. 1 (default): no mesh, a plain single-device run;
    0: every device of every process; N: the first N devices. Not part of any stage's recorded
    config: 1 or N devices give the same run."""

    devices: int = 1

    def validate(self) -> None:
        check(self.devices >= 0, "devices", "must be >= 0 (0: all devices, 1: no mesh)", self.devices)


def build_mesh(cfg: MeshConfig) -> Mesh | None:
    """A one-axis ("batch") mesh of `cfg.devices` devices, or None for a single device in a single
    process (today's behaviour). Call after `initialize_distributed` on several hosts."""
    available = jax.device_count()
    count = available if cfg.devices == 0 else cfg.devices
    check(count <= available, "mesh.devices", f"must be <= the {available} available devices", cfg.devices)
    if count == 1 and jax.process_count() == 1:
        return None
    # Auto axes: shardings are hints that XLA propagates (GSPMD), not part of the array types.
    return jax.make_mesh((count,), (BATCH_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: parameters, optimiser state, keys, metrics."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: constrain every array of `tree` (leading axis = batch) to be split along the
    batch axis. The identity without a mesh, so single-device code is exactly what it was."""
    return shard_along(tree, mesh, axis=0)


def shard_along(tree: Any, mesh: Mesh | None, axis: int) -> Any:
    """`shard_batch` for a batch axis that need not be the leading one: time-major unrolls and
    replay buffers ([T, N, ...], `axis` 1) split over their environments, time whole on each device."""
    if mesh is None:
        return tree
    for leaf in jax.tree.leaves(tree):
        check(leaf.ndim > axis and leaf.shape[axis] % mesh.size == 0, "mesh.devices",
              f"must divide the batch (an array of shape {leaf.shape} is split along axis {axis})", mesh.size)
    spec = PartitionSpec(*(None,) * axis, BATCH_AXIS)
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, spec))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Place a (train state) pytree on every device of the mesh; unchanged without a mesh. On
    several processes each passes the same values (same seed), which become one global array."""
    if mesh is None:
        return tree
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: _global_replicated(x, sharding), tree)


def _global_replicated(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from identical per-process values (typed PRNG keys go through their data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(_global_replicated(jax.random.key_data(x), sharding), impl=impl)
    return jax.make_array_from_process_local_data(sharding, jax.device_get(x))


# ----------------------------------------------------------------------------------------------
# Several processes

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0 (jax reads it itself too)
ENV_NUM_PROCESSES = "HRL_NUM_PROCESSES"
ENV_PROCESS_ID = "HRL_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: list[int] | None = None) -> bool:
    """Connect this process to the others with `jax.distributed.initialize`, before any other jax
    call. Arguments default to the environment (JAX_COORDINATOR_ADDRESS, HRL_NUM_PROCESSES,
    HRL_PROCESS_ID); on clusters jax detects itself (SLURM, Open MPI, cloud TPU) leave them unset.
    Returns False, doing nothing, when no coordinator or process count is given (a single process)
    or when this process is already connected."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    if (coordinator_address is None and num_processes is None) or jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def is_logging_process() -> bool:
    """Process 0 writes metrics, TensorBoard events and run-directory files; the others compute."""
    return jax.process_index() == 0
