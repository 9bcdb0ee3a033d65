"""The one update core: an objective (a loss function) plugged into one jitted optimizer step.

Every training signal of the project is an :class:`Objective` handed to :func:`make_update_step`: next-token
prediction (pre-/mid-training, the RA3 M-step, RLPT's cold-start SFT), the GRPO surrogate (RLVR, RLPT) and the
RA3 E-step's policy gradient. The core owns what they used to repeat: gradient accumulation over micro-batches
(float32 sums in a ``lax.scan``), the optimizer update and the metrics every loop logs (``loss``, ``grad_norm``).

Conventions: an objective's ``loss(params, rows, norm, *extra)`` returns ``(loss, aux)`` where ``loss`` is this
micro-batch's share of the whole batch's loss (normalized by ``norm``, computed once from the whole batch by
``prepare``), so the shares add up to the full-batch loss whatever the number of micro-batches; ``aux`` holds
sums that add up the same way and ``finish(aux, norm, prep)`` turns them into metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ra3_jax import sharding
from ra3_jax.model.attention import traced_on
from ra3_jax.objectives.ntp import nll_sum
from ra3_jax.train.state import TrainState

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _whole_batch(batch, *extra):
    return batch, None, {}


def _aux_as_metrics(aux, norm, prep):
    return aux


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss plugged into the update core (see the module docstring for the conventions).

    loss:    (params, rows, norm, *extra) -> (loss share, aux sums)
    prepare: (batch, *extra) -> (rows split into micro-batches, norm, prep outputs); default: rows = batch
    finish:  (aux sums, norm, prep outputs) -> metrics; default: the aux sums
    """

    loss: Callable
    prepare: Callable = _whole_batch
    finish: Callable = _aux_as_metrics


def accumulate_gradients(loss_fn: Callable, params, rows: dict, micro_batches: int):
    """Sum ``loss_fn(params, micro_batch) -> (loss, aux)`` and its gradient over ``micro_batches`` equal slices of
    ``rows`` (leading axis), in order; gradients accumulate in float32. Returns (loss, aux, grads)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (loss, aux), grads = grad_fn(params, rows)
        return loss, aux, grads
    chunks = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), rows)
    aux_shape = jax.eval_shape(lambda b: grad_fn(params, b)[0][1], jax.tree.map(lambda x: x[0], chunks))

    def body(carry, b):
        loss_acc, aux_acc, g_acc = carry
        (loss, aux), g = grad_fn(params, b)
        add = lambda a, x: a + x.astype(jnp.float32)
        return (loss_acc + loss, jax.tree.map(add, aux_acc, aux), jax.tree.map(add, g_acc, g)), None

    zeros = lambda t: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), t)
    (loss, aux, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros(aux_shape), zeros(params)), chunks)
    return loss, aux, grads


def update_step(state: TrainState, batch, *extra, objective: Objective, tx: optax.GradientTransformation, micro_batches: int):
    """One optimizer step of ``objective`` on ``batch`` (``extra``: frozen inputs such as a reference model)."""
    rows, norm, prep = objective.prepare(batch, *extra)
    loss, aux, grads = accumulate_gradients(lambda p, b: objective.loss(p, b, norm, *extra), state.params, rows, micro_batches)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **objective.finish(aux, norm, prep)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_update_step(objective: Objective, tx, micro_batches: int, state_sharding, batch_sharding, extra_shardings=(), *, mesh):
    """``update_step`` jitted with explicit shardings (attention kernels per shard of ``mesh``); the state is
    donated."""
    fn = functools.partial(update_step, objective=objective, tx=tx, micro_batches=micro_batches)
    return jax.jit(
        traced_on(mesh, fn),
        in_shardings=(state_sharding, batch_sharding, *extra_shardings),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------------- next-token prediction
def _ntp_norm(batch):
    return batch, jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0), {}


def ntp_objective(model_cfg) -> Objective:
    """Mean negative log-likelihood over the masked tokens of the whole batch (``loss_mask``); metric ``tokens``."""

    def loss(params, rows, denom):
        nll, tokens = nll_sum(params, rows, model_cfg)
        return nll / denom, {"tokens": tokens}

    return Objective(loss=loss, prepare=_ntp_norm)


def eval_step(params, batch, *, model_cfg):
    nll, n = nll_sum(params, batch, model_cfg)
    return {"nll_sum": nll, "tokens": n}


def batch_shardings(mesh: Mesh, keys=BATCH_KEYS):
    return {k: sharding.batch_sharding(mesh, 2) for k in keys}


def jit_train_step(model_cfg, tx, grad_accum: int, mesh: Mesh, state_sharding):
    """The next-token training step: ``ntp_objective`` in the update core, ``grad_accum`` micro-batches."""
    return jit_update_step(ntp_objective(model_cfg), tx, grad_accum, state_sharding, batch_shardings(mesh), mesh=mesh)


def jit_eval_step(model_cfg, mesh: Mesh, params_sharding):
    fn = traced_on(mesh, functools.partial(eval_step, model_cfg=model_cfg))
    return jax.jit(fn, in_shardings=(params_sharding, batch_shardings(mesh)), out_shardings=sharding.replicated(mesh))
