"""Policy-gradient pieces shared by RA3's E-step, RLVR and RLPT: group advantages and KL estimators.

Rewards come in groups of G samples that share a prompt, laid out group-major: ``rewards[n * G + g]``.
"""

from __future__ import annotations

import typing

import jax.numpy as jnp

from ra3_jax.config import Advantage, KLEstimator

ADVANTAGES = typing.get_args(Advantage)
KL_ESTIMATORS = typing.get_args(KLEstimator)


def group_advantages(rewards, group_size: int, method: str = "grpo", eps: float = 1e-6):
    """Advantages of ``rewards`` [N*G] within each group of G.

    grpo:   (r - mean) / (std + eps)           (std over the group, population form)
    rloo:   r - mean of the OTHER G-1 samples   (leave-one-out baseline; = G/(G-1) * (r - mean))
    drgrpo: r - mean                            (Dr. GRPO: no std normalization)
    A constant added to every reward of a group (e.g. RA3's switching cost c) leaves all three unchanged.
    """
    if method not in ADVANTAGES:
        raise ValueError(f"advantage method {method!r} is not one of {ADVANTAGES}")
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    mean = r.mean(axis=1, keepdims=True)
    if method == "grpo":
        a = (r - mean) / (r.std(axis=1, keepdims=True) + eps)
    elif method == "rloo":
        a = (r - mean) * group_size / max(group_size - 1, 1)
    else:
        a = r - mean
    return a.reshape(-1)


def kl_estimate(logp_policy, logp_ref, kind: str = "k3"):
    """Per-token estimate of KL(policy || ref) from samples of the policy.

    k1 = log pi - log ref (unbiased, high variance, can be negative);
    k3 = exp(log ref - log pi) - (log ref - log pi) - 1 (unbiased, always >= 0; Schulman's estimator).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {kind!r} is not one of {KL_ESTIMATORS}")
    d = logp_ref - logp_policy
    if kind == "k1":
        return -d
    return jnp.exp(d) - d - 1.0


def policy_gradient_loss(logp, old_logp, advantages, mask, *, clip_eps: float = 0.2, aggregation: str = "token"):
    """Clipped-ratio surrogate (GRPO/PPO form) over masked tokens.

    logp, old_logp, mask: [N, T]; advantages [N]. On-policy (old_logp == logp numerically) the ratio is 1 and
    the gradient is the REINFORCE gradient -A * grad log pi. ``aggregation``: "token" = mean over all masked
    tokens of the batch; "sequence" = mean over sequences of each sequence's token mean.
    """
    ratio = jnp.exp(logp - old_logp)
    a = advantages[:, None]
    surr = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    per_tok = -surr * mask
    if aggregation == "token":
        return per_tok.sum() / jnp.maximum(mask.sum(), 1.0)
    if aggregation == "sequence":
        return (per_tok.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)).mean()
    raise ValueError(f"aggregation {aggregation!r} is not 'token' or 'sequence'")
