"""Jitted pure step functions with explicit shardings and donation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ra3_jax import sharding
from ra3_jax.objectives.ntp import nll_sum
from ra3_jax.train.state import TrainState

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def train_step(state: TrainState, batch: dict, *, model_cfg, tx: optax.GradientTransformation, grad_accum: int):
    """One optimizer step; the loss is the mean NLL over all masked tokens of the global batch.

    With grad_accum = A the batch [B, T] is cut into A micro-batches scanned in order; gradients of the
    summed NLL are accumulated in float32 and divided by the total token count once (so A does not change
    the result beyond float rounding).
    """

    def loss_and_grad(params, b):
        (nll, n), g = jax.value_and_grad(lambda p: nll_sum(p, b, model_cfg), has_aux=True)(params)
        return nll, n, g

    if grad_accum == 1:
        nll, ntok, grads = loss_and_grad(state.params, batch)
    else:
        micro_batches = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def body(carry, b):
            nll_acc, n_acc, g_acc = carry
            nll, n, g = loss_and_grad(state.params, b)
            return (nll_acc + nll, n_acc + n, jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (nll, ntok, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), micro_batches)
    denom = jnp.maximum(ntok, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "tokens": ntok}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model_cfg):
    nll, n = nll_sum(params, batch, model_cfg)
    return {"nll_sum": nll, "tokens": n}


def batch_shardings(mesh: Mesh):
    return {k: sharding.batch_sharding(mesh, 2) for k in BATCH_KEYS}


def jit_train_step(model_cfg, tx, grad_accum: int, mesh: Mesh, state_sharding):
    fn = functools.partial(train_step, model_cfg=model_cfg, tx=tx, grad_accum=grad_accum)
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_shardings(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(model_cfg, mesh: Mesh, params_sharding):
    fn = functools.partial(eval_step, model_cfg=model_cfg)
    return jax.jit(fn, in_shardings=(params_sharding, batch_shardings(mesh)), out_shardings=sharding.replicated(mesh))
