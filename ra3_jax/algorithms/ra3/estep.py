"""The RA3 E-step (formulation v2, docs/RA3.md): latent discovery by policy gradient over candidate rounds.

One round takes one candidate boundary t of each document of an E-step batch (documents visited in order, so each
proposal's prefix holds the latents accepted before it):
1. propose: the policy q_phi (a copy of the frozen model, updated by PG) samples G rationales after the FULL
   prefix ``[start] + encode(render(x, z_<t))``, the indent + marker forced, stop at the end of the line;
2. score, under the frozen p_theta of the iteration, canonical rows tokenized whole (``documents.scoring_rows``):
   LL(z) = log p(horizon | prefix, z), LL(C) = log p(horizon | prefix), LP(z) = log p(marker + body | prefix);
3. reward R = LL(z) - LL(C) + lambda_z LP(z) - c - beta log q(z) (log q: the sampled tokens' log-probs under
   the sampling distribution); group advantages; one policy-gradient step on exactly the SAMPLED tokens (the
   forced marker is not in the loss) with ``estep_objective`` in the update core;
4. select: the best rationale is accepted iff LL(z) - LL(C) + lambda_z LP(z) - c > 0, else CONTINUE.
``run_estep`` runs the batches through the one host loop (one loop step per batch, checkpointed after each:
policy state + the latents accepted so far).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from ra3_jax import sharding
from ra3_jax.config import RunConfig
from ra3_jax.data.documents import Document, encode_text, first_boundary, render, render_latent, scoring_rows, span_mask
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.distributed import fetch, put_global
from ra3_jax.model.attention import traced_on
from ra3_jax.model.llama import LlamaConfig
from ra3_jax.model.params import param_shardings
from ra3_jax.objectives.continuation import continuation_logprobs, policy_logprobs, prefix_cache, repeat_cache
from ra3_jax.objectives.elbo import switch_cost
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.objectives.pg import group_advantages, kl_estimate, policy_gradient_loss
from ra3_jax.sampler import Sampler, round_up, sampling_method
from ra3_jax.train.state import TrainState, abstract_state, create_state, make_optimizer, state_shardings
from ra3_jax.train.step import Objective, jit_update_step

log = logging.getLogger(__name__)
ROW_MULTIPLE = 32  # rows are padded to a multiple of this many tokens (fewer recompiles, less waste than 2^k)


def pad_length(n: int) -> int:
    return round_up(n, ROW_MULTIPLE)


# ------------------------------------------------------------------------------------------- device steps
# Batches (host side: ``LatentProposer.scoring_batch`` / ``policy_batch``) share a layout: n candidate prefixes
# ``pre_tokens`` [n, P] (left-padded, ``pre_len``), each continued by k rows (row i*k + j continues prefix i):
# ``cont_tokens`` / ``targets`` [n*k, C] (right-padded, ``cont_len``; the first input is the prefix's last token,
# objectives/continuation.py). Scoring: k = G + 1 (G rationales + the row without one), masks ``z_mask`` (the
# rationale's own tokens, LP) and ``h_mask`` (the horizon, LL). Policy: k = G, ``mask`` on the sampled tokens.
def _cached(params, b, k: int, cfg: LlamaConfig):
    P, C = b["pre_tokens"].shape[1], b["cont_tokens"].shape[1]
    return repeat_cache(prefix_cache(params, b["pre_tokens"], b["pre_len"], cfg, cache_len=P + C), k)


def score_rows(model_params, b, *, cfg: LlamaConfig, G: int, chunk: int):
    """Frozen-model scores on the shared prefix cache -> lp_z [n, G] (LP: the rationale's own log-prob), ll_z
    [n, G] (the horizon after it), ll_c [n] (the horizon without it)."""
    n = b["pre_tokens"].shape[0]
    scored = jnp.maximum(b["z_mask"], b["h_mask"])
    lp = continuation_logprobs(
        model_params,
        _cached(model_params, b, G + 1, cfg),
        b["cont_tokens"],
        b["cont_len"],
        b["targets"],
        scored,
        cfg,
        chunk=chunk,
    )
    lp_own = (lp * b["z_mask"]).sum(-1).reshape(n, G + 1)
    ll = (lp * b["h_mask"]).sum(-1).reshape(n, G + 1)
    return {"lp_z": lp_own[:, :G], "ll_z": ll[:, :G], "ll_c": ll[:, G]}


def estep_objective(
    cfg: LlamaConfig,
    *,
    G: int,
    advantage: str,
    kl_coef: float,
    kl_estimator: str,
    aggregation: str,
    exact: bool = False,
    chunk: int = 512,
) -> Objective:
    """Policy gradient on exactly the sampled rationale tokens (``mask``) after prompt + forced marker; advantages
    of ``rewards`` (R + c; the constant c cancels) within each group of G. The policy's log-probs come from
    ``policy_logprobs`` (prefix cache held constant unless ``exact``). With ``kl_coef`` the frozen model's
    log-probs of the same tokens (extra argument: its params) give a KL(q || p_theta) term."""

    def prepare(b, model_params):
        rows = {k: v for k, v in b.items() if k != "rewards"}
        rows["adv"] = group_advantages(b["rewards"], G, advantage)
        if kl_coef:
            ref = continuation_logprobs(
                model_params,
                _cached(model_params, b, G, cfg),
                b["cont_tokens"],
                b["cont_len"],
                b["targets"],
                b["mask"],
                cfg,
                chunk=chunk,
            )
            rows["ref_lp"] = jax.lax.stop_gradient(ref)
        return rows, None, {}

    def loss(params, rows, norm, model_params):
        mask = rows["mask"]
        lp = policy_logprobs(
            params,
            rows["pre_tokens"],
            rows["pre_len"],
            rows["cont_tokens"],
            rows["cont_len"],
            rows["targets"],
            mask,
            cfg,
            exact=exact,
            chunk=chunk,
        )
        pg = policy_gradient_loss(lp, jax.lax.stop_gradient(lp), rows["adv"], mask, aggregation=aggregation)
        if not kl_coef:
            return pg, {"kl": jnp.zeros(())}
        kl = (kl_estimate(lp, rows["ref_lp"], kl_estimator) * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        return pg + kl_coef * kl, {"kl": kl}

    return Objective(loss=loss, prepare=prepare)


def sequence_logprobs(params, batch, *, cfg: LlamaConfig):
    return token_logprobs(params, batch, cfg) * (batch["segment_ids"] != 0)


# ------------------------------------------------------------------------------------ propose, score, select
@dataclasses.dataclass
class Candidate:
    doc: int  # index into the document list
    step: int  # boundary t (a latent goes before step t)
    prefix: str  # render(x, accepted latents) up to boundary t
    prompt: list[int]  # the proposal's prompt: [start] + encode(prefix) (+ the horizon, commented out: hindsight)
    forced: list[int]  # encode(indent + marker): forced before the sampled body
    horizon: str  # the next H steps
    ends_document: bool  # the horizon reaches the end of the document (eos is scored too)
    indent: str


def estep_optimizer(cfg: RunConfig):
    """The policy's optimizer: the run's AdamW recipe at the constant ``ra3.estep_lr``, no weight decay."""
    optim = dataclasses.replace(cfg.optim, lr=cfg.ra3.estep_lr, schedule="constant", warmup_steps=0, weight_decay=0.0)
    return make_optimizer(optim, 1)


class LatentProposer:
    """Propose (sample), score and select latents for batches of candidates; optionally update the policy."""

    def __init__(self, cfg: RunConfig, model_cfg: LlamaConfig, tokenizer, mesh):
        self.cfg, self.r, self.pol = cfg, cfg.ra3, cfg.policy
        self.model_cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
        self.G = self.pol.group_size
        self.c = switch_cost(self.r.alpha)
        self.seed = cfg.train.seed
        self.first = first_boundary(tokenizer)  # no latent before the first step without a start token
        self.sampling = sampling_method(self.pol.temperature, self.pol.top_k, self.pol.top_p)
        self.dp = sharding.data_parallel_size(mesh)
        self.n_pairs = -(-self.r.estep_batch_docs // self.dp) * self.dp  # fixed shapes: pad candidates to this
        self.sampler = Sampler(model_cfg, tokenizer, prompt_multiple=ROW_MULTIPLE)  # prefixes of every length
        self.end_ids = set(self.sampler.eos_ids)
        self.tx = estep_optimizer(cfg)
        self.st_shard = state_shardings(model_cfg, self.tx, mesh)
        p_shard = param_shardings(model_cfg, mesh)
        p = self.pol
        obj = estep_objective(
            model_cfg,
            G=self.G,
            advantage=p.advantage,
            kl_coef=p.kl_coef,
            kl_estimator=p.kl_estimator,
            aggregation=p.loss_aggregation,
        )
        self._update = jit_update_step(obj, self.tx, 1, self.st_shard, None, (p_shard,), mesh=mesh)
        score = functools.partial(score_rows, cfg=model_cfg, G=self.G, chunk=self.r.logit_chunk)
        self._score = jax.jit(traced_on(mesh, score), in_shardings=(p_shard, None))
        self._seq_lp = jax.jit(traced_on(mesh, functools.partial(sequence_logprobs, cfg=model_cfg)))

    # -- policy state
    def init_policy(self, params) -> TrainState:
        return create_state(params, self.tx, self.model_cfg, self.mesh)

    def abstract_policy(self):
        return abstract_state(self.model_cfg, self.tx, self.mesh)

    # -- candidates
    def candidate(self, docs: list[Document], d: int, t: int, latents: dict) -> Candidate:
        doc, r = docs[d], self.r
        prefix = render(doc, latents, upto=t)
        horizon = "".join(doc.texts[t : t + r.horizon_steps])
        forced = list(self.tokenizer.encode(doc.indents[t] + r.marker))
        if getattr(self.tokenizer, "add_bos", False) and forced and forced[0] == self.tokenizer.bos_id:
            forced = forced[1:]
        ends = t + r.horizon_steps >= doc.num_steps
        shown = prefix
        if r.proposal == "hindsight":  # q also sees the next H steps, commented out, right before its rationale
            shown += "".join(f"{doc.indents[t]}# > {line}\n" for line in horizon.rstrip("\n").split("\n"))
        return Candidate(d, t, prefix, encode_text(shown, self.tokenizer), forced, horizon, ends, doc.indents[t])

    def propose(self, policy_params, cands: list[Candidate], key) -> list[list[dict]]:
        """G rationales per candidate: {"text": comment line, "sampled": the sampled ids, "logq"}."""
        pad_c = cands + [cands[0]] * (self.n_pairs - len(cands))
        F = max(len(c.forced) for c in pad_c)
        out = self.sampler.generate_tokens(
            policy_params,
            [c.prompt for c in pad_c],
            max_new_tokens=F + self.r.max_latent_tokens,
            sampling=self.sampling,
            key=key,
            num_samples=self.G,
            stop_strings=["\n"],
            forced_prefix=[c.forced for c in pad_c],
        )
        res = []
        for i, c in enumerate(cands):
            group = []
            for g in range(self.G):
                row, F_i = i * self.G + g, len(c.forced)  # at most max_latent_tokens after the marker: a row whose
                n = min(int(out.lengths[row]), F_i + self.r.max_latent_tokens)  # marker is shorter than F ran longer
                sampled = [int(x) for x in out.tokens[row, F_i:n]]
                body = self.tokenizer.decode([x for x in sampled if x not in self.end_ids])  # a sampled EOS ends the line
                logq = float(np.sum(out.logprobs_processed[row, F_i:n]))
                group.append({"text": render_latent(c.indent, self.r.marker, body), "sampled": sampled, "logq": logq})
            res.append(group)
        return res

    def _place(self, pre: list[list[int]], rows: list[tuple[list[int], list[int], dict]], k: int, extra: dict, C=None):
        """Device batch of n prefixes and their k continuation rows each: ``rows`` = (cont_tokens, targets,
        {mask name: per-target mask}); padded candidates get empty prefixes and one masked-out token; width C."""
        n_pad = self.n_pairs - len(pre)
        pre = pre + [[]] * n_pad
        rows = rows + [([0], [0], {m: [0] for m in rows[0][2]})] * (n_pad * k)
        P = pad_length(max(1, max(len(p) for p in pre)))
        C = C or pad_length(max(len(c) for c, _, _ in rows))
        pad = self.tokenizer.pad_id
        b = {"pre_tokens": np.full((len(pre), P), pad, np.int32), "pre_len": np.array([len(p) for p in pre], np.int32)}
        for i, p in enumerate(pre):
            b["pre_tokens"][i, P - len(p) :] = p
        b["cont_tokens"], b["targets"] = np.full((len(rows), C), pad, np.int32), np.full((len(rows), C), pad, np.int32)
        b["cont_len"] = np.array([len(c) for c, _, _ in rows], np.int32)
        for name in rows[0][2]:
            b[name] = np.zeros((len(rows), C), np.float32)
        for r, (cont, tgt, masks) in enumerate(rows):
            b["cont_tokens"][r, : len(cont)], b["targets"][r, : len(tgt)] = cont, tgt
            for name, m in masks.items():
                b[name][r, : len(m)] = m
        b.update(extra)
        return put_global(b, {k_: sharding.batch_sharding(self.mesh, v.ndim) for k_, v in b.items()})

    def scoring_batch(self, cands: list[Candidate], groups: list[list[dict]]):
        """Device batch of the canonical scoring rows (prefix shared by the G + 1 rows of a candidate) and the
        number of scored (real) tokens."""
        pre, rows, scored = [], [], 0
        for c, group in zip(cands, groups):
            sr = scoring_rows(c.prefix, [z["text"] for z in group], c.horizon, self.tokenizer, ends_document=c.ends_document)
            s = sr.shared
            pre.append(sr.cont[: s - 1])
            for row, lp_end in [*zip(sr.latent, sr.lp_end), (sr.cont, s)]:
                n = len(row) - s  # scored targets: row[s:]
                masks = {
                    "z_mask": span_mask(n, 0, lp_end - s),
                    "h_mask": span_mask(n, lp_end - s, n),
                }
                rows.append((row[s - 1 : -1], row[s:], masks))
                scored += n
        return self._place(pre, rows, self.G + 1, {}), scored

    def policy_batch(self, cands: list[Candidate], groups: list[list[dict]], rewards: np.ndarray):
        """The policy's rows: prefix = prompt + forced marker, continuation = the sampled ids (the loss mask on
        exactly those), and R + c per row; one width: max_latent_tokens (``propose``) rounded up to 8, not 32."""
        pre, rows = [], []
        for c, group in zip(cands, groups):
            head = c.prompt + c.forced
            pre.append(head[:-1])
            for z in group:
                smp = z["sampled"] or [self.tokenizer.pad_id]  # (an empty sample: one masked-out slot)
                rows.append(([head[-1]] + smp[:-1], smp, {"mask": [1 if z["sampled"] else 0] * len(smp)}))
        rew = np.zeros(self.n_pairs * self.G, np.float32)
        rew[: rewards.size] = rewards.reshape(-1)
        C = round_up(max(self.r.max_latent_tokens, *(len(c) for c, _, _ in rows)), 8)
        return self._place(pre, rows, self.G, {"rewards": rew}, C)

    def score(self, model_params, batch) -> dict:
        """Frozen-model scores of a ``scoring_batch``: lp_z, ll_z [n_pairs, G], ll_c [n_pairs]."""
        return self._score(model_params, batch)

    def terms(self, out: dict, groups: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
        """(gain = LL(z) - LL(C) + lambda_z LP(z), gain - beta log q), [n, G] float64. The selection score is
        S = gain - c and the reward R = gain - beta log q - c (c = inf: never selected; PG uses R + c)."""
        n = len(groups)
        lp, llz, llc = (np.asarray(out[k], np.float64)[:n] for k in ("lp_z", "ll_z", "ll_c"))
        gain = llz - llc[:, None] + self.r.lambda_z * lp
        logq = np.array([[z["logq"] for z in g] for g in groups], np.float64)
        return gain, gain - self.r.beta * logq

    def run_round(self, cands, latents_by_doc, key, *, policy_state=None, model_params=None):
        """Propose + score (+ update when policy_state is given) + select for one round of candidates.

        Mutates ``latents_by_doc`` with accepted latents. Returns (policy_state, stats)."""
        t0 = time.perf_counter()
        groups = self.propose(policy_state.params if policy_state is not None else model_params, cands, key)
        t1 = time.perf_counter()
        batch, scored = self.scoring_batch(cands, groups)
        out = fetch(self.score(model_params, batch))
        t2 = time.perf_counter()
        gain, r_plus_c = self.terms(out, groups)
        rnd = (self.r.random_accept_rate, self.seed) if self.r.selection == "random" else None
        stats = select(cands, groups, gain - self.c, r_plus_c - self.c, latents_by_doc, random_accept=rnd)
        n = len(cands)
        stats.update(
            lp_sum=float(np.sum(np.asarray(out["lp_z"])[:n])),
            gain_sum=float(np.sum(gain)),
            gain_count=int(n * self.G),
            generated_tokens=int(sum(len(z["sampled"]) for g in groups for z in g)),
            prompt_tokens=int(sum(len(c.prompt) + len(c.forced) for c in cands)),
            scored_tokens=scored,
        )
        if policy_state is not None:
            policy_state, m = self._update(policy_state, self.policy_batch(cands, groups, r_plus_c), model_params)
            m = fetch(m)
            stats.update(pg_loss=float(m["loss"]), kl=float(m["kl"]), pg_grad_norm=float(m["grad_norm"]))
        t3 = time.perf_counter()
        stats.update(seconds=t3 - t0, propose_seconds=t1 - t0, score_seconds=t2 - t1, update_seconds=t3 - t2)
        return policy_state, stats

    def sequence_logprobs(self, params, seqs: list[list[int]], rows: int = 8) -> list[np.ndarray]:
        """Teacher-forced per-token log-probs of whole sequences (lp[j] = log p(seq[j+1] | seq[<=j]))."""
        rows = -(-rows // self.dp) * self.dp
        out = []
        for i in range(0, len(seqs), rows):
            chunk = seqs[i : i + rows]
            b, _ = pad_rows(
                chunk + [[0, 0]] * (rows - len(chunk)), pad_length(max(len(s) for s in chunk) - 1), self.tokenizer.pad_id, {}
            )
            lp = fetch(self._seq_lp(params, b))
            out += [lp[j, : len(s) - 1] for j, s in enumerate(chunk)]
        return out


def select(
    cands: list[Candidate], groups: list[list[dict]], S: np.ndarray, R: np.ndarray, latents_by_doc: dict, random_accept=None
) -> dict:
    """Accept the best rationale of each candidate (by the selection score S) iff S > 0. ``random_accept`` =
    (rate, seed): the random-acceptance baseline instead: a uniformly chosen sample of the G, accepted with
    probability ``rate``, scores unseen (seeded per document and boundary)."""
    accepted, lat_chars = 0, 0
    for i, c in enumerate(cands):
        g = int(np.argmax(S[i]))
        take = S[i, g] > 0
        if random_accept is not None:
            rng = np.random.default_rng([random_accept[1], c.doc, c.step, len(c.prefix)])
            take, g = bool(rng.random() < random_accept[0]), int(rng.integers(len(groups[i])))
        if take:
            z = groups[i][g]
            latents_by_doc.setdefault(c.doc, {})[c.step] = {"text": z["text"], "score": float(S[i, g]), "reward": float(R[i, g])}
            accepted += 1
            lat_chars += len(z["text"])
    finite = np.isfinite(R)
    return {
        "candidates": len(cands),
        "accepted": accepted,
        "latent_chars": lat_chars,
        "reward_sum": float(np.sum(np.where(finite, R, 0.0))),
        "reward_count": int(finite.sum()),
    }


# ----------------------------------------------------------------------------------------- rounds and batches
def choose_candidates(doc: Document, k: int, rng: np.random.Generator, first: int = 0) -> list[int]:
    """``k`` boundaries of ``doc`` among ``first .. T - 1`` (``documents.first_boundary``), sorted."""
    n = max(doc.num_steps - first, 0)
    return sorted((first + rng.choice(n, size=min(k, n), replace=False)).tolist()) if n else []


def candidate_rounds(
    docs: list[Document], indices: list[int], K: int, seed_parts: tuple, first: int = 0
) -> list[list[tuple[int, int]]]:
    """Round j = the j-th (in document order) candidate boundary of every document that has one."""
    per_doc = {d: choose_candidates(docs[d], K, np.random.default_rng([*seed_parts, d]), first) for d in indices}
    rounds = []
    for j in range(K):
        rnd = [(d, ts[j]) for d, ts in per_doc.items() if j < len(ts)]
        if rnd:
            rounds.append(rnd)
    return rounds
