"""The RA3 E-step: latent discovery by policy gradient over candidate rounds.

One round takes one candidate boundary of each document of an E-step batch (documents visited in order, so each
proposal's prefix holds the latents accepted before it): G rationales per candidate from the stateless sampler
(marker forced, stop at the end of the comment line), scored by the frozen model of the iteration in one batched
teacher-forced pass, one policy-gradient step of the policy (``estep_objective`` in the update core), then
selection: the best rationale of a boundary is accepted iff R = LL(z) - LL(C) - c - beta (log q - log p_ref) > 0.
``run_estep`` runs the batches through the one host loop (one loop step per batch, checkpointed after each:
policy state + the latents accepted so far).

Batch layout (``LatentProposer.batch_arrays``): latent rows ``lat_*`` [n*G, L] hold ctx + z + horizon
(group-major: row i*G + g is rationale g of candidate i); continue rows ``con_*`` [n, L] hold ctx + horizon;
masks ``lat_z_mask`` (rationale tokens), ``lat_hor_mask`` / ``con_hor_mask`` (horizon tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ra3_jax import sharding
from ra3_jax.config import RunConfig
from ra3_jax.data.documents import Document, doc_sequence, render_latent
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.distributed import fetch, put_global
from ra3_jax.model.llama import LlamaConfig
from ra3_jax.model.params import param_shardings
from ra3_jax.objectives.elbo import switch_cost
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.objectives.pg import group_advantages, kl_estimate, policy_gradient_loss
from ra3_jax.sampler import Sampler, bucket, sampling_method
from ra3_jax.train.checkpoint import RunCheckpointer
from ra3_jax.train.loop import Loop, run_loop
from ra3_jax.train.state import TrainState, abstract_state, create_state, make_optimizer, state_shardings
from ra3_jax.train.step import Objective, jit_update_step

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- device steps
def rows_of(batch, key):
    return {k: batch[f"{key}_{k}"] for k in ("inputs", "targets", "positions", "segment_ids")}


def score_rows(model_params, batch, *, cfg: LlamaConfig, G: int):
    """Frozen-model scores -> ll_z [n, G] (log p of the horizon given ctx + z), ll_c [n], logp_ref [n, G]
    (log p_ref(z | ctx)), ref_tok [n*G, L] (per-token log p_ref, for the KL term)."""
    lat = token_logprobs(model_params, rows_of(batch, "lat"), cfg)
    con = token_logprobs(model_params, rows_of(batch, "con"), cfg)
    n = batch["con_inputs"].shape[0]
    ll_z = (lat * batch["lat_hor_mask"]).sum(-1).reshape(n, G)
    ll_c = (con * batch["con_hor_mask"]).sum(-1)
    logp_ref = (lat * batch["lat_z_mask"]).sum(-1).reshape(n, G)
    return ll_z, ll_c, logp_ref, lat


def estep_objective(
    cfg: LlamaConfig, *, G: int, Lp: int, beta: float, advantage: str, kl_coef: float, kl_estimator: str, aggregation: str
) -> Objective:
    """Score with the frozen model (``prepare``, extra argument: its params), then the policy-gradient loss of
    the policy on the rationale tokens of the policy view (ctx + z, the first ``Lp`` slots of every latent row).
    Reward + c = LL(z) - LL(C) - beta (log q - log p_ref) (the constant c cancels in the group advantages)."""

    def prepare(batch, model_params):
        ll_z, ll_c, logp_ref, ref_tok = score_rows(model_params, batch, cfg=cfg, G=G)
        view = {k: v[:, :Lp] for k, v in rows_of(batch, "lat").items()}
        rows = {**view, "z_mask": batch["lat_z_mask"][:, :Lp], "ref_tok": ref_tok[:, :Lp]}
        rows |= {"ll_z": ll_z, "ll_c": ll_c, "logp_ref": logp_ref}
        return rows, None, {"ll_z": ll_z, "ll_c": ll_c, "logp_ref": logp_ref}

    def loss(params, rows, norm, model_params):
        z_mask, n = rows["z_mask"], rows["ll_c"].shape[0]
        lp = token_logprobs(params, rows, cfg)
        logq = jax.lax.stop_gradient((lp * z_mask).sum(-1).reshape(n, G))
        gain = (rows["ll_z"] - rows["ll_c"][:, None]) - beta * (logq - rows["logp_ref"])
        adv = group_advantages(gain.reshape(-1), G, advantage)
        pg = policy_gradient_loss(lp, jax.lax.stop_gradient(lp), adv, z_mask, aggregation=aggregation)
        kl = (kl_estimate(lp, rows["ref_tok"], kl_estimator) * z_mask).sum() / jnp.maximum(z_mask.sum(), 1.0)
        return (pg + kl_coef * kl if kl_coef else pg), {"logq": logq, "gain": gain, "kl": kl}

    return Objective(loss=loss, prepare=prepare, finish=lambda aux, norm, prep: {**prep, **aux})


def estep_score(model_params, batch, *, cfg: LlamaConfig, G: int):
    """Scores without an update (evaluation): the policy is the model itself, so log q = log p_ref."""
    ll_z, ll_c, logp_ref, _ = score_rows(model_params, batch, cfg=cfg, G=G)
    return {"ll_z": ll_z, "ll_c": ll_c, "logp_ref": logp_ref, "logq": logp_ref, "gain": ll_z - ll_c[:, None]}


def sequence_logprobs(params, batch, *, cfg: LlamaConfig):
    return token_logprobs(params, batch, cfg) * (batch["segment_ids"] != 0)


# ------------------------------------------------------------------------------------ propose, score, select
@dataclasses.dataclass
class Candidate:
    doc: int  # index into the document list
    step: int  # boundary t (a latent goes before step t)
    ctx: list[int]
    forced: list[int]
    horizon: list[int]
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
        self.sampling = sampling_method(self.pol.temperature, self.pol.top_k, self.pol.top_p)
        self.dp = sharding.data_parallel_size(mesh)
        self.n_pairs = -(-self.r.estep_batch_docs // self.dp) * self.dp  # fixed shapes: pad pairs to this
        self.sampler = Sampler(model_cfg, tokenizer)
        self.tx = estep_optimizer(cfg)
        self.st_shard = state_shardings(model_cfg, self.tx, mesh)
        self._p_shard = param_shardings(model_cfg, mesh)
        self._update = {}  # one jitted update per policy-view length Lp (a static slice)
        self._score = jax.jit(functools.partial(estep_score, cfg=model_cfg, G=self.G), in_shardings=(self._p_shard, None))
        self._seq_lp = jax.jit(functools.partial(sequence_logprobs, cfg=model_cfg))

    # -- policy state
    def init_policy(self, params) -> TrainState:
        return create_state(params, self.tx, self.model_cfg, self.mesh)

    def abstract_policy(self):
        return abstract_state(self.model_cfg, self.tx, self.mesh)

    # -- candidates
    def candidate(self, docs: list[Document], d: int, t: int, latents: dict) -> Candidate:
        doc, r = docs[d], self.r
        prefix, _ = doc_sequence(doc, latents, self.tokenizer, upto=t)
        ctx = prefix[-r.context_tokens :]
        hor = [tok for s in doc.steps[t : t + r.horizon_steps] for tok in s][: r.max_horizon_tokens]
        if t + r.horizon_steps >= doc.num_steps and len(hor) < r.max_horizon_tokens:
            hor = hor + [self.tokenizer.eos_id]  # the horizon reaches the end of the document
        forced = self.tokenizer.encode(doc.indents[t] + r.marker)
        return Candidate(d, t, ctx, forced, hor, doc.indents[t])

    def propose(self, policy_params, cands: list[Candidate], key) -> list[list[dict]]:
        """G rationales per candidate: [{"tokens", "text", "generated"}]."""
        pad_c = cands + [cands[0]] * (self.n_pairs - len(cands))
        F = max(len(c.forced) for c in pad_c)
        out = self.sampler.generate_tokens(
            policy_params,
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
                text = render_latent(c.indent, self.r.marker, self.tokenizer.decode(gen))
                group.append({"tokens": self.tokenizer.encode(text), "text": text, "generated": len(gen)})
            res.append(group)
        return res

    def batch_arrays(self, cands: list[Candidate], groups: list[list[dict]]):
        """Padded device batch for scoring, the static policy-view length Lp, and the number of scored (real)
        tokens."""
        lat_seqs, lat_z, lat_h, con_seqs, con_h = [], [], [], [], []
        for c, group in zip(cands, groups):
            for z in group:
                lat_seqs.append(c.ctx + z["tokens"] + c.horizon)
                lat_z.append([0] * len(c.ctx) + [1] * len(z["tokens"]) + [0] * len(c.horizon))
                lat_h.append([0] * (len(c.ctx) + len(z["tokens"])) + [1] * len(c.horizon))
            con_seqs.append(c.ctx + c.horizon)
            con_h.append([0] * len(c.ctx) + [1] * len(c.horizon))
        n_pad = self.n_pairs - len(cands)
        for rows, n in (
            (lat_seqs, n_pad * self.G),
            (lat_z, n_pad * self.G),
            (lat_h, n_pad * self.G),
            (con_seqs, n_pad),
            (con_h, n_pad),
        ):
            rows += [[0, 0]] * n
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
            p = self.pol
            obj = estep_objective(
                self.model_cfg,
                G=self.G,
                Lp=Lp,
                beta=self.r.beta,
                advantage=p.advantage,
                kl_coef=p.kl_coef,
                kl_estimator=p.kl_estimator,
                aggregation=p.loss_aggregation,
            )
            self._update[Lp] = jit_update_step(obj, self.tx, 1, self.st_shard, None, (self._p_shard,), mesh=self.mesh)
        return self._update[Lp]

    def score(self, model_params, batch) -> dict:
        """Frozen-model scores of a batch from ``batch_arrays`` (no policy update): ll_z, ll_c, logp_ref, gain."""
        return self._score(model_params, batch)

    def rewards(self, out: dict, n: int) -> np.ndarray:
        """R = LL(z) - LL(C) - c - beta (log q - log p_ref), [n, G] (host, float64; -inf when c = inf)."""
        return np.asarray(out["gain"], np.float64)[:n] - self.c

    def run_round(self, cands, latents_by_doc, key, *, policy_state=None, model_params=None):
        """Propose + score (+ update when policy_state is given) + select for one round of candidates.

        Mutates ``latents_by_doc`` with accepted latents. Returns (policy_state, stats)."""
        t0 = time.perf_counter()
        groups = self.propose(policy_state.params if policy_state is not None else model_params, cands, key)
        batch, Lp, scored = self.batch_arrays(cands, groups)
        if policy_state is not None:
            policy_state, out = self.update_fn(Lp)(policy_state, batch, model_params)
        else:
            out = self.score(model_params, batch)
        out = fetch(out)
        R = self.rewards(out, len(cands))
        stats = select(cands, groups, R, latents_by_doc)
        finite = np.isfinite(R)
        stats.update(
            reward_sum=float(np.sum(np.where(finite, R, 0.0))),
            reward_count=int(finite.sum()),
            gain_sum=float(np.sum(np.asarray(out["gain"])[: len(cands)])),
            gain_count=int(len(cands) * self.G),
            generated_tokens=int(sum(z["generated"] for g in groups for z in g)),
            scored_tokens=scored,
            seconds=time.perf_counter() - t0,
        )
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


def select(cands: list[Candidate], groups: list[list[dict]], R: np.ndarray, latents_by_doc: dict) -> dict:
    """Accept the best rationale of each candidate iff its reward is > 0 (into ``latents_by_doc``)."""
    accepted, lat_len = 0, 0
    for i, c in enumerate(cands):
        g = int(np.argmax(R[i]))
        if R[i, g] > 0:
            z = groups[i][g]
            latents_by_doc.setdefault(c.doc, {})[c.step] = {"tokens": z["tokens"], "text": z["text"], "reward": float(R[i, g])}
            accepted += 1
            lat_len += len(z["tokens"])
    return {"candidates": len(cands), "accepted": accepted, "latent_tokens": lat_len}


# ----------------------------------------------------------------------------------------- rounds and batches
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


def jsonable_latents(latents: dict) -> dict:
    return {str(d): {str(t): z for t, z in lat.items()} for d, lat in latents.items()}


def load_latents(raw: dict) -> dict:
    def one(z):
        return {"tokens": [int(x) for x in z["tokens"]], "text": z["text"], "reward": float(z["reward"])}

    return {int(d): {int(t): one(z) for t, z in lat.items()} for d, lat in raw.items()}


def sum_stats(acc: dict, s: dict) -> dict:
    for k, v in s.items():
        acc[k] = acc.get(k, 0) + v
    return acc


@dataclasses.dataclass
class EStepState:
    policy: TrainState
    latents: dict  # {doc index: {boundary: latent}}
    stats: dict  # summed round statistics (+ per-batch mean gains)


def run_estep(proposer: LatentProposer, model_params, docs: list[Document], k: int, it_dir: str, cfg: RunConfig):
    """E-step of iteration k over ``docs``; resumable per batch. Returns (latents, stats, final policy params)."""
    r = cfg.ra3
    ckpt = RunCheckpointer(os.path.join(it_dir, "estep"), keep=2, async_save=cfg.train.async_checkpoints)
    B = r.estep_batch_docs
    n_batches = -(-len(docs) // B)
    start = ckpt.latest_step() or 0
    if start:
        policy, data, _ = ckpt.restore(start, proposer.abstract_policy())
        st = EStepState(policy, load_latents(data["latents"]), dict(data["stats"]))
        log.info("E-step %d resumed after batch %d/%d", k, start, n_batches)
    else:
        st = EStepState(proposer.init_policy(model_params), {}, {})
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1000 + k)

    def step(st: EStepState, b: int):  # loop step b = E-step batch b - 1
        idx = list(range((b - 1) * B, min(b * B, len(docs))))
        pg_loss = 0.0
        for j, rnd in enumerate(candidate_rounds(docs, idx, r.candidates_per_doc, (cfg.train.seed, k))):
            cands = [proposer.candidate(docs, d, t, st.latents.get(d, {})) for d, t in rnd]
            rkey = jax.random.fold_in(key, (b - 1) * 1000 + j)
            st.policy, s = proposer.run_round(cands, st.latents, rkey, policy_state=st.policy, model_params=model_params)
            pg_loss += s.get("pg_loss", 0.0)
            sum_stats(st.stats, s)
            st.stats.setdefault("batch_gain_means", []).append(s["gain_sum"] / max(s["gain_count"], 1))
        return st, {"pg_loss": pg_loss}

    def save(st: EStepState, b: int):
        ckpt.save(b, st.policy, {"latents": jsonable_latents(st.latents), "stats": st.stats}, {"iteration": k, "batch": b})

    loop = Loop(
        f"estep-{k}",
        start,
        n_batches,
        it_dir,
        ckpt_every=1,
        progress=cfg.train.progress,
        unit="batch",
        save=save,
        finite_keys=("pg_loss",),
        nan_hint="Lower ra3.estep_lr.",
        postfix=lambda m: {"acc": f"{st.stats.get('accepted', 0)}/{st.stats.get('candidates', 0)}"},
    )
    try:
        st, _ = run_loop(loop, st, step)
    finally:
        ckpt.close()
    return st.latents, st.stats, st.policy.params
