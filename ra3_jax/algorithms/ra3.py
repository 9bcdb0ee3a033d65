"""RA3 mid-training: EM over latent rationales (docs/RA3.md is the formulation; this file implements it).

One EM iteration k:
  E-step  the policy q_phi (initialized from the generative model theta) proposes G rationales at K candidate
          boundaries of each document (in-graph sampler, marker forced, stop at the end of the comment line).
          The frozen theta (= p_ref, the model at the start of the iteration) scores the horizon with and
          without each rationale in one batched teacher-forced pass. Reward
              R(z) = LL(z) - LL(CONTINUE) - c - beta * (log q(r) - log p_ref(r)),   c = log(alpha / (1 - alpha)),
          group-normalized advantages, a policy-gradient update on rationale tokens (one jitted step), and
          selection: the best rationale of a boundary is accepted iff its R > 0.
          Candidates of a document are visited in order (round j = the j-th candidate of every document of the
          batch), so each prompt holds the latents accepted before it.
  Bootstrap  documents with their accepted latents -> ArrayRecord shard with lineage (data/bootstrap.py).
  M-step  next-token training of theta on the bootstrap corpus (Grain), ``ra3.mstep_steps`` optimizer steps;
          the M-steps of all iterations form one continuous run (one optimizer state, one LR schedule).
  Eval    held-out ELBO per code token (latents chosen by the same propose-score-select procedure with
          theta as policy) and the exact NTP log-likelihood of the same documents without latents.

Documents are tokenized STEP BY STEP (each step a_t separately), so inserting a latent never changes the tokens
of the code; a document's token sequence is ``[start] + z_1? + a_1 + z_2? + a_2 + ... + [eos]``.

Layout of ``train.out_dir``: ``checkpoints/`` (theta's TrainState + M-step data-iterator state, step = global
M-step), ``iter_<k>/estep/`` (policy state + latents accepted so far, step = E-step batch),
``iter_<k>/bootstrap/`` (the corpus, atomic), ``ra3_metrics.jsonl`` (one row per iteration), ``metrics.jsonl``
and ``tb/`` (M-step curves). Every stage resumes mid-stage after a kill with the same final result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ra3_jax import distributed, sharding
from ra3_jax.config import RunConfig
from ra3_jax.data.bootstrap import BootstrapRecord, is_complete, make_bootstrap_dataset, write_bootstrap
from ra3_jax.data.boundaries import find_boundaries, indentation, split_steps
from ra3_jax.data.corpus import build_corpus
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.distributed import fetch, put_global
from ra3_jax.model.llama import LlamaConfig
from ra3_jax.model.params import param_shardings
from ra3_jax.model.store import load_model
from ra3_jax.objectives.elbo import log_prior, switch_cost
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.objectives.pg import group_advantages, kl_estimate, policy_gradient_loss
from ra3_jax.sampler import Sampler, SamplingParams, bucket
from ra3_jax.train.checkpoint import RunCheckpointer
from ra3_jax.train.loop import (
    FAULT_ENV,
    MetricsWriter,
    TrainingError,
    check_vocab,
    data_state_to_save,
    global_batch,
    is_main_process,
    make_run_mesh,
    process_split_kwargs,
    raise_if_nonfinite,
    resolve_tokenizer,
    restore_data_state,
    write_run_metadata,
)
from ra3_jax.train.state import TrainState, abstract_state, create_state, make_optimizer, state_shardings
from ra3_jax.train.step import jit_train_step

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ documents
@dataclasses.dataclass
class Document:
    doc_id: str
    steps: list[list[int]]  # tokens of each step a_t
    texts: list[str]
    indents: list[str]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def code_tokens(self) -> int:
        return sum(len(s) for s in self.steps)


def make_documents(text: str, source_id: str, tokenizer, r) -> list[Document]:
    """Cut a file at step boundaries into documents of at most ``r.max_doc_tokens`` code tokens."""
    steps = split_steps(text, find_boundaries(text, r.granularity, r.every_k, r.max_depth))
    toks = tokenizer.encode_batch(steps)
    docs, cur, n = [], [], 0

    def flush():
        if cur and any(t for _, t in cur) and any(s.strip() for s, _ in cur):
            docs.append(
                Document(f"{source_id}#{len(docs)}", [t for _, t in cur], [s for s, _ in cur], [indentation(s) for s, _ in cur])
            )

    for s, t in zip(steps, toks):
        if cur and n + len(t) > r.max_doc_tokens:
            flush()
            cur, n = [], 0
        cur.append((s, list(t)))
        n += len(t)
    flush()
    return docs


def take_documents(source, tokenizer, r, n: int, seed: int) -> list[Document]:
    """The first ``n`` documents (0 = all) of the files of ``source`` in a seeded shuffled order."""
    order = np.random.default_rng(seed).permutation(len(source))
    out: list[Document] = []
    for i in order:
        ex = source[int(i)]
        text = ex["text"].decode("utf-8") if isinstance(ex["text"], bytes) else ex["text"]
        path = ex["path"].decode("utf-8") if isinstance(ex["path"], bytes) else ex["path"]
        out.extend(make_documents(text, path, tokenizer, r))
        if n and len(out) >= n:
            return out[:n]
    return out


def start_id(tokenizer) -> int:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def doc_sequence(doc: Document, latents: dict, tokenizer, upto: int | None = None):
    """Token sequence of ``doc`` with ``latents`` ({step: {"tokens", "text"}}) inserted.

    Returns (tokens, latent_mask); ``upto`` = stop before step ``upto`` (a prompt prefix; no eos then).
    """
    toks, mask = [start_id(tokenizer)], [0]
    end = doc.num_steps if upto is None else upto
    for t in range(end):
        z = latents.get(t)
        if z is not None:
            toks += z["tokens"]
            mask += [1] * len(z["tokens"])
        toks += doc.steps[t]
        mask += [0] * len(doc.steps[t])
    if upto is None:
        toks.append(tokenizer.eos_id)
        mask.append(0)
    return toks, mask


def doc_text(doc: Document, latents: dict) -> str:
    return "".join((latents[t]["text"] if t in latents else "") + doc.texts[t] for t in range(doc.num_steps))


def render_latent(indent: str, marker: str, body: str) -> str:
    """A rationale as one Python comment line (the document stays valid Python)."""
    body = body.split("\n", 1)[0].replace("\r", "")
    return f"{indent}{marker}{body.rstrip()}\n"


# ------------------------------------------------------------------------------------------ device steps
def _rows(batch, key):
    return {
        "inputs": batch[f"{key}_inputs"],
        "targets": batch[f"{key}_targets"],
        "positions": batch[f"{key}_positions"],
        "segment_ids": batch[f"{key}_segment_ids"],
    }


def score_rows(model_params, batch, *, cfg: LlamaConfig, G: int):
    """Frozen-model scores. Latent rows [n*G, L] = ctx + z + horizon; continue rows [n, L] = ctx + horizon.

    -> ll_z [n, G] (log p of the horizon given ctx + z), ll_c [n], logp_ref [n, G] (log p_ref(z | ctx)),
       ref_tok [n*G, L] (per-token log p_ref, for the KL term).
    """
    lat = token_logprobs(model_params, _rows(batch, "lat"), cfg)
    con = token_logprobs(model_params, _rows(batch, "con"), cfg)
    n = batch["con_inputs"].shape[0]
    ll_z = (lat * batch["lat_hor_mask"]).sum(-1).reshape(n, G)
    ll_c = (con * batch["con_hor_mask"]).sum(-1)
    logp_ref = (lat * batch["lat_z_mask"]).sum(-1).reshape(n, G)
    return ll_z, ll_c, logp_ref, lat


def estep_update(
    policy_state: TrainState,
    model_params,
    batch,
    *,
    cfg: LlamaConfig,
    tx,
    G: int,
    Lp: int,
    beta: float,
    advantage: str,
    kl_coef: float,
    kl_estimator: str,
    aggregation: str,
):
    """Score with the frozen model, then one policy-gradient step of the policy on rationale tokens."""
    ll_z, ll_c, logp_ref, ref_tok = score_rows(model_params, batch, cfg=cfg, G=G)
    view = {k: v[:, :Lp] for k, v in _rows(batch, "lat").items()}  # ctx + z is a prefix of every latent row
    z_mask = batch["lat_z_mask"][:, :Lp]
    ref_tok = ref_tok[:, :Lp]
    n = ll_c.shape[0]

    def loss_fn(params):
        lp = token_logprobs(params, view, cfg)
        logq = jax.lax.stop_gradient((lp * z_mask).sum(-1).reshape(n, G))
        gain = (ll_z - ll_c[:, None]) - beta * (logq - logp_ref)  # R + c (c cancels in the advantages)
        adv = group_advantages(gain.reshape(-1), G, advantage)
        loss = policy_gradient_loss(lp, jax.lax.stop_gradient(lp), adv, z_mask, aggregation=aggregation)
        kl = (kl_estimate(lp, ref_tok, kl_estimator) * z_mask).sum() / jnp.maximum(z_mask.sum(), 1.0)
        if kl_coef:
            loss = loss + kl_coef * kl
        return loss, (logq, gain, kl)

    (loss, (logq, gain, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy_state.params)
    updates, opt_state = tx.update(grads, policy_state.opt_state, policy_state.params)
    params = optax.apply_updates(policy_state.params, updates)
    out = {
        "ll_z": ll_z,
        "ll_c": ll_c,
        "logp_ref": logp_ref,
        "logq": logq,
        "gain": gain,
        "loss": loss,
        "kl": kl,
        "grad_norm": optax.tree.norm(grads),
    }
    return TrainState(step=policy_state.step + 1, params=params, opt_state=opt_state), out


def estep_score(model_params, batch, *, cfg: LlamaConfig, G: int):
    """Scores without an update (evaluation): the policy is the model itself, so log q = log p_ref."""
    ll_z, ll_c, logp_ref, _ = score_rows(model_params, batch, cfg=cfg, G=G)
    return {"ll_z": ll_z, "ll_c": ll_c, "logp_ref": logp_ref, "logq": logp_ref, "gain": ll_z - ll_c[:, None]}


def sequence_logprobs(params, batch, *, cfg: LlamaConfig):
    return token_logprobs(params, batch, cfg) * (batch["segment_ids"] != 0)


# ----------------------------------------------------------------------------------------- host batching
@dataclasses.dataclass
class Candidate:
    doc: int  # index into the document list
    step: int  # boundary t (a latent goes before step t)
    ctx: list[int]
    forced: list[int]
    horizon: list[int]
    indent: str


class LatentProposer:
    """Propose (sample), score and select latents for batches of candidates; optionally update the policy."""

    def __init__(self, cfg: RunConfig, model_cfg: LlamaConfig, tokenizer, mesh):
        self.cfg, self.r, self.model_cfg, self.tokenizer, self.mesh = cfg, cfg.ra3, model_cfg, tokenizer, mesh
        self.G = self.r.group_size
        self.c = switch_cost(self.r.alpha)
        self.sampling = SamplingParams(temperature=self.r.temperature, top_k=self.r.top_k, top_p=self.r.top_p)
        self.dp = sharding.data_parallel_size(mesh)
        self.n_pairs = -(-self.r.estep_batch_docs // self.dp) * self.dp  # fixed shapes: pad pairs to this
        self.sampler = Sampler(None, model_cfg, tokenizer)
        self.tx = optax.chain(
            optax.clip_by_global_norm(cfg.optim.clip_norm or 1e9),
            optax.adamw(self.r.estep_lr, b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps, weight_decay=0.0),
        )
        self.st_shard = state_shardings(model_cfg, self.tx, mesh)
        p_shard = param_shardings(model_cfg, mesh)
        self._update = {}  # one jitted update per policy-view length Lp (a static slice)
        self._p_shard = p_shard
        self._score = jax.jit(functools.partial(estep_score, cfg=model_cfg, G=self.G), in_shardings=(p_shard, None))
        self._seq_lp = jax.jit(functools.partial(sequence_logprobs, cfg=model_cfg))

    # -- policy state
    def init_policy(self, params) -> TrainState:
        return create_state(params, self.tx, self.model_cfg, self.mesh)

    def abstract_policy(self):
        return abstract_state(self.model_cfg, self.tx, self.mesh)

    # -- candidates
    def candidate(self, docs: list[Document], d: int, t: int, latents: dict) -> Candidate:
        doc = docs[d]
        prefix, _ = doc_sequence(doc, latents, self.tokenizer, upto=t)
        ctx = prefix[-self.r.context_tokens :]
        hor = [tok for s in doc.steps[t : t + self.r.horizon_steps] for tok in s][: self.r.max_horizon_tokens]
        if t + self.r.horizon_steps >= doc.num_steps and len(hor) < self.r.max_horizon_tokens:
            hor = hor + [self.tokenizer.eos_id]  # the horizon reaches the end of the document
        forced = self.tokenizer.encode(doc.indents[t] + self.r.marker)
        return Candidate(d, t, ctx, forced, hor, doc.indents[t])

    def propose(self, policy_params, cands: list[Candidate], key) -> list[list[dict]]:
        """G rationales per candidate: [{"tokens", "text", "generated"}]."""
        pad_c = cands + [cands[0]] * (self.n_pairs - len(cands))
        self.sampler.params = policy_params
        F = max(len(c.forced) for c in pad_c)
        out = self.sampler.generate_tokens(
            [c.ctx for c in pad_c],
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
                row = i * self.G + g
                gen = [int(x) for x in out.tokens[row, len(c.forced) : int(out.lengths[row])]]
                body = self.tokenizer.decode(gen)
                text = render_latent(c.indent, self.r.marker, body)
                group.append({"tokens": self.tokenizer.encode(text), "text": text, "generated": len(gen)})
            res.append(group)
        return res

    def batch_arrays(self, cands: list[Candidate], groups: list[list[dict]]):
        """Padded device batch for scoring, the static policy-view length Lp, and the number of scored (real)
        tokens."""
        lat_seqs, lat_z, lat_h, con_seqs, con_h = [], [], [], [], []
        for c, group in zip(cands, groups):
            for z in group:
                seq = c.ctx + z["tokens"] + c.horizon
                lat_seqs.append(seq)
                lat_z.append([0] * len(c.ctx) + [1] * len(z["tokens"]) + [0] * len(c.horizon))
                lat_h.append([0] * (len(c.ctx) + len(z["tokens"])) + [1] * len(c.horizon))
            con_seqs.append(c.ctx + c.horizon)
            con_h.append([0] * len(c.ctx) + [1] * len(c.horizon))
        n_pad = self.n_pairs - len(cands)
        lat_seqs += [[0, 0]] * (n_pad * self.G)
        lat_z += [[0, 0]] * (n_pad * self.G)
        lat_h += [[0, 0]] * (n_pad * self.G)
        con_seqs += [[0, 0]] * n_pad
        con_h += [[0, 0]] * n_pad
        L = bucket(max(len(s) for s in lat_seqs + con_seqs) - 1)
        Lp = min(L, bucket(max(len(c.ctx) + len(z["tokens"]) for c, g in zip(cands, groups) for z in g) - 1))
        lat, lm = pad_rows(lat_seqs, L, self.tokenizer.pad_id, {"z": lat_z, "hor": lat_h})
        con, cm = pad_rows(con_seqs, L, self.tokenizer.pad_id, {"hor": con_h})
        batch = {f"lat_{k}": v for k, v in lat.items()} | {f"con_{k}": v for k, v in con.items()}
        batch |= {"lat_z_mask": lm["z"], "lat_hor_mask": lm["hor"], "con_hor_mask": cm["hor"]}
        scored = int(sum(int(batch[k].astype(bool).sum()) for k in ("lat_segment_ids", "con_segment_ids")))
        bs = sharding.batch_sharding(self.mesh, 2)
        return put_global(batch, {k: bs for k in batch}), Lp, scored

    def update_fn(self, Lp: int):
        if Lp not in self._update:
            r = self.r
            fn = functools.partial(
                estep_update,
                cfg=self.model_cfg,
                tx=self.tx,
                G=self.G,
                Lp=Lp,
                beta=r.beta,
                advantage=r.advantage,
                kl_coef=r.kl_coef,
                kl_estimator=r.kl_estimator,
                aggregation=r.loss_aggregation,
            )
            self._update[Lp] = jax.jit(
                fn, in_shardings=(self.st_shard, self._p_shard, None), out_shardings=(self.st_shard, None), donate_argnums=(0,)
            )
        return self._update[Lp]

    def score_fn(self):
        return self._score

    def rewards(self, out: dict, n: int) -> np.ndarray:
        """R = LL(z) - LL(C) - c - beta (log q - log p_ref), [n, G] (host, float64; -inf when c = inf)."""
        return np.asarray(out["gain"], np.float64)[:n] - self.c

    def run_round(self, cands, latents_by_doc, key, *, policy_state=None, model_params=None):
        """Propose + score (+ update when policy_state is given) + select for one round of candidates.

        Mutates ``latents_by_doc`` with accepted latents. Returns (policy_state, stats).
        """
        t0 = time.perf_counter()
        policy_params = policy_state.params if policy_state is not None else model_params
        groups = self.propose(policy_params, cands, key)
        batch, Lp, scored = self.batch_arrays(cands, groups)
        if policy_state is not None:
            policy_state, out = self.update_fn(Lp)(policy_state, model_params, batch)
        else:
            out = self.score_fn()(model_params, batch)
        out = fetch(out)
        n = len(cands)
        R = self.rewards(out, n)
        accepted, lat_len = 0, 0
        for i, c in enumerate(cands):
            g = int(np.argmax(R[i]))
            if R[i, g] > 0:
                latents_by_doc.setdefault(c.doc, {})[c.step] = {
                    "tokens": groups[i][g]["tokens"],
                    "text": groups[i][g]["text"],
                    "reward": float(R[i, g]),
                }
                accepted += 1
                lat_len += len(groups[i][g]["tokens"])
        generated = sum(z["generated"] for g in groups for z in g)
        finite = np.isfinite(R)
        stats = {
            "candidates": n,
            "accepted": accepted,
            "latent_tokens": lat_len,
            "reward_sum": float(np.sum(np.where(finite, R, 0.0))),
            "reward_count": int(finite.sum()),
            "gain_sum": float(np.sum(np.asarray(out["gain"])[:n])),
            "gain_count": int(n * self.G),
            "generated_tokens": int(generated),
            "scored_tokens": scored,
            "seconds": time.perf_counter() - t0,
        }
        if policy_state is not None:
            stats.update(pg_loss=float(out["loss"]), kl=float(out["kl"]), pg_grad_norm=float(out["grad_norm"]))
        return policy_state, stats

    def sequence_logprobs(self, params, seqs: list[list[int]], rows: int = 8) -> list[np.ndarray]:
        """Teacher-forced per-token log-probs of whole sequences (lp[j] = log p(seq[j+1] | seq[<=j]))."""
        rows = -(-rows // self.dp) * self.dp
        out = []
        for i in range(0, len(seqs), rows):
            chunk = seqs[i : i + rows]
            L = bucket(max(len(s) for s in chunk) - 1)
            b, _ = pad_rows(chunk + [[0, 0]] * (rows - len(chunk)), L, self.tokenizer.pad_id, {})
            lp = fetch(self._seq_lp(params, b))
            out += [lp[j, : len(s) - 1] for j, s in enumerate(chunk)]
        return out


def choose_candidates(doc: Document, k: int, rng: np.random.Generator) -> list[int]:
    T = doc.num_steps
    return sorted(rng.choice(T, size=min(k, T), replace=False).tolist())


def candidate_rounds(docs: list[Document], indices: list[int], K: int, seed_parts: tuple) -> list[list[tuple[int, int]]]:
    """Round j = the j-th (in document order) candidate boundary of every document that has one."""
    per_doc = {d: choose_candidates(docs[d], K, np.random.default_rng([*seed_parts, d])) for d in indices}
    rounds = []
    for j in range(K):
        rnd = [(d, ts[j]) for d, ts in per_doc.items() if j < len(ts)]
        if rnd:
            rounds.append(rnd)
    return rounds


# ------------------------------------------------------------------------------------------------ ELBO eval
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


def evaluate_elbo(proposer: LatentProposer, params, docs: list[Document], *, seed: int) -> dict:
    """Held-out ELBO per code token with latents from propose-score-select (theta as policy), and the exact
    NTP log-likelihood of the same documents without latents (both nats per code token; code = steps + eos)."""
    r = proposer.r
    latents: dict = {}
    B = r.estep_batch_docs
    key = jax.random.key(seed)
    for b0 in range(0, len(docs), B):
        idx = list(range(b0, min(b0 + B, len(docs))))
        if r.alpha < 1.0:
            for j, rnd in enumerate(candidate_rounds(docs, idx, r.eval_candidates_per_doc, (seed, 7))):
                cands = [proposer.candidate(docs, d, t, latents.get(d, {})) for d, t in rnd]
                proposer.run_round(cands, latents, jax.random.fold_in(key, b0 * 1000 + j), model_params=params)
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
        lat = latents.get(d, {})
        code_ll, is_lat, ref = path_terms(lp_y[d], doc, lat)
        elbo += code_ll + float(np.sum(log_prior(is_lat, ref, r.alpha)))
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


# -------------------------------------------------------------------------------------------- orchestration
def _fault(stage: str, k: int, step: int) -> None:
    """Test hook: RA3_FAULT_KILL_AFTER_STEP=estep:<k>:<batch> or mstep:<k>:<step> SIGKILLs this process."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{stage}:{k}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _jsonable_latents(latents: dict) -> dict:
    return {str(d): {str(t): z for t, z in lat.items()} for d, lat in latents.items()}


def _load_latents(raw: dict) -> dict:
    return {
        int(d): {
            int(t): {"tokens": [int(x) for x in z["tokens"]], "text": z["text"], "reward": float(z["reward"])}
            for t, z in lat.items()
        }
        for d, lat in raw.items()
    }


def _sum_stats(acc: dict, s: dict) -> dict:
    for k, v in s.items():
        acc[k] = acc.get(k, 0) + v
    return acc


def run_estep(proposer: LatentProposer, model_params, docs: list[Document], k: int, it_dir: str, cfg: RunConfig, progress=None):
    """E-step of iteration k over ``docs``; resumable per batch. Returns (latents, stats, final policy params)."""
    r = cfg.ra3
    ckpt = RunCheckpointer(os.path.join(it_dir, "estep"), keep=2, async_save=cfg.train.async_checkpoints)
    B = r.estep_batch_docs
    n_batches = -(-len(docs) // B)
    start = ckpt.latest_step()
    if start is not None:
        policy_state, data, _ = ckpt.restore(start, proposer.abstract_policy())
        latents, stats = _load_latents(data["latents"]), dict(data["stats"])
        log.info("E-step %d resumed after batch %d/%d", k, start, n_batches)
    else:
        start, latents, stats = 0, {}, {}
        policy_state = proposer.init_policy(model_params)
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1000 + k)
    try:
        for b in range(start, n_batches):
            idx = list(range(b * B, min((b + 1) * B, len(docs))))
            for j, rnd in enumerate(candidate_rounds(docs, idx, r.candidates_per_doc, (cfg.train.seed, k))):
                cands = [proposer.candidate(docs, d, t, latents.get(d, {})) for d, t in rnd]
                policy_state, s = proposer.run_round(
                    cands, latents, jax.random.fold_in(key, b * 1000 + j), policy_state=policy_state, model_params=model_params
                )
                if not math.isfinite(s.get("pg_loss", 0.0)):
                    raise TrainingError(f"non-finite E-step policy loss in iteration {k}, batch {b}; lower ra3.estep_lr")
                _sum_stats(stats, s)
                stats.setdefault("batch_gain_means", []).append(s["gain_sum"] / max(s["gain_count"], 1))
            ckpt.save(
                b + 1, policy_state, {"latents": _jsonable_latents(latents), "stats": stats}, {"iteration": k, "batch": b + 1}
            )
            if progress is not None:
                progress.update(1)
                progress.set_postfix(acc=f"{stats.get('accepted', 0)}/{stats.get('candidates', 0)}")
            _fault("estep", k, b + 1)
    finally:
        ckpt.close()
    return latents, stats, policy_state.params


def _records(docs, latents, tokenizer, k: int, source_step: int) -> list[BootstrapRecord]:
    recs = []
    for d, doc in enumerate(docs):
        lat = latents.get(d, {})
        toks, mask = doc_sequence(doc, lat, tokenizer)
        recs.append(
            BootstrapRecord(
                np.asarray(toks, np.int32), np.asarray(mask, np.int8), doc_text(doc, lat), doc.doc_id, k, source_step, len(lat)
            )
        )
    return recs


def midtrain_ra3(cfg: RunConfig) -> dict:
    """RA3 EM mid-training (or, with ``ra3.baseline``, its compute-matched NTP baseline). Resumable."""
    r = cfg.ra3
    if cfg.model.init == "random":
        log.warning("midtrain-ra3 from a random model: rationales will be noise (fine for smoke tests)")
    out_dir = os.path.abspath(os.path.expanduser(cfg.train.out_dir))
    os.makedirs(out_dir, exist_ok=True)
    mesh = make_run_mesh(cfg)
    dp = sharding.data_parallel_size(mesh)
    if cfg.data.batch_size % dp:
        raise TrainingError(f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel size {dp}")
    tokenizer = resolve_tokenizer(cfg)
    sources = build_corpus(cfg.data)
    if sources["validation"] is None:
        raise TrainingError(
            "RA3 evaluates the ELBO on held-out documents: the corpus has no validation split; raise data.validation_fraction"
        )
    model_cfg, params = load_model(cfg.model, mesh, key=jax.random.key(cfg.train.seed))
    check_vocab(tokenizer, model_cfg)
    n_docs = r.docs_per_iteration * r.iterations if r.docs_per_iteration else 0
    all_docs = take_documents(sources["train"], tokenizer, r, n_docs, cfg.data.shuffle_seed)
    if not all_docs:
        raise TrainingError("the train split produced no documents with code")
    eval_docs = take_documents(sources["validation"], tokenizer, r, r.eval_docs, cfg.data.shuffle_seed + 1)
    if not eval_docs:
        raise TrainingError("the validation split produced no documents with code")

    total_steps = r.iterations * r.mstep_steps
    tx = make_optimizer(cfg.optim, total_steps)
    st_shard = state_shardings(model_cfg, tx, mesh)
    step_fn = jit_train_step(model_cfg, tx, cfg.optim.grad_accum, mesh, st_shard)
    proposer = LatentProposer(cfg, model_cfg, tokenizer, mesh)
    ckpt = RunCheckpointer(
        os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints
    )
    g = ckpt.latest_step() or 0
    data_state = None
    if g:
        state, data_state, _ = ckpt.restore(g, abstract_state(model_cfg, tx, mesh))
    else:
        state = create_state(params, tx, model_cfg, mesh)
    del params
    write_run_metadata(out_dir, cfg, model_cfg, tokenizer)
    writer = MetricsWriter(out_dir, g, cfg.train.wandb_project)
    em_log = os.path.join(out_dir, "ra3_metrics.jsonl")
    k0 = g // r.mstep_steps
    _truncate_jsonl(em_log, k0)
    summary: dict = {}
    if k0 == 0 and g == 0 and not _has_row(em_log, -1):
        ev = evaluate_elbo(proposer, state.params, eval_docs, seed=cfg.train.seed + 99)
        _append_jsonl(em_log, {"iteration": -1, **ev})
        summary.update({f"{k}@start": v for k, v in ev.items()})
    elif os.path.exists(em_log):
        rows = _read_jsonl(em_log)
        summary.update(
            {f"{k}@start": v for k, v in rows[0].items() if k != "iteration"} if rows and rows[0]["iteration"] == -1 else {}
        )
    try:
        for k in range(k0, r.iterations):
            it_dir = os.path.join(out_dir, f"iter_{k}")
            bdir = os.path.join(it_dir, "bootstrap")
            docs = _iteration_docs(all_docs, r, k)
            stats: dict = {}
            t_e = time.perf_counter()
            if not is_complete(bdir):
                if r.baseline:
                    latents, policy_params = {}, None
                else:
                    prog = _progress(cfg, -(-len(docs) // r.estep_batch_docs), f"E-step {k}")
                    try:
                        latents, stats, policy_params = run_estep(proposer, state.params, docs, k, it_dir, cfg, prog)
                    finally:
                        if prog is not None:
                            prog.close()
                    if r.mstep_init == "policy":
                        state = TrainState(step=state.step, params=policy_params, opt_state=state.opt_state)
                if is_main_process():
                    write_bootstrap(bdir, _records(docs, latents, tokenizer, k, g), {"iteration": k, "baseline": r.baseline})
                distributed.sync(f"ra3-bootstrap-{k}")  # the other processes read the corpus process 0 wrote
                stats["estep_seconds"] = time.perf_counter() - t_e
            else:
                stats = _read_estep_stats(it_dir)
                if r.mstep_init == "policy" and not r.baseline and g == k * r.mstep_steps:
                    state = TrainState(step=state.step, params=_final_policy_params(proposer, it_dir), opt_state=state.opt_state)
            # ---- M-step
            t_m = time.perf_counter()
            B = cfg.data.batch_size
            ds = make_bootstrap_dataset(
                bdir,
                seq_len=cfg.data.seq_len,
                seed=cfg.data.shuffle_seed + k,
                mask_latents=r.mask_latents,
                **process_split_kwargs(cfg, mesh),
            )
            it = iter(ds)
            if data_state is not None and g > k * r.mstep_steps:
                restore_data_state(it, data_state, cfg, g)
            data_state = None
            prog = _progress(cfg, r.mstep_steps, f"M-step {k}", initial=g - k * r.mstep_steps)
            m_tokens, last = 0.0, {}
            try:
                for step in range(g + 1, (k + 1) * r.mstep_steps + 1):
                    state, m = step_fn(state, global_batch(next(it), mesh, B))
                    end = step == (k + 1) * r.mstep_steps
                    if step % cfg.train.log_every == 0 or step % cfg.train.ckpt_every == 0 or end:
                        m = {kk: float(v) for kk, v in jax.device_get(m).items()}
                        raise_if_nonfinite(m, step, ckpt.latest_step(), out_dir, f" (M-step of iteration {k})")
                        m_tokens += m["tokens"]
                        writer.write(step, {**m, "iteration": k})
                        last = m
                        if prog is not None:
                            prog.set_postfix(loss=f"{m['loss']:.4f}")
                    if step % cfg.train.ckpt_every == 0 or end:
                        ckpt.save(
                            step,
                            state,
                            data_state_to_save(it, cfg),
                            {"step": step, "iteration": k, "mode": "ra3-baseline" if r.baseline else "ra3"},
                        )
                    if prog is not None:
                        prog.update(1)
                    g = step
                    _fault("mstep", k, step - k * r.mstep_steps)
            finally:
                if prog is not None:
                    prog.close()
            ckpt.wait()
            m_seconds = time.perf_counter() - t_m
            ev = evaluate_elbo(proposer, state.params, eval_docs, seed=cfg.train.seed + 99)
            row = {
                "iteration": k,
                **_iteration_metrics(stats, docs),
                "mstep/loss": last.get("loss", float("nan")),
                "mstep/tokens_per_s": (r.mstep_steps * cfg.data.batch_size * cfg.data.seq_len) / max(m_seconds, 1e-9),
                **ev,
            }
            _append_jsonl(em_log, row)
            writer.write(g, {f"ra3/{kk}": v for kk, v in row.items() if isinstance(v, (int, float)) and kk != "iteration"})
            summary.update(row)
    finally:
        ckpt.close()
        writer.close()
    summary["step"] = int(jax.device_get(state.step))
    return summary


def _iteration_docs(all_docs: list[Document], r, k: int) -> list[Document]:
    if not r.docs_per_iteration:
        return all_docs
    n = len(all_docs)
    start = (k * r.docs_per_iteration) % n
    return [all_docs[(start + i) % n] for i in range(min(r.docs_per_iteration, n))]


def _iteration_metrics(stats: dict, docs: list[Document]) -> dict:
    bounds = sum(d.num_steps for d in docs)
    acc = stats.get("accepted", 0)
    sec = stats.get("estep_seconds", 0.0)
    gm = stats.get("batch_gain_means", [])
    return {
        "estep/latent_rate": acc / max(bounds, 1),
        "estep/accepted_fraction": acc / max(stats.get("candidates", 0), 1),
        "estep/mean_latent_tokens": stats.get("latent_tokens", 0) / max(acc, 1),
        "estep/mean_reward": stats.get("reward_sum", 0.0) / max(stats.get("reward_count", 0), 1)
        if stats.get("reward_count")
        else float("nan"),
        "estep/mean_gain": stats.get("gain_sum", 0.0) / max(stats.get("gain_count", 0), 1),
        "estep/first_batch_gain": gm[0] if gm else float("nan"),
        "estep/last_batch_gain": gm[-1] if gm else float("nan"),
        "estep/tokens_per_s": (stats.get("generated_tokens", 0) + stats.get("scored_tokens", 0)) / max(sec, 1e-9) if sec else 0.0,
        "estep/seconds": sec,
    }


def _final_policy_params(proposer: LatentProposer, it_dir: str):
    ck = RunCheckpointer(os.path.join(it_dir, "estep"), async_save=False)
    try:
        st, _, _ = ck.restore(ck.latest_step(), proposer.abstract_policy())
        return st.params
    finally:
        ck.close()


def _read_estep_stats(it_dir: str) -> dict:
    d = os.path.join(it_dir, "estep")
    if not os.path.isdir(d):
        return {}
    ck = RunCheckpointer(d, async_save=False)
    try:
        s = ck.latest_step()
        if s is None:
            return {}
        return dict(ck.restore_data(s)["stats"])
    finally:
        ck.close()


def _progress(cfg, total: int, desc: str, initial: int = 0):
    if not (cfg.train.progress and is_main_process()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch" if desc.startswith("E") else "step", dynamic_ncols=True)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _has_row(path: str, iteration: int) -> bool:
    return any(r["iteration"] == iteration for r in _read_jsonl(path))


def _truncate_jsonl(path: str, first_incomplete: int) -> None:
    if is_main_process() and os.path.exists(path):
        keep = [r for r in _read_jsonl(path) if r["iteration"] < first_incomplete]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)


def _append_jsonl(path: str, row: dict) -> None:
    if is_main_process():
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
