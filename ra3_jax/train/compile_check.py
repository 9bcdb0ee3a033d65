"""Ahead-of-time check of the train step on a mesh: lower + compile, then report memory per device.

``ra3 compile-check --config C --mesh M`` builds the run's mesh (a named mesh is checked against the devices),
lowers the jitted NTP train step (the same function ``ra3 pretrain`` / ``midtrain-ntp`` / RA3's M-step run) on
abstract inputs - no weights are read and no step runs - and prints bytes per device for the parameters, the
optimizer state and the batch (from their shardings), next to XLA's own memory analysis of the compiled step:
arguments, outputs, donated (aliased) bytes and temporaries (activations, gradients, workspace).

``--simulate-on-cpu`` compiles for the mesh on that many host CPU devices (no accelerator needed): the
parameter / optimizer / batch numbers are the ones the accelerator will hold; temporaries are the CPU
compiler's and only indicative for GPU/TPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ra3_jax import sharding
from ra3_jax.config import RunConfig
from ra3_jax.errors import InputError
from ra3_jax.model.store import read_model_shape
from ra3_jax.train.state import abstract_state, make_optimizer
from ra3_jax.train.step import BATCH_KEYS, batch_shardings, jit_train_step

GiB = 2**30


def per_device_bytes(tree) -> int:
    """Largest per-device footprint of a tree of ShapeDtypeStructs / arrays with shardings."""
    per_dev: dict = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
        for d in leaf.sharding.device_set:
            per_dev[d] = per_dev.get(d, 0) + nbytes
    return max(per_dev.values()) if per_dev else 0


def total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(cfg: RunConfig, mesh) -> dict:
    shard = batch_shardings(mesh)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    dtypes = {"loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=shard[k]) for k in BATCH_KEYS}


def compile_check(cfg: RunConfig, mesh) -> dict:
    """Lower and compile the train step for ``mesh``; returns the memory report (bytes per device)."""
    model_cfg = read_model_shape(cfg.model)
    dp = sharding.data_parallel_size(mesh)
    if (cfg.data.batch_size // cfg.optim.grad_accum) % dp:
        raise InputError(
            f"micro-batch {cfg.data.batch_size // cfg.optim.grad_accum} (data.batch_size / optim.grad_accum) "
            f"is not divisible by the data-parallel size {dp} of mesh {dict(mesh.shape)}"
        )
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = abstract_state(model_cfg, tx, mesh)
    batch = abstract_batch(cfg, mesh)
    step_fn = jit_train_step(model_cfg, tx, cfg.optim.grad_accum, mesh, jax.tree.map(lambda x: x.sharding, state))
    lowered = step_fn.lower(state, batch)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    report = {
        "mesh": dict(mesh.shape),
        "devices": mesh.devices.size,
        "platform": mesh.devices.flat[0].platform,
        "model_params": model_cfg.num_params(),
        "param_dtype": model_cfg.param_dtype,
        "global_batch_tokens": cfg.data.batch_size * cfg.data.seq_len,
        "params_bytes_total": total_bytes(state.params),
        "params_bytes_per_device": per_device_bytes(state.params),
        "opt_state_bytes_per_device": per_device_bytes(state.opt_state),
        "batch_bytes_per_device": per_device_bytes(batch),
    }
    if mem is not None:
        report.update(
            compiled_argument_bytes=int(mem.argument_size_in_bytes),
            compiled_output_bytes=int(mem.output_size_in_bytes),
            compiled_alias_bytes=int(mem.alias_size_in_bytes),
            compiled_temp_bytes=int(mem.temp_size_in_bytes),
            compiled_code_bytes=int(mem.generated_code_size_in_bytes),
        )
        # Live at the peak: inputs + (outputs not written in place of donated inputs) + temporaries.
        report["estimated_peak_bytes_per_device"] = (
            report["compiled_argument_bytes"]
            + report["compiled_output_bytes"]
            - report["compiled_alias_bytes"]
            + report["compiled_temp_bytes"]
        )
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            report["flops_per_step_per_device"] = float(cost["flops"])
    except Exception:  # noqa: BLE001 - cost analysis is optional per backend
        pass
    try:
        stats = mesh.devices.flat[0].memory_stats() or {}
        if "bytes_limit" in stats:
            report["device_memory_bytes"] = int(stats["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        pass
    return report


def format_report(r: dict) -> str:
    def gib(b):
        for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
            if b >= scale:
                return f"{b / scale:9.2f} {unit}"
        return f"{b:9d} B  "

    lines = [
        f"mesh {r['mesh']} on {r['devices']} {r['platform']} devices; model {r['model_params'] / 1e6:.1f}M params "
        f"({r['param_dtype']}), global batch {r['global_batch_tokens']} tokens",
        "per device:",
        f"  params            {gib(r['params_bytes_per_device'])}   (all devices: {gib(r['params_bytes_total']).strip()})",
        f"  optimizer state   {gib(r['opt_state_bytes_per_device'])}",
        f"  batch             {gib(r['batch_bytes_per_device'])}",
    ]
    if "compiled_argument_bytes" in r:
        lines += [
            "compiled train step (XLA memory analysis, per device):",
            f"  arguments         {gib(r['compiled_argument_bytes'])}",
            f"  outputs           {gib(r['compiled_output_bytes'])}   "
            f"(donated in place: {gib(r['compiled_alias_bytes']).strip()})",
            f"  temporaries       {gib(r['compiled_temp_bytes'])}   (activations, gradients, workspace)",
            f"  estimated peak    {gib(r['estimated_peak_bytes_per_device'])}",
        ]
    if "device_memory_bytes" in r:
        peak = r.get("estimated_peak_bytes_per_device", 0)
        verdict = "fits" if peak <= r["device_memory_bytes"] else "DOES NOT FIT: raise fsdp/tensor, remat, or grad_accum"
        lines.append(f"  device memory     {gib(r['device_memory_bytes'])}   -> {verdict}")
    if "flops_per_step_per_device" in r:
        lines.append(f"  flops per step    {r['flops_per_step_per_device']:.3e} per device")
    if r["platform"] == "cpu":
        lines.append("(compiled for CPU devices: params/optimizer/batch bytes are exact; temporaries are the CPU compiler's)")
    return "\n".join(lines)


def simulate_devices(n: int) -> None:
    """Before JAX starts its backend: make it a CPU backend with ``n`` devices."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("--simulate-on-cpu must be set before JAX starts its backend")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
