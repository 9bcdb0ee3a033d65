"""The GRPO loop shared by RLVR and RLPT: rollouts from the stateless sampler, rewards from an environment, and
the GRPO objective in the one update core, run by the one host loop.

One RL step:
1. rollout: ``policy.prompts_per_step`` task prompts, G = ``policy.group_size`` samples each (one shared prefill
   per prompt), cut at the environment's stop strings;
2. reward: the environment scores each completion (RLVR: unit tests in the sandbox; RLPT: next-segment match);
3. update: group advantages (GRPO / RLOO / Dr.GRPO), the clipped-ratio surrogate over response tokens (token- or
   sequence-mean), optional k1/k3 KL to the frozen start model; ``updates_per_batch`` AdamW steps.
Checkpoints (Orbax) hold the policy state and the task cursor; a resumed run repeats the same rollouts.
An algorithm is an :class:`Environment` (tasks, prompts, stops, rewards, evaluation), as tunix plugs a loss into
one trainer; it never brings its own loop, progress, checkpoint or resume code.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ra3_jax import sharding
from ra3_jax.config import PolicySection, RunConfig
from ra3_jax.data.pipeline import pad_rows
from ra3_jax.distributed import put_global
from ra3_jax.errors import TrainingError
from ra3_jax.model.attention import traced_on
from ra3_jax.model.llama import LlamaConfig, forward
from ra3_jax.model.params import param_shardings
from ra3_jax.objectives.ntp import token_logprobs
from ra3_jax.objectives.pg import group_advantages, kl_estimate, policy_gradient_loss
from ra3_jax.sampler import Sampler, bucket, sampling_method
from ra3_jax.train.context import RunContext, check_rows
from ra3_jax.train.loop import Loop, run_loop
from ra3_jax.train.ntp import restore_or_create
from ra3_jax.train.state import TrainState, learning_rate_schedule, make_optimizer, state_shardings
from ra3_jax.train.step import Objective, jit_update_step, update_step

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "resp_mask", "old_logp")


# ------------------------------------------------------------------------------------------- the objective
def grpo_objective(
    cfg: LlamaConfig,
    *,
    G: int,
    clip_eps: float,
    advantage: str,
    kl_coef: float,
    kl_estimator: str,
    aggregation: str,
    on_policy: bool,
) -> Objective:
    """GRPO surrogate over response tokens. Rows are group-major: row n*G + g is sample g of prompt n. Every term
    is normalized by the whole batch's token / row count, so micro-batching does not change the step."""

    def prepare(batch, ref_params):
        rows = {k: v for k, v in batch.items() if k != "rewards"}
        rows["adv"] = group_advantages(batch["rewards"], G, advantage)
        if "adv_weight" in batch:  # per-row weights (RLPT: lambda on MSR rows)
            rows["adv"] = rows["adv"] * rows.pop("adv_weight")
        norm = (jnp.maximum(batch["resp_mask"].sum(), 1.0), batch["resp_mask"].shape[0])
        return rows, norm, {}

    def loss(params, b, norm, ref_params):
        denom, n_rows = norm
        mask = b["resp_mask"]
        logits, _ = forward(params, b["inputs"], b["positions"], cfg, segment_ids=b["segment_ids"])
        logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lp = jnp.take_along_axis(logp_all, b["targets"][..., None], axis=-1)[..., 0]
        old = jax.lax.stop_gradient(lp) if on_policy else b["old_logp"]
        pg = policy_gradient_loss(lp, old, b["adv"], mask, clip_eps=clip_eps, aggregation=aggregation)
        pg = pg * (jnp.maximum(mask.sum(), 1.0) / denom if aggregation == "token" else mask.shape[0] / n_rows)
        ent = jax.lax.stop_gradient(-(jnp.exp(logp_all) * logp_all).sum(-1))
        clipped = (jnp.abs(jnp.exp(lp - old) - 1.0) > clip_eps) * mask
        kl_sum = jnp.zeros(())
        if ref_params is not None:
            ref_lp = jax.lax.stop_gradient(token_logprobs(ref_params, b, cfg))
            kl_sum = (kl_estimate(lp, ref_lp, kl_estimator) * mask).sum()
        sums = {"entropy": (ent * mask).sum(), "clip_frac": clipped.sum(), "kl": kl_sum}
        return pg + kl_coef * kl_sum / denom, sums

    def finish(sums, norm, prep):
        return {k: v / norm[0] for k, v in sums.items()}

    return Objective(loss=loss, prepare=prepare, finish=finish)


def grpo_update(state: TrainState, ref_params, batch, *, cfg: LlamaConfig, tx, micro_batch: int = 0, **objective):
    """One policy step on a rollout batch (``micro_batch`` rows at a time; 0 = all at once); ``objective``: the
    keyword arguments of ``grpo_objective``."""
    N = batch["resp_mask"].shape[0]
    mb = micro_batch or N
    if N % mb:
        raise ValueError(f"micro_batch={mb} must divide the {N} rows of a step")
    obj = grpo_objective(cfg, **objective)
    return update_step(state, batch, ref_params, objective=obj, tx=tx, micro_batches=N // mb)


def rollout_rows(prompts: list[list[int]], out, G: int, pad: int) -> dict:
    """Host rows prompt + response for the update; resp_mask marks response targets. Length bucketed."""
    seqs, masks = [], []
    for r in range(len(prompts) * G):
        p, k = prompts[r // G], int(out.lengths[r])
        seqs.append(list(p) + [int(t) for t in out.tokens[r, :k]])
        masks.append([0] * len(p) + [1] * k)
    rows, m = pad_rows(seqs, bucket(max(len(x) for x in seqs) - 1), pad, {"resp": masks})
    return {**rows, "resp_mask": m["resp"]}


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


# ------------------------------------------------------------------------------------------ the environment
class Environment:
    """What an RL algorithm supplies to the GRPO loop."""

    name = "grpo"
    tasks: list
    stops: tuple = ()

    def prompt(self, task) -> str:
        raise NotImplementedError

    def score(self, idx: list[int], texts: list[str], out) -> tuple[np.ndarray, dict]:
        """Rewards [len(idx) * G] (group-major) and extra per-step metrics."""
        raise NotImplementedError

    def adv_weights(self, idx: list[int], G: int) -> np.ndarray:
        """Per-row advantage weights (RLPT's lambda on MSR rows); ones by default."""
        return np.ones(len(idx) * G, np.float32)

    def has_eval(self) -> bool:
        return False

    def evaluate(self, sampler: Sampler, params, step: int, out_dir: str) -> dict:
        return {}


# ---------------------------------------------------------------------------------------------- the trainer
@dataclasses.dataclass
class GRPOState:
    """What a GRPO run carries from step to step (and checkpoints): the policy state and the task cursor."""

    train: TrainState
    cursor: int


class GRPOTrainer:
    """Rollout, reward and update of one GRPO step; ``run_grpo`` drives it through the host loop."""

    def __init__(self, ctx: RunContext, env: Environment, ref_params=None):
        self.ctx, self.env, self.pol = ctx, env, ctx.cfg.policy
        self.sampler = Sampler(ctx.model_cfg, ctx.tokenizer)
        self.sampling = sampling_method(self.pol.temperature, self.pol.top_k, self.pol.top_p)
        self.ref_params = ref_params
        self._prompt_ids: dict[int, list[int]] = {}
        steps = ctx.cfg.train.steps * self.pol.updates_per_batch
        self.tx = make_optimizer(ctx.cfg.optim, steps)
        self.lr_at = learning_rate_schedule(ctx.cfg.optim, steps)
        self.st_shard = state_shardings(ctx.model_cfg, self.tx, ctx.mesh)
        rows_shard, vec_shard = sharding.batch_sharding(ctx.mesh, 2), sharding.batch_sharding(ctx.mesh, 1)
        self.b_shard = {**{k: rows_shard for k in ROW_KEYS}, "rewards": vec_shard, "adv_weight": vec_shard}
        p_shard = param_shardings(ctx.model_cfg, ctx.mesh)
        self._update = jit_update_step(
            self._objective(),
            self.tx,
            self._micro_batches(),
            self.st_shard,
            self.b_shard,
            (p_shard if ref_params is not None else None,),
            mesh=ctx.mesh,
        )
        old_logp = traced_on(ctx.mesh, lambda p, b: token_logprobs(p, b, ctx.model_cfg))
        self._old_logp = jax.jit(old_logp, in_shardings=(p_shard, None))

    def _objective(self) -> Objective:
        p = self.pol
        return grpo_objective(
            self.ctx.model_cfg,
            G=p.group_size,
            clip_eps=p.clip_eps,
            advantage=p.advantage,
            kl_coef=p.kl_coef,
            kl_estimator=p.kl_estimator,
            aggregation=p.loss_aggregation,
            on_policy=p.updates_per_batch == 1,
        )

    def _micro_batches(self) -> int:
        rows = self.pol.prompts_per_step * self.pol.group_size
        return rows // self.pol.micro_batch if self.pol.micro_batch else 1

    def prompt_ids(self, i: int) -> list[int]:
        if i not in self._prompt_ids:
            ids = self.ctx.tokenizer.encode(self.env.prompt(self.env.tasks[i]))
            self._prompt_ids[i] = ids or [self.ctx.tokenizer.bos_id]
        return self._prompt_ids[i]

    def rollout(self, params, idx: list[int], key):
        prompts = [self.prompt_ids(i) for i in idx]
        t0 = time.perf_counter()
        out = self.sampler.generate_tokens(
            params,
            prompts,
            max_new_tokens=self.pol.max_new_tokens,
            sampling=self.sampling,
            key=key,
            num_samples=self.pol.group_size,
            stop_strings=list(self.env.stops),
        )
        n = len(prompts) * self.pol.group_size
        texts = [self.ctx.tokenizer.decode([int(t) for t in out.tokens[r, : int(out.lengths[r])]]) for r in range(n)]
        return prompts, out, texts, time.perf_counter() - t0

    def update(self, state: TrainState, prompts, out, rewards, weights):
        t0 = time.perf_counter()
        rows = rollout_rows(prompts, out, self.pol.group_size, self.ctx.tokenizer.pad_id)
        rows.update(rewards=rewards, adv_weight=weights, old_logp=np.zeros_like(rows["resp_mask"]))
        batch = put_global(rows, self.b_shard)  # every process holds all rows and places its shards
        if self.pol.updates_per_batch > 1:
            batch["old_logp"] = self._old_logp(state.params, batch)
        ms = []
        for _ in range(self.pol.updates_per_batch):
            state, m = self._update(state, batch, self.ref_params)
            ms.append(m)
        m = {k: float(np.mean([float(x[k]) for x in ms])) for k in ms[0]}
        return state, m, time.perf_counter() - t0

    def step(self, st: GRPOState, step: int) -> tuple[GRPOState, dict]:
        """One RL step: rollout, reward, update; host metrics."""
        G, seed = self.pol.group_size, self.ctx.cfg.train.seed
        idx = task_batch(len(self.env.tasks), st.cursor, self.pol.prompts_per_step, seed)
        key = jax.random.fold_in(jax.random.key(seed), step)
        prompts, out, texts, t_roll = self.rollout(st.train.params, idx, key)
        t1 = time.perf_counter()
        rewards, extra = self.env.score(idx, texts, out)
        t_rew = time.perf_counter() - t1
        train, m, t_upd = self.update(st.train, prompts, out, rewards, self.env.adv_weights(idx, G))
        groups = rewards.reshape(-1, G)
        total = t_roll + t_rew + t_upd
        m.update(
            reward=float(rewards.mean()),
            solved_prompts=float((groups.max(1) > 0).mean()),
            zero_signal_groups=float((groups.std(1) == 0).mean()),
            response_len=float(np.mean(out.lengths)),
            rollout_tokens_per_s=int(np.sum(out.lengths)) / max(t_roll, 1e-9),
            rollout_s=t_roll,
            reward_s=t_rew,
            update_s=t_upd,
            step_s=total,
            reward_share=t_rew / max(total, 1e-9),
            lr=float(self.lr_at(step * self.pol.updates_per_batch)),
            **extra,
        )
        return GRPOState(train, st.cursor + self.pol.prompts_per_step), m

    def evaluate(self, st: GRPOState, step: int) -> dict:
        return self.env.evaluate(self.sampler, st.train.params, step, self.ctx.out_dir)


def check_policy_rows(pol: PolicySection, mesh) -> None:
    rows = pol.prompts_per_step * pol.group_size
    check_rows(rows, mesh, "policy.prompts_per_step x group_size")
    if pol.micro_batch:
        if rows % pol.micro_batch:
            raise TrainingError(f"policy.micro_batch={pol.micro_batch} must divide the {rows} rows of a step")
        check_rows(pol.micro_batch, mesh, "policy.micro_batch")


def run_grpo(ctx: RunContext, env: Environment, before_rl=None) -> dict:
    """The GRPO run: restore (policy state + task cursor) or start fresh (``before_rl(params)`` first, e.g. RLPT's
    cold-start SFT), then ``train.steps`` RL steps through the host loop. Returns the last metrics."""
    cfg: RunConfig = ctx.cfg
    check_policy_rows(cfg.policy, ctx.mesh)
    if not env.tasks:
        raise TrainingError(f"{env.name} has no training tasks")
    ref_params = ctx.params if cfg.policy.kl_coef > 0 else None
    trainer = GRPOTrainer(ctx, env, ref_params)
    if before_rl is not None and ctx.ckpt.pick_step(cfg.train.resume_step) is None:  # a fresh run (checked first)
        ctx.params = before_rl(ctx.params)
    train_state, start = restore_or_create(ctx, trainer.tx)
    cursor = int(ctx.ckpt.restore_data(start)["cursor"]) if start else 0
    writer = ctx.start_run(start)

    def save(st: GRPOState, step: int):
        ctx.ckpt.save(step, st.train, {"cursor": st.cursor}, {"step": step, "mode": env.name})

    loop = Loop.for_run(
        env.name,
        start,
        cfg.train.steps,
        ctx.out_dir,
        writer,
        cfg.train,
        evaluate=trainer.evaluate if env.has_eval() else None,
        save=save,
        postfix=lambda m: {"reward": f"{m['reward']:.3f}", "len": f"{m['response_len']:.0f}"},
    )
    st = GRPOState(train_state, cursor)
    try:
        if start == 0 and env.has_eval() and cfg.train.eval_every:
            writer.write(0, trainer.evaluate(st, 0))
        st, last = run_loop(loop, st, trainer.step)
    finally:
        ctx.ckpt.close()
        writer.close()
    return {**last, "step": int(jax.device_get(st.train.step)), "resumed_from": start, "task_cursor": st.cursor}
