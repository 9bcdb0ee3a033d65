"""Abstract parameter specs: ONE description per leaf gives init, shardings and checkpoint restore."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ra3_jax import sharding
from ra3_jax.model.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    init: str = "normal"  # normal (std = scale / sqrt(fan_in)) | ones | zeros
    fan_in: int = 1


def param_specs(cfg: LlamaConfig) -> dict:
    L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    Hq, Hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, D, Hq), ("layers", "embed", "q_heads"), fan_in=D),
        "wk": ParamSpec((L, D, Hk), ("layers", "embed", "kv_heads"), fan_in=D),
        "wv": ParamSpec((L, D, Hk), ("layers", "embed", "kv_heads"), fan_in=D),
        "wo": ParamSpec((L, Hq, D), ("layers", "q_heads", "embed"), fan_in=Hq * 2 * L),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in=D),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), fan_in=D),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), fan_in=F * 2 * L),
    }
    if cfg.qkv_bias:
        layers["bq"] = ParamSpec((L, Hq), ("layers", "q_heads"), "zeros")
        layers["bk"] = ParamSpec((L, Hk), ("layers", "kv_heads"), "zeros")
        layers["bv"] = ParamSpec((L, Hk), ("layers", "kv_heads"), "zeros")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), fan_in=1),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), fan_in=D)
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_shardings(cfg: LlamaConfig, mesh: Mesh):
    return jax.tree.map(lambda s: sharding.named_sharding(mesh, s.logical_axes, s.shape), param_specs(cfg), is_leaf=_is_spec)


def abstract_params(cfg: LlamaConfig, mesh: Mesh | None = None):
    """ShapeDtypeStructs (with shardings when a mesh is given): the restore target for Orbax."""
    dtype = jnp.dtype(cfg.param_dtype)
    specs = param_specs(cfg)
    if mesh is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=_is_spec)
    shard = param_shardings(cfg, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), specs, shard, is_leaf=_is_spec)


def _init_leaf(spec: ParamSpec, key, dtype):
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    std = 0.02 if spec.fan_in == 1 else 1.0 / math.sqrt(spec.fan_in)
    return (std * jax.random.truncated_normal(key, -3.0, 3.0, spec.shape, jnp.float32)).astype(dtype)


def init_params(cfg: LlamaConfig, key: jax.Array, mesh: Mesh | None = None):
    """Random init, born sharded: jit with out_shardings so full weights never sit on one device."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    dtype = jnp.dtype(cfg.param_dtype)

    def init(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [_init_leaf(s, k, dtype) for s, k in zip(leaves, keys)])

    out_shardings = None if mesh is None else param_shardings(cfg, mesh)
    return jax.jit(init, out_shardings=out_shardings)(key)


def shard_params(params, cfg: LlamaConfig, mesh: Mesh):
    """Place host params (e.g. just converted; every process holds them in full) onto the mesh per the rules
    table; each process places its own shards, so this also works when the mesh spans several processes."""
    from ra3_jax.distributed import put_global

    return put_global(params, param_shardings(cfg, mesh))
