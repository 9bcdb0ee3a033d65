"""RLVR: GRPO on code problems with unit-test rewards from the sandbox (and the GRPO loop RLPT shares).

One RL step:
1. rollout: ``prompts_per_step`` task prompts, G samples each from the in-graph sampler with the current policy
   (one shared prefill per prompt), cut at the benchmark's stop strings;
2. reward: each completion's check runs in the sandbox pool; r = 1 if every test passes, else 0;
3. update: group advantages (GRPO / RLOO / Dr.GRPO) and the clipped-ratio surrogate over response tokens
   (token- or sequence-mean), optional k1/k3 KL to the frozen start model; ``updates_per_batch`` AdamW steps.
Every ``train.eval_every`` steps (and at step 0) greedy pass@1 on the eval benchmarks' test splits is logged.
Checkpoints (Orbax) hold the policy state and the task cursor; a resumed run repeats the same rollouts.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ra3_jax import sharding
from ra3_jax.config import RunConfig
from ra3_jax.data.code_benchmarks import benchmark_dir, load_benchmark
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.distributed import put_global, split_work
from ra3_jax.evaluation.code_eval import HUMANEVAL_STOPS, PromptFormat, TaskFormat, cut_at_stops, evaluate_model, sampler_generate
from ra3_jax.execution import ExecResult, Limits, Sandbox
from ra3_jax.model.llama import LlamaConfig, forward
from ra3_jax.model.params import param_shardings
from ra3_jax.model.store import load_model
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.objectives.pg import group_advantages, kl_estimate, policy_gradient_loss
from ra3_jax.sampler import Sampler, SamplingParams, bucket
from ra3_jax.train.checkpoint import RunCheckpointer
from ra3_jax.train.loop import (
    FAULT_ENV,
    MetricsWriter,
    TrainingError,
    check_vocab,
    is_main_process,
    make_run_mesh,
    raise_if_nonfinite,
    resolve_tokenizer,
    write_run_metadata,
)
from ra3_jax.train.state import TrainState, abstract_state, create_state, learning_rate_schedule, make_optimizer, state_shardings

log = logging.getLogger(__name__)
ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "resp_mask", "old_logp")


# ------------------------------------------------------------------------------------------- device step
def grpo_update(
    state: TrainState,
    ref_params,
    batch,
    *,
    cfg: LlamaConfig,
    tx,
    G: int,
    clip_eps: float,
    advantage: str,
    kl_coef: float,
    kl_estimator: str,
    aggregation: str,
    on_policy: bool,
    micro_batch: int = 0,
):
    """One policy step on a rollout batch. Rows are group-major: row n*G + g is sample g of prompt n.

    With ``micro_batch`` = m > 0 the rows are processed m at a time in a ``lax.scan`` that accumulates the
    gradient (the [rows, T, vocab] log-softmax is what runs out of memory first); every term is normalized by
    the whole batch's token / row count, so the step equals the one-shot step up to float rounding."""
    N = batch["resp_mask"].shape[0]
    mb = micro_batch or N
    if N % mb:
        raise ValueError(f"micro_batch={mb} must divide the {N} rows of a step")
    denom = jnp.maximum(batch["resp_mask"].sum(), 1.0)
    rows = {k: v for k, v in batch.items() if k != "rewards"}
    rows["adv"] = group_advantages(batch["rewards"], G, advantage)
    if "adv_weight" in batch:  # per-row weights (RLPT: lambda on MSR rows)
        rows["adv"] = rows["adv"] * rows.pop("adv_weight")

    def part(params, b):
        mask = b["resp_mask"]
        logits, _ = forward(params, b["inputs"], b["positions"], cfg, segment_ids=b["segment_ids"])
        logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp = jnp.take_along_axis(logp_all, b["targets"][..., None], axis=-1)[..., 0]
        old = jax.lax.stop_gradient(lp) if on_policy else b["old_logp"]
        pg = policy_gradient_loss(lp, old, b["adv"], mask, clip_eps=clip_eps, aggregation=aggregation)
        pg = pg * (jnp.maximum(mask.sum(), 1.0) / denom if aggregation == "token" else mask.shape[0] / N)
        ent = jax.lax.stop_gradient(-(jnp.exp(logp_all) * logp_all).sum(-1))
        clipped = (jnp.abs(jnp.exp(lp - old) - 1.0) > clip_eps) * mask
        kl_sum = jnp.zeros(())
        if ref_params is not None:
            ref_lp = jax.lax.stop_gradient(token_logprobs(ref_params, b, cfg))
            kl_sum = (kl_estimate(lp, ref_lp, kl_estimator) * mask).sum()
        loss = pg + kl_coef * kl_sum / denom
        return loss, jnp.stack([(ent * mask).sum(), clipped.sum(), kl_sum])

    grad_fn = jax.value_and_grad(part, has_aux=True)
    if mb == N:
        (loss, sums), grads = grad_fn(state.params, rows)
    else:
        chunks = jax.tree.map(lambda x: x.reshape(N // mb, mb, *x.shape[1:]), rows)

        def body(carry, b):
            loss_acc, sums_acc, g_acc = carry
            (loss, sums), g = grad_fn(state.params, b)
            return (loss_acc + loss, sums_acc + sums, jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss, sums, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(3), zeros), chunks)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "entropy": sums[0] / denom,
        "clip_frac": sums[1] / denom,
        "kl": sums[2] / denom,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


# --------------------------------------------------------------------------------------------- host side
def load_training_tasks(cfg: RunConfig):
    """(tasks, format) for training: a benchmark split or a JSONL task file."""
    v = cfg.rlvr
    if v.tasks_file:
        path = os.path.expanduser(v.tasks_file)
        if not os.path.exists(path):
            raise TrainingError(f"rlvr.tasks_file not found: {path}")
        tasks = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    t = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrainingError(f"{path}:{i}: not valid JSON ({e})") from None
                missing = {"prompt", "test"} - set(t)
                if missing:
                    raise TrainingError(f"{path}:{i}: task lacks {sorted(missing)} (needs prompt and test)")
                tasks.append(
                    {
                        "task_id": str(t.get("task_id", i)),
                        "prompt": t["prompt"],
                        "test": t["test"],
                        "prefix": t.get("prefix", t["prompt"]),
                    }
                )
        fmt = TaskFormat("custom", tuple(HUMANEVAL_STOPS))
    else:
        data_dir = benchmark_dir(v.data_dir)
        tasks = load_benchmark(v.benchmark, v.split, data_dir=data_dir, tfds_dir=cfg.data.tfds_dir)
        fmt = PromptFormat.create(v.benchmark, v.mbpp_style, data_dir=data_dir)
    if v.max_tasks:
        tasks = tasks[: v.max_tasks]
    return tasks, fmt


def task_batch(n_tasks: int, cursor: int, count: int, seed: int) -> list[int]:
    """Task indices cursor .. cursor+count of an endless stream of per-epoch permutations (resumable)."""
    perms: dict[int, np.ndarray] = {}
    out = []
    for c in range(cursor, cursor + count):
        epoch, i = divmod(c, n_tasks)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_tasks)
        out.append(int(perms[epoch][i]))
    return out


def rollout_rows(prompts: list[list[int]], out, G: int, pad: int) -> dict:
    """Host rows prompt + response for the update; resp_mask marks response targets. Length bucketed."""
    seqs, masks = [], []
    for r in range(len(prompts) * G):
        p, k = prompts[r // G], int(out.lengths[r])
        seqs.append(list(p) + [int(t) for t in out.tokens[r, :k]])
        masks.append([0] * len(p) + [1] * k)
    rows, m = pad_rows(seqs, bucket(max(len(x) for x in seqs) - 1), pad, {"resp": masks})
    return {**rows, "resp_mask": m["resp"]}


class GRPOTrainer:
    """The GRPO loop shared by RLVR and RLPT. A subclass provides the tasks, their prompts and stop strings,
    the rewards and the periodic evaluation; ``section`` holds the GRPO knobs (same names in both sections)."""

    mode = "grpo"

    def __init__(self, cfg: RunConfig, section):
        self.cfg, self.v = cfg, section
        self.prompt_ids: dict[int, list[int]] = {}
        self.out_dir = os.path.abspath(os.path.expanduser(cfg.train.out_dir))
        os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = make_run_mesh(cfg)
        self.dp = sharding.data_parallel_size(self.mesh)
        rows = self.v.prompts_per_step * self.v.group_size
        if self.v.micro_batch and (rows % self.v.micro_batch or self.v.micro_batch % self.dp):
            raise TrainingError(
                f"{self.mode}.micro_batch={self.v.micro_batch} must divide the {rows} rows of a step and be "
                f"divisible by the data-parallel size {self.dp}"
            )
        if rows % self.dp:
            raise TrainingError(
                f"{self.mode}.prompts_per_step x group_size = {rows} rows must be divisible by the data-parallel size {self.dp}"
            )
        self.tokenizer = resolve_tokenizer(cfg)
        self.tasks = self.load_tasks()
        if not self.tasks:
            raise TrainingError(f"{self.mode} has no training tasks")
        self.model_cfg, params = load_model(cfg.model, self.mesh, key=jax.random.key(cfg.train.seed))
        check_vocab(self.tokenizer, self.model_cfg)
        self.tx = make_optimizer(cfg.optim, cfg.train.steps * self.v.updates_per_batch)
        self.lr_at = learning_rate_schedule(cfg.optim, cfg.train.steps * self.v.updates_per_batch)
        self.st_shard = state_shardings(self.model_cfg, self.tx, self.mesh)
        self.ckpt = RunCheckpointer(
            os.path.join(self.out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints
        )
        self.start = self.ckpt.latest_step() or 0
        self.cursor = 0
        self.ref_params = params if self.v.kl_coef > 0 else None
        if self.start:
            self.state, data_state, _ = self.ckpt.restore(self.start, abstract_state(self.model_cfg, self.tx, self.mesh))
            self.cursor = int(data_state["cursor"])
        else:
            params = self.before_rl(params)
            self.state = create_state(params, self.tx, self.model_cfg, self.mesh)
        del params
        self.sampler = Sampler(None, self.model_cfg, self.tokenizer)
        self.sampling = SamplingParams(temperature=self.v.temperature, top_k=self.v.top_k, top_p=self.v.top_p)
        rows_shard = sharding.batch_sharding(self.mesh, 2)
        vec_shard = sharding.batch_sharding(self.mesh, 1)
        b_shard = {**{k: rows_shard for k in ROW_KEYS}, "rewards": vec_shard, "adv_weight": vec_shard}
        p_shard = param_shardings(self.model_cfg, self.mesh)
        on_policy = self.v.updates_per_batch == 1
        upd = functools.partial(
            grpo_update,
            cfg=self.model_cfg,
            tx=self.tx,
            G=self.v.group_size,
            clip_eps=self.v.clip_eps,
            advantage=self.v.advantage,
            kl_coef=self.v.kl_coef,
            kl_estimator=self.v.kl_estimator,
            aggregation=self.v.loss_aggregation,
            on_policy=on_policy,
            micro_batch=self.v.micro_batch,
        )
        self._update = jax.jit(
            upd,
            in_shardings=(self.st_shard, p_shard if self.ref_params is not None else None, b_shard),
            out_shardings=(self.st_shard, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._old_logp = jax.jit(functools.partial(token_logprobs, cfg=self.model_cfg), in_shardings=(p_shard, None))
        self.b_shard = b_shard

    # -- what a subclass provides
    def load_tasks(self) -> list:
        raise NotImplementedError

    def prompt(self, task) -> str:
        raise NotImplementedError

    @property
    def stops(self) -> tuple:
        raise NotImplementedError

    def score(self, idx: list[int], texts: list[str], out) -> tuple[np.ndarray, dict]:
        """Rewards [len(idx) * G] (group-major) and extra per-step metrics."""
        raise NotImplementedError

    def adv_weights(self, idx: list[int]) -> np.ndarray:
        """Per-row advantage weights (RLPT's lambda on MSR rows); ones by default."""
        return np.ones(len(idx) * self.v.group_size, np.float32)

    def before_rl(self, params):
        """Hook before the RL state is created on a fresh run (RLPT's cold-start SFT)."""
        return params

    def evaluate(self, step: int) -> dict:
        return {}

    def has_eval(self) -> bool:
        return False

    # -- shared machinery
    def _ids(self, i: int) -> list[int]:
        if i not in self.prompt_ids:
            ids = self.tokenizer.encode(self.prompt(self.tasks[i]))
            self.prompt_ids[i] = ids or [self.tokenizer.bos_id]
        return self.prompt_ids[i]

    def rollout(self, idx: list[int], key):
        prompts = [self._ids(i) for i in idx]
        self.sampler.params = self.state.params
        t0 = time.perf_counter()
        out = self.sampler.generate_tokens(
            prompts,
            max_new_tokens=self.v.max_new_tokens,
            sampling=self.sampling,
            key=key,
            num_samples=self.v.group_size,
            stop_strings=list(self.stops),
        )
        texts = [
            self.tokenizer.decode([int(t) for t in out.tokens[r, : int(out.lengths[r])]])
            for r in range(len(prompts) * self.v.group_size)
        ]
        return prompts, out, texts, time.perf_counter() - t0

    def update(self, prompts, out, rewards, weights):
        t0 = time.perf_counter()
        rows = rollout_rows(prompts, out, self.v.group_size, self.tokenizer.pad_id)
        rows["rewards"] = rewards
        rows["adv_weight"] = weights
        rows["old_logp"] = np.zeros_like(rows["resp_mask"])
        batch = put_global(rows, self.b_shard)  # every process holds all rows and places its shards
        if self.v.updates_per_batch > 1:
            batch["old_logp"] = self._old_logp(self.state.params, batch)
        ms = []
        for _ in range(self.v.updates_per_batch):
            self.state, m = self._update(self.state, self.ref_params, batch)
            ms.append(m)
        m = {k: float(np.mean([float(x[k]) for x in ms])) for k in ms[0]}
        return m, time.perf_counter() - t0

    def run(self) -> dict:
        cfg, v = self.cfg, self.v
        write_run_metadata(self.out_dir, cfg, self.model_cfg, self.tokenizer)
        writer = MetricsWriter(self.out_dir, self.start, cfg.train.wandb_project)
        bar = None
        if cfg.train.progress and is_main_process():
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.start, desc=self.mode, unit="step", dynamic_ncols=True)
        last: dict = {}
        last_good = self.start or None
        base_key = jax.random.key(cfg.train.seed)
        kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
        try:
            if self.start == 0 and self.has_eval() and cfg.train.eval_every:
                writer.write(0, self.evaluate(0))
            for step in range(self.start + 1, cfg.train.steps + 1):
                idx = task_batch(len(self.tasks), self.cursor, v.prompts_per_step, cfg.train.seed)
                prompts, out, texts, t_roll = self.rollout(idx, jax.random.fold_in(base_key, step))
                t1 = time.perf_counter()
                rewards, extra = self.score(idx, texts, out)
                t_rew = time.perf_counter() - t1
                m, t_upd = self.update(prompts, out, rewards, self.adv_weights(idx))
                raise_if_nonfinite(m, step, last_good, self.out_dir)
                self.cursor += v.prompts_per_step
                groups = rewards.reshape(-1, v.group_size)
                gen_tokens = int(np.sum(out.lengths))
                total = t_roll + t_rew + t_upd
                m.update(
                    {
                        "reward": float(rewards.mean()),
                        "solved_prompts": float((groups.max(1) > 0).mean()),
                        "zero_signal_groups": float((groups.std(1) == 0).mean()),
                        "response_len": float(np.mean(out.lengths)),
                        "rollout_tokens_per_s": gen_tokens / max(t_roll, 1e-9),
                        "rollout_s": t_roll,
                        "reward_s": t_rew,
                        "update_s": t_upd,
                        "step_s": total,
                        "reward_share": t_rew / max(total, 1e-9),
                        "lr": float(self.lr_at(step * v.updates_per_batch)),
                        **extra,
                    }
                )
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and self.has_eval():
                    m.update(self.evaluate(step))
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    writer.write(step, m)
                last = m
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                    self.ckpt.save(step, self.state, {"cursor": self.cursor}, {"step": step, "mode": self.mode})
                    last_good = step
                if kill_after and step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                if bar:
                    bar.update(1)
                    bar.set_postfix(reward=f"{m['reward']:.3f}", len=f"{m['response_len']:.0f}")
        finally:
            if bar:
                bar.close()
            self.ckpt.close()
            writer.close()
        return dict(last)

    def benchmark_eval(
        self,
        step: int,
        names,
        *,
        data_dir,
        mbpp_style: str,
        max_new_tokens: int,
        n_tasks: int,
        sandbox: Sandbox | ProcessSplitSandbox,
    ) -> dict:
        """Greedy pass@1 on the test splits of ``names`` (first ``n_tasks`` tasks; 0 = all)."""
        res = {}
        self.sampler.params = self.state.params
        greedy = SamplingParams(temperature=0.0)
        for name in names:
            tasks = load_benchmark(name, "test", data_dir=data_dir, tfds_dir=self.cfg.data.tfds_dir)
            tasks = tasks[:n_tasks] if n_tasks else tasks
            fmt = PromptFormat.create(name, mbpp_style, data_dir=data_dir)
            generate = sampler_generate(self.sampler, greedy, max_new_tokens, fmt.stops)
            rep = evaluate_model(
                generate,
                tasks,
                fmt,
                sandbox,
                n_samples=1,
                temperature=0.0,
                ks=(1,),
                batch_tasks=self.v.prompts_per_step,
                out_dir=os.path.join(self.out_dir, "eval", f"step_{step}", name.replace("+", "_plus"))
                if is_main_process()
                else None,
                progress=False,
            )
            res[f"eval/{name}/pass@1"] = rep.pass_at[1]
        return res


class ProcessSplitSandbox:
    """A sandbox's ``run_many`` with the programs shared out over the processes of a multi-process run
    (``distributed.split_work``); every process gets every result. ``local`` counts this process's share."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox, self.local = sandbox, 0

    def run_many(self, jobs, limits=None, progress=None) -> list[ExecResult]:
        per_job = [limits] * len(jobs) if limits is None or isinstance(limits, Limits) else list(limits)

        def mine(rows):
            self.local += len(rows)
            res = self.sandbox.run_many([jobs[i] for i in rows], [per_job[i] for i in rows], progress)
            return [r.to_json() for r in res]

        return [ExecResult(**r) for r in split_work(len(jobs), mine)]


class RLVRTrainer(GRPOTrainer):
    """GRPO on code problems; reward 1 when every unit test passes in the sandbox."""

    mode = "rlvr"

    def __init__(self, cfg: RunConfig):
        self.sandbox = ProcessSplitSandbox(
            Sandbox(Limits(timeout_s=cfg.rlvr.timeout_s, memory_mb=cfg.rlvr.memory_mb), workers=cfg.rlvr.sandbox_workers)
        )
        super().__init__(cfg, cfg.rlvr)

    def load_tasks(self):
        tasks, self.fmt = load_training_tasks(self.cfg)
        return tasks

    def prompt(self, task) -> str:
        return self.fmt.prompt(task)

    @property
    def stops(self) -> tuple:
        return tuple(self.fmt.stops)

    def score(self, idx, texts, out):
        G = self.v.group_size
        jobs = [self.fmt.program(self.tasks[idx[r // G]], cut_at_stops(texts[r], self.stops)) for r in range(len(texts))]
        before = self.sandbox.local
        res = self.sandbox.run_many(jobs)  # this process runs its share (all in a 1-process run)
        rewards = np.array([1.0 if r.passed else 0.0 for r in res], np.float32)
        return rewards, {
            "pass_rate": float(rewards.mean()),
            "sandbox_timeouts": float(sum(r.status == "timeout" for r in res)),
            "sandbox_programs_local": float(self.sandbox.local - before),
        }

    def has_eval(self) -> bool:
        return bool(self.v.eval_benchmarks)

    def evaluate(self, step: int) -> dict:
        return self.benchmark_eval(
            step,
            self.v.eval_benchmarks,
            data_dir=benchmark_dir(self.v.data_dir),
            mbpp_style=self.v.mbpp_style,
            max_new_tokens=self.v.eval_max_new_tokens,
            n_tasks=self.v.eval_tasks,
            sandbox=self.sandbox,
        )


def rlvr(cfg: RunConfig) -> dict:
    return RLVRTrainer(cfg).run()
