"""RLPT (arXiv 2509.19249): GRPO on next-segment prediction over pre-training text and code.

Tasks come from the corpus (``data`` section) cut into segments (``data/segments.py``):
- ASR (autoregressive segment reasoning): predict s_i from s_<i;
- MSR (middle segment reasoning): predict s_i from s_<i and s_{i+1}.
The prompt ends with ``<|startofprediction|>``; the model answers and closes with ``<|endofprediction|>``.
Reward (default judge): 1 if the normalized prediction is a prefix of s_i s_{i+1} ... and covers s_i
(``objectives/segment_reward.py``); ``judge: model`` asks a judge model through our sampler instead. Rewards are
cached per (prediction, reference). J = E_ASR[r] + lambda E_MSR[r]: MSR rows' advantages are scaled by lambda.
On-policy GRPO without KL by default (the paper's settings). ``sft_steps`` > 0 runs a cold-start SFT on
(prompt -> target + end tag) first, through the same host loop and update core (the NTP objective).
Evaluation: greedy ASR accuracy on held-out (validation split) triples, and optionally code pass@1 on
``eval.benchmarks``. The GRPO loop is ``algorithms/grpo.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np

from ra3_jax import sharding
from ra3_jax.algorithms.grpo import Environment, run_grpo
from ra3_jax.config import OptimSection, RunConfig
from ra3_jax.data.corpus import build_corpus
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.data.segments import Triple, make_triples
from ra3_jax.distributed import put_global
from ra3_jax.errors import TrainingError
from ra3_jax.evaluation.benchmark_eval import greedy_pass_at_1
from ra3_jax.execution import ProcessSplitSandbox, Sandbox
from ra3_jax.objectives.segment_reward import END, extract_prediction, normalize, prefix_reward
from ra3_jax.sampler import Greedy, Sampler, bucket
from ra3_jax.train.context import RunContext, build_run_context, check_rows, load_model_and_tokenizer
from ra3_jax.train.loop import Loop, run_loop
from ra3_jax.train.state import create_state, make_optimizer, state_shardings
from ra3_jax.train.step import jit_train_step

log = logging.getLogger(__name__)


def _unit(*parts) -> float:
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class SegmentTask:
    kind: str  # asr | msr
    triple: Triple


def corpus_triples(source, limit: int, v) -> list[Triple]:
    """Segment triples of the first ``limit`` documents (0 = all) of a corpus split."""
    out: list[Triple] = []
    n = len(source) if not limit else min(limit, len(source))
    for i in range(n):
        ex = source[i]
        text = ex["text"].decode("utf-8") if isinstance(ex["text"], bytes) else ex["text"]
        path = ex["path"].decode("utf-8") if isinstance(ex["path"], bytes) else ex["path"]
        kind = v.segmenter if v.segmenter != "auto" else ("code" if path.endswith(".py") else "text")
        out += make_triples(text, path, kind, min_chars=v.min_segment_chars, max_context_chars=v.max_context_chars)
    return out


class RLPTEnv(Environment):
    """Next-segment prediction tasks (ASR/MSR) with judged rewards."""

    name = "rlpt"
    stops = (END,)

    def __init__(self, cfg: RunConfig, tasks: list[SegmentTask], val_triples: list[Triple]):
        self.cfg, self.v, self.tasks, self.val_triples = cfg, cfg.rlpt, tasks, val_triples
        self._judge_cache: dict = {}
        self._judge = None  # (sampler, params), loaded on first use
        self._sandbox = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RLPTEnv:
        v = cfg.rlpt
        sources = build_corpus(cfg.data, cfg.chains)
        triples = corpus_triples(sources["train"], v.max_documents, v)
        if not triples:
            raise TrainingError("RLPT found no segment triples in the corpus (documents too short? lower rlpt.min_segment_chars)")
        tasks = []
        for t in triples:
            msr = t.next and _unit(cfg.train.seed, t.doc, t.index) < v.msr_fraction
            tasks.append(SegmentTask("msr" if msr else "asr", t))
        val = sources.get("validation")
        val_triples = corpus_triples(val, 0, v)[: v.eval_triples] if (val is not None and v.eval_triples) else []
        return cls(cfg, tasks, val_triples)

    def prompt(self, task: SegmentTask) -> str:
        t = task.triple
        if task.kind == "msr":
            return self.v.msr_template.format(context=t.context, next=t.next.strip())
        return self.v.asr_template.format(context=t.context)

    def adv_weights(self, idx, G):
        w = [self.v.msr_weight if self.tasks[idx[r // G]].kind == "msr" else 1.0 for r in range(len(idx) * G)]
        return np.array(w, np.float32)

    # -- rewards
    def judge_many(self, preds: list[str | None], triples: list[Triple]) -> np.ndarray:
        """Rewards with the configured judge, cached per (normalized prediction, reference)."""
        keys = [(normalize(p) if p is not None else None, t.after, t.target) for p, t in zip(preds, triples)]
        todo = [k for k in dict.fromkeys(keys) if k not in self._judge_cache]
        if todo:
            if self.v.judge == "prefix":
                for k in todo:
                    self._judge_cache[k] = prefix_reward(k[0], k[1], k[2])
            else:
                self._judge_cache.update(zip(todo, self._model_judge(todo)))
        return np.array([self._judge_cache[k] for k in keys], np.float32)

    def _model_judge(self, keys) -> list[float]:
        if self._judge is None:
            v = self.v
            model = dataclasses.replace(self.cfg.model, init=v.judge_init, path=v.judge_model)
            jcfg = dataclasses.replace(
                self.cfg, model=model, tokenizer=dataclasses.replace(self.cfg.tokenizer, kind="auto", path=None)
            )
            from ra3_jax.train.context import make_run_mesh

            tok, mcfg, params = load_model_and_tokenizer(jcfg, make_run_mesh(jcfg))
            self._judge = (Sampler(mcfg, tok), params)
        sampler, params = self._judge
        scores = [0.0] * len(keys)
        asks = [(i, k) for i, k in enumerate(keys) if k[0]]  # empty / missing predictions score 0 without asking
        prompts = [self.v.judge_template.format(reference=normalize(" ".join(k[1])), prediction=k[0]) for _, k in asks]
        for lo in range(0, len(prompts), 32):
            outs = sampler.complete(params, prompts[lo : lo + 32], max_new_tokens=4, sampling=Greedy())
            for (i, _), o in zip(asks[lo : lo + 32], outs):
                scores[i] = 1.0 if o.text.strip().lower().startswith("yes") else 0.0
        return scores

    def score(self, idx, texts, out):
        G = self.cfg.policy.group_size
        preds = [extract_prediction(x) for x in texts]
        triples = [self.tasks[idx[r // G]].triple for r in range(len(texts))]
        rewards = self.judge_many(preds, triples)
        kinds = np.array([self.tasks[idx[r // G]].kind == "msr" for r in range(len(texts))])
        extra = {"end_tag_rate": float(np.mean([p is not None for p in preds])), "judge_cache": float(len(self._judge_cache))}
        if (~kinds).any():
            extra["reward_asr"] = float(rewards[~kinds].mean())
        if kinds.any():
            extra["reward_msr"] = float(rewards[kinds].mean())
        return rewards, extra

    # -- evaluation
    def has_eval(self) -> bool:
        return bool(self.val_triples) or bool(self.cfg.eval.benchmarks)

    def next_segment_accuracy(self, sampler, params, triples: list[Triple]) -> float:
        prompts = [self.v.asr_template.format(context=t.context) for t in triples]
        preds, chunk = [], self.cfg.policy.prompts_per_step * 2
        for lo in range(0, len(prompts), chunk):
            outs = sampler.complete(
                params,
                prompts[lo : lo + chunk],
                max_new_tokens=self.cfg.eval.max_new_tokens,
                sampling=Greedy(),
                stop_strings=[END],
            )
            preds += [extract_prediction(o.text) for o in outs]
        return float(np.mean([prefix_reward(p, t.after, t.target) for p, t in zip(preds, triples)]))

    def evaluate(self, sampler, params, step, out_dir):
        res = {}
        if self.val_triples:
            res["eval/next_segment_acc"] = self.next_segment_accuracy(sampler, params, self.val_triples)
        if self.cfg.eval.benchmarks:
            if self._sandbox is None:
                self._sandbox = ProcessSplitSandbox(Sandbox(workers=2))
            res.update(
                greedy_pass_at_1(
                    sampler,
                    params,
                    self.cfg,
                    self._sandbox,
                    out_dir=f"{out_dir}/eval/step_{step}",
                    batch_tasks=self.cfg.policy.prompts_per_step,
                )
            )
        return res


def sft_batch(ctx: RunContext, env: RLPTEnv, rng: np.random.Generator) -> dict:
    """A cold-start SFT batch: prompt -> target + end tag, loss on the answer only."""
    tok, n = ctx.tokenizer, ctx.cfg.rlpt.sft_batch
    end_ids = tok.encode(END)
    seqs, masks = [], []
    for i in rng.choice(len(env.tasks), size=n, replace=len(env.tasks) < n):
        p = tok.encode(env.prompt(env.tasks[int(i)])) or [tok.bos_id]
        y = tok.encode(env.tasks[int(i)].triple.target) + end_ids
        seqs.append(p + y)
        masks.append([0] * len(p) + [1] * len(y))
    rows, m = pad_rows(seqs, bucket(max(len(x) for x in seqs) - 1), tok.pad_id, {"y": masks})
    return {**rows, "loss_mask": m["y"]}


def cold_start_sft(ctx: RunContext, env: RLPTEnv, params) -> tuple[object, list[float]]:
    """``rlpt.sft_steps`` steps of next-token SFT (AdamW at ``rlpt.sft_lr``, constant, no decay) on prompt ->
    target + end tag, through the host loop. Returns (params, loss per step)."""
    v = ctx.cfg.rlpt
    check_rows(v.sft_batch, ctx.mesh, "rlpt.sft_batch")
    optim = OptimSection(lr=v.sft_lr, schedule="constant", warmup_steps=0, b2=0.999, weight_decay=0.0, clip_norm=0.0)
    tx = make_optimizer(optim, v.sft_steps)
    shard = state_shardings(ctx.model_cfg, tx, ctx.mesh)
    step_fn = jit_train_step(ctx.model_cfg, tx, 1, ctx.mesh, shard)
    rng, losses = np.random.default_rng(ctx.cfg.train.seed), []
    bs = sharding.batch_sharding(ctx.mesh, 2)

    def step(state, s):
        batch = sft_batch(ctx, env, rng)
        state, m = step_fn(state, put_global(batch, {k: bs for k in batch}))
        losses.append(float(m["loss"]))
        return state, m

    loop = Loop("rlpt-sft", 0, v.sft_steps, ctx.out_dir, progress=ctx.cfg.train.progress)
    state, _ = run_loop(loop, create_state(params, tx, ctx.model_cfg, ctx.mesh), step)
    log.info("cold-start SFT: %d steps, last loss %.4f", v.sft_steps, losses[-1])
    return state.params, losses


def rlpt(cfg: RunConfig) -> dict:
    """``ra3 rlpt``: (cold-start SFT, then) GRPO on next-segment prediction; resumable from ``train.out_dir``."""
    env = RLPTEnv.from_config(cfg)
    ctx = build_run_context(cfg)
    before_rl = (lambda params: cold_start_sft(ctx, env, params)[0]) if cfg.rlpt.sft_steps else None
    return run_grpo(ctx, env, before_rl)
