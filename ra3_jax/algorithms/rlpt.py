"""RLPT (arXiv 2509.19249): GRPO on next-segment prediction over pre-training text and code.

Tasks come from the corpus (``data`` section) cut into segments (``data/segments.py``):
- ASR (autoregressive segment reasoning): predict s_i from s_<i;
- MSR (middle segment reasoning): predict s_i from s_<i and s_{i+1}.
The prompt ends with ``<|startofprediction|>``; the model answers and closes with ``<|endofprediction|>``.
Reward (default judge): 1 if the normalized prediction is a prefix of s_i s_{i+1} ... and covers s_i
(``objectives/segment_reward.py``); ``judge: model`` asks a judge model through our sampler instead. Rewards are
cached per (prediction, reference). J = E_ASR[r] + lambda E_MSR[r]: MSR rows' advantages are scaled by lambda.
On-policy GRPO without KL by default (the paper's settings). ``sft_steps`` > 0 runs a cold-start SFT on
(prompt -> target + end tag) first. Evaluation: greedy ASR accuracy on held-out (validation split) triples, and
optionally code pass@1 through the evaluation command's benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ra3_jax import sharding
from ra3_jax.algorithms.rlvr import GRPOTrainer, ProcessSplitSandbox
from ra3_jax.config import RunConfig
from ra3_jax.data.code_benchmarks import benchmark_dir
from ra3_jax.data.corpus import build_corpus
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.data.segments import Triple, make_triples
from ra3_jax.distributed import put_global
from ra3_jax.execution import Sandbox
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.objectives.segment_reward import END, extract_prediction, normalize, prefix_reward
from ra3_jax.sampler import Sampler, SamplingParams, bucket
from ra3_jax.train.loop import TrainingError, check_vocab, resolve_tokenizer

log = logging.getLogger(__name__)


def _unit(*parts) -> float:
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class SegmentTask:
    kind: str  # asr | msr
    triple: Triple


class RLPTTrainer(GRPOTrainer):
    mode = "rlpt"

    def __init__(self, cfg: RunConfig):
        self._judge_cache: dict = {}
        self._judge = None
        self._sandbox = None
        super().__init__(cfg, cfg.rlpt)

    # -- tasks
    def _triples(self, source, limit: int) -> list[Triple]:
        v = self.v
        out: list[Triple] = []
        n = len(source) if not limit else min(limit, len(source))
        for i in range(n):
            ex = source[i]
            text = ex["text"].decode("utf-8") if isinstance(ex["text"], bytes) else ex["text"]
            path = ex["path"].decode("utf-8") if isinstance(ex["path"], bytes) else ex["path"]
            kind = v.segmenter if v.segmenter != "auto" else ("code" if path.endswith(".py") else "text")
            out += make_triples(text, path, kind, min_chars=v.min_segment_chars, max_context_chars=v.max_context_chars)
        return out

    def load_tasks(self):
        sources = build_corpus(self.cfg.data)
        triples = self._triples(sources["train"], self.v.max_documents)
        if not triples:
            raise TrainingError("RLPT found no segment triples in the corpus (documents too short? lower rlpt.min_segment_chars)")
        tasks = []
        for t in triples:
            msr = t.next and _unit(self.cfg.train.seed, t.doc, t.index) < self.v.msr_fraction
            tasks.append(SegmentTask("msr" if msr else "asr", t))
        val = sources.get("validation")
        self.val_triples = self._triples(val, 0)[: self.v.eval_triples] if (val is not None and self.v.eval_triples) else []
        return tasks

    def prompt(self, task: SegmentTask) -> str:
        t = task.triple
        if task.kind == "msr":
            return self.v.msr_template.format(context=t.context, next=t.next.strip())
        return self.v.asr_template.format(context=t.context)

    @property
    def stops(self) -> tuple:
        return (END,)

    def adv_weights(self, idx):
        G = self.v.group_size
        return np.array(
            [self.v.msr_weight if self.tasks[idx[r // G]].kind == "msr" else 1.0 for r in range(len(idx) * G)], np.float32
        )

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
            jcfg = dataclasses.replace(
                self.cfg,
                model=dataclasses.replace(self.cfg.model, init=v.judge_init, path=v.judge_model),
                tokenizer=dataclasses.replace(self.cfg.tokenizer, kind="auto", path=None),
            )
            from ra3_jax.model.store import load_model

            tok = resolve_tokenizer(jcfg)
            mcfg, params = load_model(jcfg.model, self.mesh)
            check_vocab(tok, mcfg)
            self._judge = Sampler(params, mcfg, tok)
        scores = [0.0] * len(keys)
        asks = [(i, k) for i, k in enumerate(keys) if k[0]]  # empty / missing predictions score 0 without asking
        prompts = [self.v.judge_template.format(reference=normalize(" ".join(k[1])), prediction=k[0]) for _, k in asks]
        for lo in range(0, len(prompts), 32):
            outs = self._judge.complete(prompts[lo : lo + 32], max_new_tokens=4, sampling=SamplingParams(temperature=0.0))
            for (i, _), o in zip(asks[lo : lo + 32], outs):
                scores[i] = 1.0 if o.text.strip().lower().startswith("yes") else 0.0
        return scores

    def score(self, idx, texts, out):
        G = self.v.group_size
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

    # -- cold-start SFT
    def before_rl(self, params):
        v = self.v
        if not v.sft_steps:
            return params
        tx = optax.adamw(v.sft_lr, weight_decay=0.0)
        opt = tx.init(params)
        cfg = self.model_cfg

        @jax.jit
        def step(params, opt, batch):
            def loss_fn(p):
                lp = token_logprobs(p, batch, cfg)
                return -(lp * batch["mask"]).sum() / jnp.maximum(batch["mask"].sum(), 1.0)

            loss, g = jax.value_and_grad(loss_fn)(params)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), opt, loss

        end_ids = self.tokenizer.encode(END)
        rng = np.random.default_rng(self.cfg.train.seed)
        loss = float("nan")
        self.sft_losses = []
        for k in range(v.sft_steps):
            pick = rng.choice(len(self.tasks), size=v.sft_batch, replace=len(self.tasks) < v.sft_batch)
            seqs, masks = [], []
            for i in pick:
                p = self._ids(int(i))
                y = self.tokenizer.encode(self.tasks[int(i)].triple.target) + end_ids
                seqs.append(p + y)
                masks.append([0] * len(p) + [1] * len(y))
            rows, m = pad_rows(seqs, bucket(max(len(x) for x in seqs) - 1), self.tokenizer.pad_id, {"y": masks})
            batch = {**rows, "mask": m["y"]}
            batch = put_global(batch, {k: sharding.replicated(self.mesh) for k in batch})  # (one process or several)
            params, opt, loss = step(params, opt, batch)
            self.sft_losses.append(float(loss))
        log.info("cold-start SFT: %d steps, last loss %.4f", v.sft_steps, float(loss))
        return params

    # -- evaluation
    def has_eval(self) -> bool:
        return bool(self.val_triples) or bool(self.v.eval_benchmarks)

    def next_segment_accuracy(self, triples: list[Triple]) -> float:
        self.sampler.params = self.state.params
        greedy = SamplingParams(temperature=0.0)
        prompts = [self.v.asr_template.format(context=t.context) for t in triples]
        preds = []
        for lo in range(0, len(prompts), self.v.prompts_per_step * 2):
            outs = self.sampler.complete(
                prompts[lo : lo + self.v.prompts_per_step * 2],
                max_new_tokens=self.v.eval_max_new_tokens,
                sampling=greedy,
                stop_strings=[END],
            )
            preds += [extract_prediction(o.text) for o in outs]
        return float(np.mean([prefix_reward(p, t.after, t.target) for p, t in zip(preds, triples)]))

    def evaluate(self, step: int) -> dict:
        res = {}
        if self.val_triples:
            res["eval/next_segment_acc"] = self.next_segment_accuracy(self.val_triples)
        if self.v.eval_benchmarks:
            if self._sandbox is None:
                self._sandbox = ProcessSplitSandbox(Sandbox(workers=2))
            res.update(
                self.benchmark_eval(
                    step,
                    self.v.eval_benchmarks,
                    data_dir=benchmark_dir(self.v.data_dir),
                    mbpp_style="docstring",
                    max_new_tokens=self.v.eval_max_new_tokens,
                    n_tasks=0,
                    sandbox=self._sandbox,
                )
            )
        return res


def rlpt(cfg: RunConfig) -> dict:
    return RLPTTrainer(cfg).run()
