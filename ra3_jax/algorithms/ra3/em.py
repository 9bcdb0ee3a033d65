"""RA3 EM mid-training (docs/RA3.md is the formulation): K iterations of E-step -> bootstrap corpus -> M-step.

One EM iteration k:
  E-step     ``estep.run_estep``: candidate rounds over the iteration's documents (propose, score, update the
             policy, select), one host-loop step per batch of documents.
  Bootstrap  documents with their accepted latents -> ArrayRecord shard with lineage (data/bootstrap.py).
  M-step     next-token training of theta on the bootstrap corpus: ``train.ntp.ntp_steps`` (the NTP loop and
             step); the M-steps of all iterations form one continuous run (one optimizer state, one LR schedule).
  Eval       held-out bound per byte (the selected path's log-likelihood, tokenized whole) next to the exact
             NTP log-likelihood of the same documents, nats and bits per byte (``bound``).

Layout of ``train.out_dir``: ``checkpoints/`` (theta's TrainState + M-step data-iterator state, step = global
M-step), ``iter_<k>/estep/`` (policy state + latents accepted so far, step = E-step batch),
``iter_<k>/bootstrap/`` (the corpus, atomic), ``ra3_metrics.jsonl`` (one row per iteration), ``metrics.jsonl``
and ``tb/`` (M-step curves). Every stage resumes mid-stage after a kill with the same final result.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax

from ra3_jax import distributed
from ra3_jax.config import RunConfig
from ra3_jax.data.bootstrap import is_complete, make_bootstrap_dataset, write_bootstrap
from ra3_jax.data.corpus import build_corpus
from ra3_jax.data.documents import Document, bootstrap_records, iteration_docs, take_documents
from ra3_jax.errors import TrainingError
from ra3_jax.train.checkpoint import RunCheckpointer
from ra3_jax.train.context import RunContext, build_run_context
from ra3_jax.train.data_state import process_split_kwargs, restore_data_state
from ra3_jax.train.loop import Loop, MetricsWriter, append_jsonl, is_main_process, read_jsonl, run_loop, truncate_jsonl
from ra3_jax.train.ntp import check_batch, ntp_steps
from ra3_jax.train.state import TrainState, abstract_state, create_state, learning_rate_schedule, make_optimizer, state_shardings
from ra3_jax.train.step import jit_train_step

from .bound import evaluate_bound
from .estep import LatentProposer, candidate_rounds

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EMRun:
    """Everything the EM iterations share."""

    ctx: RunContext
    proposer: LatentProposer
    step_fn: object  # the jitted NTP step of the M-step
    lr_at: object
    all_docs: list[Document]
    eval_docs: list[Document]
    writer: MetricsWriter
    em_log: str

    @property
    def cfg(self) -> RunConfig:
        return self.ctx.cfg


def load_documents(ctx: RunContext) -> tuple[list[Document], list[Document]]:
    """(train documents of all iterations, held-out documents) of the corpus."""
    cfg, r = ctx.cfg, ctx.cfg.ra3
    sources = build_corpus(cfg.data, cfg.chains)
    if sources["validation"] is None:
        raise TrainingError(
            "RA3 evaluates the ELBO on held-out documents: the corpus has no validation split; raise data.validation_fraction"
        )
    n_docs = r.docs_per_iteration * r.iterations if r.docs_per_iteration else 0
    all_docs = take_documents(sources["train"], ctx.tokenizer, r, n_docs, cfg.data.shuffle_seed)
    if not all_docs:
        raise TrainingError("the train split produced no documents with code")
    eval_docs = take_documents(sources["validation"], ctx.tokenizer, r, r.eval_docs, cfg.data.shuffle_seed + 1)
    if not eval_docs:
        raise TrainingError("the validation split produced no documents with code")
    return all_docs, eval_docs


def estep_stage(run: EMRun, state: TrainState, k: int, g: int) -> tuple[TrainState, dict]:
    """The E-step of iteration k and its bootstrap corpus (or, when written already, the saved statistics)."""
    cfg, r = run.cfg, run.cfg.ra3
    it_dir = os.path.join(run.ctx.out_dir, f"iter_{k}")
    bdir = os.path.join(it_dir, "bootstrap")
    if is_complete(bdir):
        if r.mstep_init == "policy" and not r.baseline and g == k * r.mstep_steps:
            state = state.replace(params=final_policy_params(run.proposer, it_dir))
        return state, read_estep_stats(it_dir)
    t_e = time.perf_counter()
    docs = iteration_docs(run.all_docs, r.docs_per_iteration, k)
    latents, stats = {}, {}
    if not r.baseline:
        latents, stats, policy_params = run_estep(run.proposer, state.params, docs, k, it_dir, cfg)
        if r.mstep_init == "policy":
            state = state.replace(params=policy_params)
    if is_main_process():
        meta = {"iteration": k, "baseline": r.baseline}
        write_bootstrap(bdir, bootstrap_records(docs, latents, run.ctx.tokenizer, k, g), meta)
    distributed.sync(f"ra3-bootstrap-{k}")  # the other processes read the corpus process 0 wrote
    stats["estep_seconds"] = time.perf_counter() - t_e
    return state, stats


def mstep_stage(run: EMRun, state: TrainState, k: int, g: int, data_state) -> tuple[TrainState, dict]:
    """The M-step of iteration k: NTP steps g + 1 .. (k + 1) * mstep_steps on the iteration's bootstrap corpus."""
    cfg, r = run.cfg, run.cfg.ra3
    bdir = os.path.join(run.ctx.out_dir, f"iter_{k}", "bootstrap")
    ds = make_bootstrap_dataset(
        bdir,
        seq_len=cfg.data.seq_len,
        seed=cfg.data.shuffle_seed + k,
        mask_latents=r.mask_latents,
        **process_split_kwargs(cfg, run.ctx.mesh),
    )
    it = iter(ds)
    if data_state is not None and g > k * r.mstep_steps:
        restore_data_state(it, data_state, cfg, g)
    meta = {"iteration": k, "mode": "ra3-baseline" if r.baseline else "ra3"}
    state, last = ntp_steps(
        run.ctx,
        state,
        it,
        run.step_fn,
        name=f"mstep-{k}",
        start=g,
        end=(k + 1) * r.mstep_steps,
        writer=run.writer,
        lr_at=run.lr_at,
        meta=meta,
        extra={"iteration": k},
    )
    run.ctx.ckpt.wait()
    return state, last


def start_eval(run: EMRun, state: TrainState, g: int) -> dict:
    """The held-out bound of the starting model (iteration -1 of ra3_metrics.jsonl), computed once per run."""
    rows = read_jsonl(run.em_log)
    if g == 0 and not any(row["iteration"] == -1 for row in rows):
        ev = evaluate_bound(run.proposer, state.params, run.eval_docs, seed=run.cfg.train.seed + 99)
        append_jsonl(run.em_log, {"iteration": -1, **ev})
        return {f"{k}@start": v for k, v in ev.items()}
    if rows and rows[0]["iteration"] == -1:
        return {f"{k}@start": v for k, v in rows[0].items() if k != "iteration"}
    return {}


def midtrain_ra3(cfg: RunConfig) -> dict:
    """RA3 EM mid-training (or, with ``ra3.baseline``, its compute-matched NTP baseline). Resumable."""
    r = cfg.ra3
    if cfg.model.init == "random":
        log.warning("midtrain-ra3 from a random model: rationales will be noise (fine for smoke tests)")
    ctx = build_run_context(cfg)
    check_batch(cfg, ctx.mesh)
    all_docs, eval_docs = load_documents(ctx)
    total_steps = r.iterations * r.mstep_steps
    tx = make_optimizer(cfg.optim, total_steps)
    step_fn = jit_train_step(ctx.model_cfg, tx, cfg.optim.grad_accum, ctx.mesh, state_shardings(ctx.model_cfg, tx, ctx.mesh))
    proposer = LatentProposer(cfg, ctx.model_cfg, ctx.tokenizer, ctx.mesh)
    g, data_state, params = ctx.ckpt.pick_step(cfg.train.resume_step) or 0, None, ctx.take_params()
    if g:
        state, data_state, _ = ctx.ckpt.restore(g, abstract_state(ctx.model_cfg, tx, ctx.mesh))
    else:
        state = create_state(params, tx, ctx.model_cfg, ctx.mesh)
    del params
    lr_at = learning_rate_schedule(cfg.optim, total_steps)
    run = EMRun(
        ctx,
        proposer,
        step_fn,
        lambda s: lr_at(s - 1),
        all_docs,
        eval_docs,
        ctx.start_run(g),
        os.path.join(ctx.out_dir, "ra3_metrics.jsonl"),
    )
    k0 = g // r.mstep_steps
    truncate_jsonl(run.em_log, lambda row: row["iteration"] < k0)
    summary = start_eval(run, state, g)
    try:
        for k in range(k0, r.iterations):
            state, stats = estep_stage(run, state, k, g)
            t_m = time.perf_counter()
            state, last = mstep_stage(run, state, k, g, data_state)
            data_state, g = None, int(jax.device_get(state.step))
            m_seconds = time.perf_counter() - t_m
            ev = evaluate_bound(proposer, state.params, eval_docs, seed=cfg.train.seed + 99)
            row = {"iteration": k, **iteration_metrics(stats, iteration_docs(all_docs, r.docs_per_iteration, k))}
            row["mstep/loss"] = last.get("loss", float("nan"))
            row["mstep/tokens_per_s"] = (r.mstep_steps * cfg.data.batch_size * cfg.data.seq_len) / max(m_seconds, 1e-9)
            row.update(ev)
            append_jsonl(run.em_log, row)
            run.writer.write(g, {f"ra3/{kk}": v for kk, v in row.items() if isinstance(v, (int, float)) and kk != "iteration"})
            summary.update(row)
    finally:
        ctx.ckpt.close()
        run.writer.close()
    summary["step"] = int(jax.device_get(state.step))
    return summary


# -------------------------------------------------------------------------------------------------- E-step
def jsonable_latents(latents: dict) -> dict:
    return {str(d): {str(t): z for t, z in lat.items()} for d, lat in latents.items()}


def load_latents(raw: dict) -> dict:
    def one(z):
        return {"text": z["text"], "score": float(z["score"]), "reward": float(z["reward"])}

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
    """E-step of iteration k over ``docs``; resumable (saved every ``ra3.estep_ckpt_every`` batches and at the end;
    a resume replays the batches after the last save, the same keys giving the same result). Returns (latents, stats,
    final policy params)."""
    r = cfg.ra3
    ckpt = RunCheckpointer(os.path.join(it_dir, "estep"), keep=2, async_save=cfg.train.async_checkpoints, resume_override=None)
    B = r.estep_batch_docs
    n_batches = -(-len(docs) // B)
    start = ckpt.pick_step() or 0  # the latest step, checked (train.resume_step is for the M-step checkpoints)
    if start:
        policy, data, _ = ckpt.restore(start, proposer.abstract_policy())
        st = EStepState(policy, load_latents(data["latents"]), data["stats"])
        log.info("E-step %d resumed after batch %d/%d", k, start, n_batches)
    else:
        st = EStepState(proposer.init_policy(model_params), {}, {})
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 1000 + k)
    learn = r.selection != "random"  # CHAINS.md's random acceptance: no selection, so no policy gradient on the scores

    def step(st: EStepState, b: int):  # loop step b = E-step batch b - 1
        idx = list(range((b - 1) * B, min(b * B, len(docs))))
        pg_loss = 0.0
        for j, rnd in enumerate(candidate_rounds(docs, idx, r.candidates_per_doc, (cfg.train.seed, k), proposer.first)):
            cands = [proposer.candidate(docs, d, t, st.latents.get(d, {})) for d, t in rnd]
            rkey = jax.random.fold_in(key, (b - 1) * 1000 + j)
            if learn:
                st.policy, s = proposer.run_round(cands, st.latents, rkey, policy_state=st.policy, model_params=model_params)
            else:  # random acceptance learns nothing from the scores: its proposals come from the model itself
                _, s = proposer.run_round(cands, st.latents, rkey, model_params=model_params)
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
        ckpt_every=r.estep_ckpt_every,  # a policy state is params + 2 Adam moments: 1.6 GB per save at SmolLM2 size
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


def iteration_metrics(stats: dict, docs: list[Document]) -> dict:
    bounds = sum(d.num_steps for d in docs)
    acc = stats.get("accepted", 0)
    sec = stats.get("estep_seconds", 0.0)
    gm = stats.get("batch_gain_means", [])
    nan = float("nan")
    return {
        "estep/latent_rate": acc / max(bounds, 1),
        "estep/accepted_fraction": acc / max(stats.get("candidates", 0), 1),
        "estep/mean_latent_chars": stats.get("latent_chars", 0) / max(acc, 1),
        "estep/mean_lp": stats.get("lp_sum", 0.0) / max(stats.get("gain_count", 0), 1),
        "estep/mean_reward": stats["reward_sum"] / max(stats["reward_count"], 1) if stats.get("reward_count") else nan,
        "estep/mean_gain": stats.get("gain_sum", 0.0) / max(stats.get("gain_count", 0), 1),
        "estep/first_batch_gain": gm[0] if gm else nan,
        "estep/last_batch_gain": gm[-1] if gm else nan,
        "estep/tokens_per_s": (stats.get("generated_tokens", 0) + stats.get("scored_tokens", 0)) / max(sec, 1e-9) if sec else 0.0,
        "estep/seconds": sec,
        # token counts of the E-step's work (the FLOP estimate of a compute-matched baseline starts from them)
        "estep/prompt_tokens": stats.get("prompt_tokens", 0),
        "estep/generated_tokens": stats.get("generated_tokens", 0),
        "estep/scored_tokens": stats.get("scored_tokens", 0),
    }


def final_policy_params(proposer: LatentProposer, it_dir: str):
    ck = RunCheckpointer(os.path.join(it_dir, "estep"), async_save=False, resume_override=None)
    try:
        st, _, _ = ck.restore(ck.pick_step(), proposer.abstract_policy())
        return st.params
    finally:
        ck.close()


def read_estep_stats(it_dir: str) -> dict:
    d = os.path.join(it_dir, "estep")
    if not os.path.isdir(d):
        return {}
    ck = RunCheckpointer(d, async_save=False, resume_override=None)
    try:
        s = ck.latest_step()
        return {} if s is None else dict(ck.restore_data(s)["stats"])
    finally:
        ck.close()
