"""Device mesh, logical-axis sharding rules, and the multi-host facts written once.

The multi-host helpers: which mesh axes split the batch (BATCH_AXES, batch_axes,
batch_sharding, batch_shards), a host's rows <-> global arrays (local_rows, to_global), the
largest value over hosts (max_over_hosts), calling a function under a mesh (under_mesh), and
how a batch splits into micro-batches over the batch shards (strided_micro_batches,
check_partition).

Parameters and the main activations carry *logical* axis names (``'embed'``, ``'vocab'``,
``'heads'``, ``'batch'``, ...). A rules table, written as data, maps each logical name to
zero or more mesh axes of a ``('data', 'fsdp', 'tensor')`` mesh; changing the parallelism of a
run means changing the mesh shape or the rules, never the model code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes that split rollout rows (the batch): both data-parallel axes, so FSDP shards
# also do data-parallel work. Written once; the 'batch' rule, the sampler, the trainer and the
# teacher server all take it from here.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes (None: replicated). Parameters are sharded FSDP-style on their
# model dimension and Megatron-style on heads / MLP / vocabulary; the batch is split over both
# data-parallel axes so FSDP shards also do data-parallel work.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),  # flattened query heads * head_dim
    ("kv_heads", "tensor"),  # flattened key/value heads * head_dim
    ("mlp", "tensor"),
    ("norm", None),
    ("head_dim", None),
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # positions of the token log-prob pass: its rows are replicated over 'tensor', so the
    # vocabulary-sized work is split by position there instead of repeated on every chip
    ("logprob_length", "tensor"),
    # KV cache [layers, batch, cache_length, kv_heads, head_dim]
    ("layers", None),
    ("cache_length", None),
)


def _rules_dict(rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, Any]:
    rules = DEFAULT_RULES if rules is None else rules
    return dict(rules.items() if isinstance(rules, Mapping) else rules)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    Args:
      logical_axes: one name (or None) per array dimension.
      rules: ``(logical_name, mesh_axes)`` pairs or a dict; None uses DEFAULT_RULES.
      shape, mesh: when both are given, a dimension whose size is not divisible by the product
        of its mesh axes' sizes is replicated instead (e.g. 2 KV heads on a 4-way tensor axis),
        and mesh axes absent from ``mesh`` are dropped. A mesh axis is used at most once.

    Returns:
      PartitionSpec with one entry per dimension.

    Raises:
      KeyError naming the logical axis when the rules do not mention it.
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    entries = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        if shape is not None and mesh is not None and axes:
            if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        entries.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*entries)


def logical_to_sharding(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding on ``mesh`` for an array whose dimensions have ``logical_axes``.

    See logical_to_spec for the divisibility fallback applied when ``shape`` is given.
    """
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape=shape, mesh=mesh))


def make_mesh(config: Mapping[str, int] | Any = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh with Auto axis types.

    Args:
      config: dict (or ml_collections ConfigDict / object with attributes) giving sizes for
        some of 'data', 'fsdp', 'tensor'; missing axes get size 1, except that one axis may be
        -1 to take the remaining devices. None puts all devices on 'fsdp'.
      devices: devices to use (default: jax.devices()).

    Raises:
      ValueError when the sizes do not multiply to the device count or name unknown axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    if config is None:
        config = {"fsdp": -1}
    if not isinstance(config, Mapping):
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        else:
            config = {a: getattr(config, a) for a in MESH_AXES if hasattr(config, a)}
    unknown = set(config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh config names unknown axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(config.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh config {dict(config)}: at most one axis may be -1")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh config {dict(config)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // rest
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh config {dict(config)} -> sizes {dict(zip(MESH_AXES, sizes))} needs "
            f"{math.prod(sizes)} devices, but {len(devices)} are available")
    # jax.make_mesh orders devices to follow the physical (e.g. TPU ICI) topology.
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_flag(text: str | None) -> Mesh | None:
    """A command-line mesh such as "fsdp=4,tensor=2" (one size may be -1) -> make_mesh(...).

    Empty or None: None (one device). Raises ValueError naming the bad part.
    """
    if not text:
        return None
    sizes = {}
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if not size.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh {text!r}: expected axis=size pairs like fsdp=4,tensor=2, got {part!r}")
        sizes[axis.strip()] = int(size)
    return make_mesh(sizes)


def model_shardings(model: Any, mesh: Mesh, rules=None) -> Any:
    """nnx.State of NamedShardings, one per parameter, from the parameters' logical axes."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)

    def one(v):
        axes = v.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter of shape {v.get_value().shape} has no logical_axes metadata")
        return logical_to_sharding(axes, mesh, rules, shape=v.get_value().shape)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules=None) -> jax.Array:
    """with_sharding_constraint from logical axes under the current mesh (jax.set_mesh).

    A no-op when no mesh is set, so single-device code needs no mesh at all.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, rules, shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def initialize_distributed() -> bool:
    """Calls jax.distributed.initialize when the environment describes a multi-process run.

    Recognised: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), or a TPU pod /
    SLURM / Open MPI environment that jax auto-detects (TPU_WORKER_HOSTNAMES with several hosts,
    SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1). Must run before any other jax call.

    Returns:
      True when jax.distributed.initialize was called, False for a single-process run.
    """
    env = os.environ
    # CPU processes exchange collectives over gloo (TPU and GPU use their own transports).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
        return True
    multi = (
        len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if multi:
        jax.distributed.initialize()  # jax's cluster auto-detection fills in the addresses
        return True
    return False


# --------------------------------------------------------------------------------------------
# Multi-host helpers: rows split over the batch axes.
# --------------------------------------------------------------------------------------------


def batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes rows are split over: those of BATCH_AXES the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} include none of {BATCH_AXES}, "
                         "so there is no axis to split the rows over")
    return axes


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split over the mesh's batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def batch_shards(mesh) -> int:
    """How many ways the rows are split: the product of the mesh's batch axes."""
    return int(math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded array, as numpy (all rows in a one-process run)."""
    if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    pieces = {}
    for shard in x.addressable_shards:  # devices along other mesh axes hold copies: dedupe
        pieces.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)])


def to_global(tree, mesh: Mesh | None):
    """This process's rows (numpy leaves) -> global arrays split over the batch axes, as the
    rows of all processes in order. One process: `tree` unchanged (its rows are all rows)."""
    if jax.process_count() == 1:
        return tree
    if mesh is None:
        raise ValueError("a multi-process run needs a mesh to assemble the rows of all hosts")
    rows = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rows, x), tree)


def max_over_hosts(x) -> np.ndarray:
    """The elementwise largest of `x` (an int or int array, the same shape on every host) over
    all processes: how hosts agree on one shape to compile. One process: x itself."""
    x = np.asarray(x, np.int32)
    if jax.process_count() == 1:
        return x
    return np.max(multihost_utils.process_allgather(x).reshape(-1, *x.shape), axis=0)


def under_mesh(fn: Callable, mesh) -> Callable:
    """fn called under jax.set_mesh(mesh), where the model's activation sharding constraints
    (constrain) take effect; without a mesh in context they do nothing."""
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)
    return call


def strided_micro_batches(tree, n: int):
    """[B, ...] leaves -> [n, B / n, ...]: micro-batch j holds rows j, j + n, j + 2n, ...

    Strided, not contiguous (as MaxText): the rows of a batch are split over the batch shards
    in contiguous blocks, so a contiguous slice would sit on a few shards while the others
    idle; rows j, j + n, ... spread each micro-batch over every shard, and the reshape below
    is local to each shard (no collective). check_partition makes B / n a multiple of the
    batch shards so that every shard gets the same number of rows.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def partition_problem(micro_batches: int, rows: int, shards: int = 1, mesh_shape=None) -> str | None:
    """Why a batch of `rows` cannot split evenly into config.micro_batches micro-batches over
    `shards` batch shards (each micro-batch must give every batch shard the same number of
    rows), with what to set; None when it can. The one rule: config.validate asks it without
    a mesh (shards=1), check_partition with the run's mesh."""
    n = int(micro_batches)
    if n < 1:
        return f"config.micro_batches={n}: must be >= 1"
    if rows % n:
        return (f"config.micro_batches={n} does not divide the batch of {rows} rollouts "
                f"(prompts_per_step x num_samples); choose a divisor of {rows}")
    if (rows // n) % shards:
        ok = [m for m in range(1, rows + 1) if rows % m == 0 and (rows // m) % shards == 0]
        return (f"config.micro_batches={n} gives {rows // n} rows per micro-batch, not a multiple of "
                f"the {shards} batch shards (mesh data x fsdp = {mesh_shape}), so some chips "
                f"would idle or hold the whole micro-batch; use micro_batches in {ok}")
    return None


def check_partition(micro_batches: int, mesh, rows: int) -> None:
    """Raises ValueError (partition_problem's) unless `rows` split evenly over micro_batches and
    the batch shards of `mesh`."""
    why = partition_problem(micro_batches, rows, batch_shards(mesh), dict(mesh.shape))
    if why:
        raise ValueError(why)
