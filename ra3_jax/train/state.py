"""TrainState pytree, optimizer, and the shardings of both (derived from the param specs)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ra3_jax import sharding
from ra3_jax.model.params import abstract_params, param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def learning_rate_schedule(optim, total_steps: int):
    """Linear warmup over ``optim.warmup_steps`` (0 = none), then constant or cosine decay to lr * min_lr_ratio."""
    decay = optim.decay_steps or total_steps
    warm = optim.warmup_steps
    if optim.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(optim.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), optax.constant_schedule(optim.lr)], [warm])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else optim.lr,
        peak_value=optim.lr,
        warmup_steps=warm,
        decay_steps=max(decay, warm + 1),
        end_value=optim.lr * optim.min_lr_ratio,
    )


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
    """The project's one optimizer recipe: AdamW (no decay on norms/biases) under ``learning_rate_schedule``,
    after global-norm clipping when ``optim.clip_norm`` > 0. Every trainer (NTP, M-step, E-step policy, GRPO,
    cold-start SFT) builds its optimizer here from an OptimSection."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.adamw(
        learning_rate_schedule(optim, total_steps),
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=decay_mask,
    )
    if optim.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
    return tx


def _path_key(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def state_shardings(model_cfg, tx, mesh: Mesh):
    """Shardings of a TrainState: optimizer leaves shaped like a param take that param's sharding."""
    p_shard = param_shardings(model_cfg, mesh)
    by_path = {_path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(p_shard)[0]}
    abstract_opt = jax.eval_shape(tx.init, abstract_params(model_cfg))

    def pick(path, leaf):
        key = _path_key(path)
        for n in range(len(key)):
            if key[n:] in by_path:
                return by_path[key[n:]]
        return sharding.replicated(mesh)

    opt_shard = jax.tree_util.tree_map_with_path(pick, abstract_opt)
    return TrainState(step=sharding.replicated(mesh), params=p_shard, opt_state=opt_shard)


def abstract_state(model_cfg, tx, mesh: Mesh):
    shard = state_shardings(model_cfg, tx, mesh)
    shapes = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params(model_cfg))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard)


def create_state(params, tx, model_cfg, mesh: Mesh) -> TrainState:
    shard = state_shardings(model_cfg, tx, mesh)
    make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=shard)
    return make(params)
