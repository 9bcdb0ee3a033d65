"""Next-token prediction: per-token log-likelihoods shared by the trainer, evaluation and (later) the sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ra3_jax.model.llama import LlamaConfig, forward


def token_logprobs(params, batch, cfg: LlamaConfig) -> jax.Array:
    """log p(targets[t] | inputs[<=t]) for every position, [B, T] float32 (padding positions included)."""
    logits, _ = forward(params, batch["inputs"], batch["positions"], cfg, segment_ids=batch["segment_ids"])
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return tgt - lse


def nll_sum(params, batch, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """(sum of masked negative log-likelihood in nats, number of masked tokens)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    lp = token_logprobs(params, batch, cfg)
    return -(lp * mask).sum(), mask.sum()
