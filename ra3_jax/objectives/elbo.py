"""RA3's bound (formulation v2, docs/RA3.md): the LM itself is the latent-variable model of code,

    p_latent(x) = sum_z p_theta(render(x, z))  >=  p_theta(render(x, z*))  for any selected path z*,

so the selected path's log-likelihood is a lower bound (the all-CONTINUE path gives log p_theta(x) exactly), and
for a proposal q with computable log q the importance-weighted bound with K paths z_k ~ q is

    log p_latent(x) >= E[ log (1/K) sum_k p_theta(render(x, z_k)) / q(z_k | x) ]   (tighter as K grows).

Starting a rationale costs the switching penalty c = log(alpha / (1 - alpha)) in the E-step's reward and
selection (c -> inf: no rationale is ever accepted and RA3 is plain NTP).
"""

from __future__ import annotations

import math

import numpy as np


def switch_cost(alpha: float) -> float:
    """c = log(alpha / (1 - alpha)); +inf at alpha = 1 (no latent is ever worth its cost)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return math.inf if alpha == 1.0 else math.log(alpha / (1.0 - alpha))


def iwae_estimate(log_w: np.ndarray) -> np.ndarray:
    """log (1/K) sum_k w_k over the last axis of log weights log_w [..., K] (-inf where no weight is positive)."""
    log_w = np.asarray(log_w, np.float64)
    m = np.max(log_w, axis=-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # a row without a valid path: log 0 = -inf
        return (safe + np.log(np.mean(np.exp(log_w - safe), axis=-1, keepdims=True)))[..., 0]


def iwae_bound(log_p, log_q) -> float:
    """log (1/K) sum_k exp(log_p[k] - log_q[k]): the importance-weighted bound of K sampled paths."""
    return float(iwae_estimate(np.asarray(log_p, np.float64) - np.asarray(log_q, np.float64)))


def elbo_expectation(log_joint, q) -> float:
    """Exact ELBO of an enumerated q: sum_z q(z) [log p(x, z) - log q(z)] (terms with q(z) = 0 drop out)."""
    lj, q = np.asarray(log_joint, np.float64), np.asarray(q, np.float64)
    nz = q > 0
    return float(np.sum(q[nz] * (lj[nz] - np.log(q[nz]))))
