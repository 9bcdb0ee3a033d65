"""Multi-process runs on JAX's multi-controller runtime: initialization, per-process rows, host gathers.

Every process runs the same program on its own devices; ``jax.distributed.initialize`` connects them (one
coordinator, process 0) before any JAX computation. Global arrays are built from per-process host data with
``jax.make_array_from_process_local_data``; the helpers here say which rows of a global batch a process
feeds, and gather small host objects (e.g. Grain iterator states) from every process for checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import jax
import numpy as np

from ra3_jax.errors import RA3Error

log = logging.getLogger(__name__)

ENV_MODE = "RA3_DISTRIBUTED"  # auto | on | off (overrides distributed.mode)
ENV_COORDINATOR = "RA3_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RA3_NUM_PROCESSES"
ENV_PROCESS_ID = "RA3_PROCESS_ID"


class DistributedError(RA3Error, RuntimeError):
    pass


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"${name}={v!r} is not an integer") from None


def multi_process_env() -> str | None:
    """Name of the launcher whose environment describes a multi-process job, or None."""
    if (_env_int(ENV_NUM_PROCESSES) or 0) > 1:
        return ENV_NUM_PROCESSES
    if "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or _env_int("SLURM_NPROCS") or 0) > 1:
        return "SLURM"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 0) > 1:
        return "Open MPI"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU pod"
    return None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """Fail with a clear error before JAX's client would abort the process (it does not raise on timeouts):
    process 0 must be able to bind the coordinator port; the others must reach it within ``timeout_s``."""
    host, port = _split_address(address)
    if process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as e:
                raise DistributedError(
                    f"process 0 cannot listen on coordinator port {port} ({e}); another job may hold it: "
                    f"pick a free port in {ENV_COORDINATOR}"
                ) from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {process_id} cannot reach the coordinator {address} ({e}) within {timeout_s:.0f}s. Start "
                    f"process 0 with the same {ENV_COORDINATOR}, check the host is reachable and the port open, or raise "
                    "distributed.init_timeout_s."
                ) from None
            time.sleep(0.5)


def initialize(section) -> bool:
    """Connect the processes of a multi-process run per the ``distributed`` config section.

    Returns True when this process is part of an initialized multi-process runtime. Call before any JAX
    computation (the CLI does so right after reading the config)."""
    if jax.distributed.is_initialized():
        return True
    mode = os.environ.get(ENV_MODE, "").strip() or section.mode
    if mode not in ("auto", "on", "off"):
        raise DistributedError(f"${ENV_MODE}={mode!r} is not one of auto, on, off")
    if mode == "off":
        return False
    coordinator = section.coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num = section.num_processes or _env_int(ENV_NUM_PROCESSES)
    pid = section.process_id if section.process_id >= 0 else _env_int(ENV_PROCESS_ID)
    launcher = multi_process_env()
    if mode == "auto" and launcher is None and not (num and num > 1):
        return False
    # CPU processes exchange collectives over gloo (TCP); harmless on GPU/TPU, whose collectives are native.
    jax.config.update("jax_cpu_collectives_implementation", section.cpu_collectives)
    if coordinator and pid is not None:
        check_coordinator(coordinator, pid, section.init_timeout_s)
    kwargs = dict(
        coordinator_address=coordinator,
        num_processes=num,
        process_id=pid,
        local_device_ids=list(section.local_device_ids) or None,
        initialization_timeout=section.init_timeout_s,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the parameters and what to check
        shown = {k: v for k, v in kwargs.items() if k != "initialization_timeout"}
        raise DistributedError(
            f"jax.distributed.initialize failed ({type(e).__name__}: {e}) with {shown} (environment: {launcher or 'none'}). "
            f"Check that every process was started with the same {ENV_COORDINATOR} (host:port of process 0, reachable "
            f"from all hosts) and {ENV_NUM_PROCESSES}, a distinct {ENV_PROCESS_ID} in 0..N-1, and that all of them start "
            f"within distributed.init_timeout_s={section.init_timeout_s}s; distributed.mode=off runs one process."
        ) from e
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def require_single_process(what: str) -> None:
    if jax.process_count() > 1:
        raise DistributedError(
            f"{what} runs in one process (all of its local devices, any mesh); this run has {jax.process_count()} "
            "processes. Multi-process runs cover pretrain, midtrain-ntp, midtrain-ra3, eval-loss, compile-check, rlvr "
            "and rlpt; start this one with distributed.mode=off on one host."
        )


def is_main_process() -> bool:
    return jax.process_index() == 0


def process_rows(mesh, global_rows: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of a [global_rows, ...] batch sharded over (data, fsdp) that this
    process's devices hold: the host data this process passes to ``make_array_from_process_local_data``.
    (Processes whose devices differ only along replicated axes, e.g. ``tensor``, feed the same rows.)"""
    from ra3_jax.sharding import batch_sharding

    idx = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
    starts = [s[0].start or 0 for s in idx.values()]
    stops = [global_rows if s[0].stop is None else s[0].stop for s in idx.values()]
    lo, hi = min(starts), max(stops)
    held = set()
    for a, b in zip(starts, stops):
        held.update(range(a, b))
    if held != set(range(lo, hi)):
        raise DistributedError(
            f"process {jax.process_index()} holds non-contiguous batch rows; use a mesh whose "
            "data-parallel devices are grouped by process (launch/meshes/*.yaml)"
        )
    return lo, hi


def data_shard(mesh, global_rows: int) -> tuple[int, int, int, int]:
    """(lo, hi, shard_index, shard_count): this process's rows and its shard of the data when each distinct
    row block reads 1/shard_count of the records."""
    lo, hi = process_rows(mesh, global_rows)
    n = hi - lo
    if global_rows % n:
        raise DistributedError(f"batch of {global_rows} rows cannot be split into blocks of {n} rows per process")
    return lo, hi, lo // n, global_rows // n


def allgather_json(obj) -> list:
    """One JSON-serializable object per process, gathered on every process (index = process index)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    allbuf = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(allbuf[i, : sizes[i]]).decode("utf-8")) for i in range(len(sizes))]


def split_work(n: int, fn) -> list:
    """Items 0..n-1 shared out over the processes (process p takes p, p + P, p + 2P, ...: a group of similar
    items is spread over all of them); ``fn(indices)`` returns one JSON-serializable result per index. Every
    process gets all n results, in item order."""
    P, p = jax.process_count(), jax.process_index()
    if P == 1:
        return list(fn(list(range(n))))
    mine = list(range(p, n, P))
    local = list(fn(mine))
    if len(local) != len(mine):
        raise ValueError(f"split_work: {len(local)} results for {len(mine)} items")
    out = [None] * n
    for q, part in enumerate(allgather_json(local)):
        for i, r in zip(range(q, n, P), part):
            out[i] = r
    return out


def fetch(tree):
    """Host (numpy) copies of a tree of jax.Arrays on every process, gathering the shards other processes hold."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def put_global(host_tree, shardings):
    """Global jax.Arrays from host data that every process holds in full (each process places its shards)."""

    def one(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(one, host_tree, shardings)


def sync(name: str) -> None:
    """Barrier across processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
