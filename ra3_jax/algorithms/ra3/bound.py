"""The RA3 held-out bound per byte of code (formulation v2): latents chosen on held-out documents by the E-step's
propose-score-select rule with theta as the policy, then log p_theta(render(x, z*)) of each document, tokenized
whole, next to the same model's NTP log-likelihood log p_theta(x); both in nats (and bits) per UTF-8 byte of x."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from ra3_jax.data.documents import Document, doc_sequence, encode_text, render, render_latent, start_ids
from ra3_jax.objectives.elbo import iwae_estimate
from ra3_jax.sampler import STOP_STRING

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
    r = proposer.r
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
    } | (iwae_metrics(proposer, params, docs, r.eval_iwae_samples, seed=seed) if r.eval_iwae_samples else {})


def iwae_metrics(proposer: LatentProposer, params, docs: list[Document], K: int, *, seed: int) -> dict:
    """The importance-weighted bound of K sampled paths per document, per byte, and the fraction of valid paths."""
    log_w, _ = iwae_log_weights(proposer, params, docs, K, seed=seed)
    per_doc = iwae_estimate(log_w)
    out = {
        "eval/iwae_valid_paths": float(np.isfinite(log_w).mean()),
        "eval/iwae_docs_without_path": float(np.sum(~np.isfinite(per_doc))),
        "eval/iwae_samples": float(K),
    }
    if np.all(np.isfinite(per_doc)):  # else the bound is -inf: reported as the count above, not as -Infinity
        iwae = float(per_doc.sum()) / sum(doc.code_bytes for doc in docs)
        out |= {"eval/iwae_nats_per_byte": iwae, "eval/iwae_bits_per_byte": iwae / math.log(2)}
    return out


# ------------------------------------------------------------------------------------------------- IWAE
# Proposal q(z | x), mean-field over boundaries: at boundary t a rationale is sampled by ``proposal_params`` after
# the plain prefix (the E-step's prompt: ``LatentProposer.candidate`` with no latents) with the forced marker,
# and switched in with probability clip(p(marker | prompt), floor, 1 - floor). A path is scored on EXACTLY the
# ids it was sampled as: [start] + code segment + marker + sampled ids + code segment ... + [eos], code segments
# tokenized between rationales. Distinct (switches, ids) give distinct complete token sequences, each of which
# renders x with comment lines inserted, so sum_s p(s) <= p_latent(x) and E log mean_k p(s_k) / q(s_k) is a lower
# bound of log p_latent(x) that tightens as K grows. A sampled rationale that is not exactly one rendered comment
# line (no stop at its end of line within max_latent_tokens, an EOS, a second line break, a CR, trailing blanks)
# has no path: weight 0.
@dataclasses.dataclass
class SampledThought:
    ids: list[int]  # forced marker ids + the sampled ids
    line: str | None  # the decoded comment line, None when the sample is not exactly one line
    log_q: float  # log-prob of the sampled ids under the sampling distribution
    log_marker: float  # log p(forced marker | prompt) under the proposal model


def sample_thoughts(proposer: LatentProposer, params, docs: list[Document], K: int, key) -> dict:
    """{(d, t): K SampledThought} at every boundary t >= proposer.first of every document."""
    tok, r, n = proposer.tokenizer, proposer.r, proposer.n_pairs
    cands = [proposer.candidate(docs, d, t, {}) for d, doc in enumerate(docs) for t in range(proposer.first, doc.num_steps)]
    out = {}
    for i in range(0, len(cands), n):
        chunk = cands[i : i + n]
        pad = chunk + [chunk[0]] * (n - len(chunk))
        res = proposer.sampler.generate_tokens(
            params,
            [c.prompt for c in pad],
            max_new_tokens=max(len(c.forced) for c in pad) + r.max_latent_tokens,
            sampling=proposer.sampling,
            key=jax.random.fold_in(key, i),
            num_samples=K,
            stop_strings=["\n"],
            forced_prefix=[c.forced for c in pad],
        )
        for j, c in enumerate(chunk):
            F, group = len(c.forced), []
            for k in range(K):
                row = j * K + k
                m = int(res.lengths[row])
                ids = [int(x) for x in res.tokens[row, :m]]
                line, head = tok.decode(ids), c.indent + r.marker
                # exactly one rendered comment line: ends its line within max_latent_tokens after its own marker
                # (the budget above is the longest marker's), no second break, no CR, no trailing blanks
                ok = int(res.stop_reason[row]) == STOP_STRING and m - F <= r.max_latent_tokens and line.startswith(head)
                ok = ok and render_latent(c.indent, r.marker, line[len(head) :]) == line
                lq = float(np.sum(res.logprobs_processed[row, F:m]))
                group.append(SampledThought(ids, line if ok else None, lq, float(np.sum(res.logprobs[row, :F]))))
            out[(c.doc, c.step)] = group
    return out


def iwae_log_weights(
    proposer: LatentProposer, params, docs: list[Document], K: int, *, seed: int, proposal_params=None, floor: float = 0.05
) -> tuple[np.ndarray, list[list[dict]]]:
    """log p(s_k) - log q(s_k) of K sampled paths per document ([n_docs, K] float64; -inf: no path) and each
    path's switched-in rationales ({step: SampledThought})."""
    tok = proposer.tokenizer
    thoughts = sample_thoughts(proposer, params if proposal_params is None else proposal_params, docs, K, jax.random.key(seed))
    n_start, seqs, log_q, paths = len(start_ids(tok)), [], np.zeros((len(docs), K)), []
    for d, doc in enumerate(docs):
        paths.append([])
        for k in range(K):
            rng = np.random.default_rng([seed, d, k])
            ids, code, took = [], "", {}
            for t in range(doc.num_steps):
                th = thoughts.get((d, t), [None] * K)[k]
                if th is not None:
                    qs = min(max(math.exp(th.log_marker), floor), 1.0 - floor)
                    if rng.random() < qs:
                        log_q[d, k] += math.log(qs) + th.log_q
                        ids += encode_text(code, tok)[n_start if ids else 0 :] + th.ids
                        code, took[t] = "", th
                        if th.line is None:
                            log_q[d, k] = math.inf
                    else:
                        log_q[d, k] += math.log(1.0 - qs)
                code += doc.texts[t]
            ids += encode_text(code, tok)[n_start if ids else 0 :] + [tok.eos_id]
            if np.isfinite(log_q[d, k]) and tok.decode(ids[n_start:-1]) != render(
                doc, {t: {"text": z.line} for t, z in took.items()}
            ):
                log_q[d, k] = math.inf  # the pieces do not decode to the rendered text (a tokenizer's join rule)
            seqs.append(ids)
            paths[-1].append(took)
    log_p = np.array([float(lp.sum()) for lp in proposer.sequence_logprobs(params, seqs, rows=proposer.n_pairs)]).reshape(
        len(docs), K
    )
    return log_p - log_q, paths
