"""The RA3 held-out bound per byte of code (formulation v2): latents chosen on held-out documents by the E-step's
propose-score-select rule with theta as the policy, then log p_theta(render(x, z*)) of each document, tokenized
whole, next to the same model's NTP log-likelihood log p_theta(x); both in nats (and bits) per UTF-8 byte of x."""

from __future__ import annotations

import math

import jax
import numpy as np

from ra3_jax.data.documents import Document, doc_sequence

from .estep import LatentProposer, candidate_rounds


def select_eval_latents(proposer: LatentProposer, params, docs: list[Document], seed: int) -> dict:
    """Latents of held-out documents by propose-score-select with ``params`` as the policy (no update)."""
    r, latents = proposer.r, {}
    B = r.estep_batch_docs
    key = jax.random.key(seed)
    if r.alpha >= 1.0:
        return latents
    for b0 in range(0, len(docs), B):
        idx = list(range(b0, min(b0 + B, len(docs))))
        for j, rnd in enumerate(candidate_rounds(docs, idx, r.eval_candidates_per_doc, (seed, 7), proposer.first)):
            cands = [proposer.candidate(docs, d, t, latents.get(d, {})) for d, t in rnd]
            proposer.run_round(cands, latents, jax.random.fold_in(key, b0 * 1000 + j), model_params=params)
    return latents


def path_log_likelihoods(proposer: LatentProposer, params, docs: list[Document], latents: dict) -> np.ndarray:
    """log p_theta([start] + encode(render(x, z)) + [eos]) of each document with its latents (nats)."""
    seqs = [doc_sequence(doc, latents.get(d, {}), proposer.tokenizer)[0] for d, doc in enumerate(docs)]
    return np.array([float(lp.sum()) for lp in proposer.sequence_logprobs(params, seqs)])


def evaluate_bound(proposer: LatentProposer, params, docs: list[Document], *, seed: int) -> dict:
    """Held-out bound and NTP log-likelihood per byte (nats and bits), latent rate and mean latent length."""
    latents = select_eval_latents(proposer, params, docs, seed)
    bound = path_log_likelihoods(proposer, params, docs, latents)
    ntp = path_log_likelihoods(proposer, params, docs, {})
    nbytes = sum(doc.code_bytes for doc in docs)
    n_lat = sum(len(latents.get(d, {})) for d in range(len(docs)))
    lat_chars = sum(len(z["text"]) for lat in latents.values() for z in lat.values())
    return {
        "eval/bound_nats_per_byte": float(bound.sum()) / nbytes,
        "eval/ntp_nats_per_byte": float(ntp.sum()) / nbytes,
        "eval/bound_bits_per_byte": float(bound.sum()) / nbytes / math.log(2),
        "eval/ntp_bits_per_byte": float(ntp.sum()) / nbytes / math.log(2),
        "eval/latent_rate": n_lat / max(sum(doc.num_steps for doc in docs), 1),
        "eval/mean_latent_chars": lat_chars / max(n_lat, 1),
        "eval/code_bytes": float(nbytes),
    }
