"""The RA3 held-out bound: latents chosen by the E-step's propose-score-select procedure (theta as policy) and
the sequential ELBO of the documents with them, next to the exact NTP log-likelihood of the same documents."""

from __future__ import annotations

import jax
import numpy as np

from ra3_jax.data.documents import Document, doc_sequence
from ra3_jax.objectives.elbo import log_prior

from .estep import LatentProposer, candidate_rounds


def path_terms(lp_y: np.ndarray, doc: Document, lat: dict) -> tuple[float, np.ndarray, np.ndarray]:
    """Split the teacher-forced log-probs of one document-with-latents sequence into its ELBO terms.

    lp_y[j] = log p(y[j+1] | y[<=j]) for y = doc_sequence(doc, lat). Returns (code log-likelihood including the
    eos, is_latent [T], log p_ref(z_t | s_t) [T] (0 where no latent)).
    """
    is_lat = np.array([t in lat for t in range(doc.num_steps)], bool)
    ref = np.zeros(doc.num_steps)
    code_ll, pos = 0.0, 0  # pos = index into lp_y of the next token's prediction
    for t in range(doc.num_steps):
        if t in lat:
            n = len(lat[t]["tokens"])
            ref[t] = float(np.sum(lp_y[pos : pos + n]))
            pos += n
        n = len(doc.steps[t])
        code_ll += float(np.sum(lp_y[pos : pos + n]))
        pos += n
    code_ll += float(lp_y[pos])  # eos
    if pos + 1 != len(lp_y):
        raise AssertionError(f"sequence/latent bookkeeping mismatch: {pos + 1} != {len(lp_y)}")
    return code_ll, is_lat, ref


def select_eval_latents(proposer: LatentProposer, params, docs: list[Document], seed: int) -> dict:
    """Latents of held-out documents by propose-score-select with ``params`` as the policy (no update)."""
    r, latents = proposer.r, {}
    B = r.estep_batch_docs
    key = jax.random.key(seed)
    if r.alpha >= 1.0:
        return latents
    for b0 in range(0, len(docs), B):
        idx = list(range(b0, min(b0 + B, len(docs))))
        for j, rnd in enumerate(candidate_rounds(docs, idx, r.eval_candidates_per_doc, (seed, 7))):
            cands = [proposer.candidate(docs, d, t, latents.get(d, {})) for d, t in rnd]
            proposer.run_round(cands, latents, jax.random.fold_in(key, b0 * 1000 + j), model_params=params)
    return latents


def evaluate_elbo(proposer: LatentProposer, params, docs: list[Document], *, seed: int) -> dict:
    """Held-out ELBO per code token with latents from propose-score-select (theta as policy), and the exact
    NTP log-likelihood of the same documents without latents (both nats per code token; code = steps + eos)."""
    latents = select_eval_latents(proposer, params, docs, seed)
    seq_y, masks, seq_x = [], [], []
    for d, doc in enumerate(docs):
        y, m = doc_sequence(doc, latents.get(d, {}), proposer.tokenizer)
        seq_y.append(y)
        masks.append(np.asarray(m[1:], bool))
        seq_x.append(doc_sequence(doc, {}, proposer.tokenizer)[0])
    lp_y = proposer.sequence_logprobs(params, seq_y)
    lp_x = proposer.sequence_logprobs(params, seq_x)
    elbo, ntp, ncode, nlat, nbound, lat_tok = 0.0, 0.0, 0, 0, 0, 0
    for d, doc in enumerate(docs):
        code_ll, is_lat, ref = path_terms(lp_y[d], doc, latents.get(d, {}))
        elbo += code_ll + float(np.sum(log_prior(is_lat, ref, proposer.r.alpha)))
        ntp += float(lp_x[d].sum())
        ncode += doc.code_tokens + 1
        nlat += int(is_lat.sum())
        nbound += doc.num_steps
        lat_tok += int(masks[d].sum())
    return {
        "eval/elbo_per_code_token": elbo / ncode,
        "eval/ntp_ll_per_code_token": ntp / ncode,
        "eval/latent_rate": nlat / max(nbound, 1),
        "eval/mean_latent_tokens": lat_tok / max(nlat, 1),
        "eval/code_tokens": float(ncode),
    }
