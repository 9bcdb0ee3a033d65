"""The ONE table of logical-axis -> mesh-axis rules, and mesh construction.

Conventions (dimension letters used across the project):
  B batch, T sequence, N = B*T flattened tokens, D d_model, H query heads, K kv heads, Dh head dim,
  F d_ff, V vocab, L layers (stacked for scan).
Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter/optimizer sharding),
``tensor`` (Megatron-style: heads and d_ff split).
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ra3_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Ordered; first match wins.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("tokens", ("data", "fsdp")),  # flattened B*T activations
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),  # flattened H*Dh projection columns
    ("kv_heads", "tensor"),  # flattened K*Dh projection columns
    ("mlp", "tensor"),
    ("norm", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_heads", "tensor"),
    ("cache_seq", None),
    ("head_dim", None),
)

log = logging.getLogger(__name__)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, dcn_data: int = 1) -> Mesh:
    """Build a (data, fsdp, tensor) mesh; ``-1`` in one axis takes the remaining devices.

    ``dcn_data > 1`` builds a hybrid mesh for multi-slice TPU / multi-node GPU: the data axis is made of
    ``dcn_data`` groups (TPU slices, or processes elsewhere) so that fsdp and tensor collectives stay inside a
    group and only data-parallel gradient reductions cross the slower network.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise InputError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise InputError(f"mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if n % known:
            raise InputError(f"{n} devices cannot be split into mesh fsdp={fsdp} tensor={tensor} x data")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise InputError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {n} are available ({jax.default_backend()}); fix the mesh section of the config"
        )
    if dcn_data > 1:
        if sizes[0] % dcn_data:
            raise InputError(f"mesh.dcn_data={dcn_data} must divide the data axis ({sizes[0]})")
        from jax.experimental import mesh_utils

        on_tpu = devices[0].platform == "tpu"
        granules = len({getattr(d, "slice_index", 0) for d in devices}) if on_tpu else len({d.process_index for d in devices})
        if granules != dcn_data:
            what = "TPU slices" if on_tpu else "processes"
            raise InputError(f"mesh.dcn_data={dcn_data} but the run has {granules} {what}; set dcn_data to that count")
        arr = mesh_utils.create_hybrid_device_mesh(
            [sizes[0] // dcn_data, sizes[1], sizes[2]],
            [dcn_data, 1, 1],
            devices,
            process_is_granule=not on_tpu,
            allow_split_physical_axes=True,
        )
    elif devices[0].platform == "tpu":
        from jax.experimental import mesh_utils  # physical-topology-aware device order (ICI torus)

        arr = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:
        # Process-major order: each process's devices are contiguous, so data-parallel rows group by process.
        arr = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def _rule(logical: str | None):
    if logical is None:
        return None
    for name, target in LOGICAL_RULES:
        if name == logical:
            return target
    raise KeyError(f"logical axis '{logical}' has no rule in sharding.LOGICAL_RULES")


def logical_to_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...] | None, mesh: Mesh) -> P:
    """PartitionSpec for a tensor with the given logical axes.

    A mesh axis is used at most once per tensor, and an axis whose size does not divide the dimension is
    dropped (that dimension is then replicated over it) so odd shapes (e.g. 3 kv heads) still work.
    """
    used: set[str] = set()
    out = []
    for i, logical in enumerate(logical_axes):
        target = _rule(logical)
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        for a in axes:
            if a in used or mesh.shape[a] == 1:
                continue
            size = math.prod(mesh.shape[x] for x in keep) * mesh.shape[a]
            if shape is not None and shape[i] % size:
                log.debug("dim %d of %s not divisible by mesh axis %s; replicating", i, shape, a)
                continue
            keep.append(a)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def named_sharding(mesh: Mesh, logical_axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(tuple(logical_axes), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, T, ...] host batch: batch over (data, fsdp)."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
