"""Terms of RA3's sequential ELBO (see docs/RA3.md).

    log p(x) >= E_q [ sum_t log p_theta(a_t | s_t, z_<=t) - KL_t ],
    KL_t = log q(z_t | s_t) - log p_0(z_t | s_t),
    p_0(CONTINUE) = alpha,   p_0(r) = (1 - alpha) * p_ref(r | s_t).

So starting a new latent costs c = log(alpha / (1 - alpha)) nats relative to continuing. With q a point mass
on one latent path z (what the E-step's selection produces), the bound is log p(x, z) = sum_t [log p_0(z_t) +
log p_theta(a_t | ...)], which is what :func:`path_log_joint` computes.
"""

from __future__ import annotations

import math

import numpy as np


def switch_cost(alpha: float) -> float:
    """c = log(alpha / (1 - alpha)); +inf at alpha = 1 (no latent is ever worth its cost)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return math.inf if alpha == 1.0 else math.log(alpha / (1.0 - alpha))


def log_prior(is_latent, logp_ref_latent, alpha: float):
    """log p_0(z_t): log(alpha) for CONTINUE, log(1 - alpha) + log p_ref(r) for a rationale r."""
    is_latent = np.asarray(is_latent, bool)
    log_a = math.log(alpha)
    log_1ma = math.log1p(-alpha) if alpha < 1.0 else -math.inf
    with np.errstate(invalid="ignore"):
        return np.where(is_latent, log_1ma + np.asarray(logp_ref_latent, np.float64), log_a)


def path_log_joint(code_ll, is_latent, logp_ref_latent, alpha: float) -> float:
    """log p(x, z) of one latent path: sum over boundaries t of log p_0(z_t) + the code log-likelihood.

    code_ll: total log p_theta of the code tokens given the interleaved sequence; is_latent [T] bool;
    logp_ref_latent [T] (ignored where not a latent).
    """
    return float(code_ll) + float(np.sum(log_prior(is_latent, logp_ref_latent, alpha)))


def elbo_estimate(log_joint, log_q) -> float:
    """Monte Carlo / exact-expectation ELBO: mean over samples z ~ q of log p(x, z) - log q(z).

    Pass weights through repeated samples, or use :func:`elbo_expectation` for an enumerated q.
    """
    lj, lq = np.asarray(log_joint, np.float64), np.asarray(log_q, np.float64)
    return float(np.mean(lj - lq))


def elbo_expectation(log_joint, q) -> float:
    """Exact ELBO of an enumerated q: sum_z q(z) [log p(x, z) - log q(z)] (terms with q(z) = 0 drop out)."""
    lj, q = np.asarray(log_joint, np.float64), np.asarray(q, np.float64)
    nz = q > 0
    return float(np.sum(q[nz] * (lj[nz] - np.log(q[nz]))))
