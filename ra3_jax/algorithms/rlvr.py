"""RLVR: GRPO on code problems with unit-test rewards from the sandbox (docs/RLVR.md).

The environment: tasks are a benchmark split (``rlvr.benchmark`` / ``rlvr.split``) or a JSONL task file; a
completion's reward is 1 if every unit test passes in the sandbox, else 0. Every ``train.eval_every`` steps (and at
step 0) greedy pass@1 on ``eval.benchmarks`` is logged. The loop, update and checkpoints are ``algorithms/grpo.py``.
"""

from __future__ import annotations

import os

import numpy as np

from ra3_jax.algorithms.grpo import Environment, run_grpo
from ra3_jax.config import RunConfig
from ra3_jax.data.code_benchmarks import benchmark_dir, humaneval_task, jsonl_rows, load_benchmark
from ra3_jax.errors import TrainingError
from ra3_jax.evaluation.benchmark_eval import greedy_pass_at_1
from ra3_jax.evaluation.code_eval import HUMANEVAL_STOPS, PromptFormat, TaskFormat, cut_at_stops
from ra3_jax.execution import Limits, ProcessSplitSandbox, Sandbox
from ra3_jax.train.context import build_run_context


def read_task_file(path: str) -> list[dict]:
    """Tasks of a JSONL file of {task_id, prompt, test[, prefix]} (one clear error per bad line). A row with an
    ``entry_point`` is HumanEval format (``ra3 eval --benchmark jsonl:PATH``'s): its test gets ``check(entry_point)``
    appended (``data/code_benchmarks.py::humaneval_task``)."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise TrainingError(f"rlvr.tasks_file not found: {path}")
    tasks = []
    for i, t in jsonl_rows(path, TrainingError):
        if not isinstance(t, dict):
            raise TrainingError(f"{path}:{i}: a task must be a JSON object, got {type(t).__name__}")
        if "entry_point" in t:
            tasks.append(humaneval_task(t, f"{path}:{i}"))
            continue
        missing = {"prompt", "test"} - set(t)
        if missing:
            raise TrainingError(f"{path}:{i}: task lacks {sorted(missing)} (needs prompt and test)")
        task = {"task_id": str(t.get("task_id", i)), "prompt": t["prompt"], "test": t["test"]}
        tasks.append({**task, "prefix": t.get("prefix", t["prompt"])})
    return tasks


def load_training_tasks(cfg: RunConfig):
    """(tasks, format) for training: a benchmark split or a JSONL task file."""
    v = cfg.rlvr
    if v.tasks_file:
        tasks, fmt = read_task_file(v.tasks_file), TaskFormat("custom", tuple(HUMANEVAL_STOPS))
    else:
        data_dir = benchmark_dir(cfg.data.benchmark_dir)
        tasks = load_benchmark(v.benchmark, v.split, data_dir=data_dir, tfds_dir=cfg.data.tfds_dir)
        fmt = PromptFormat.create(v.benchmark, cfg.data.mbpp_style, data_dir=data_dir)
    return (tasks[: v.max_tasks] if v.max_tasks else tasks), fmt


class RLVREnv(Environment):
    """Code problems; reward 1 when every unit test passes in the sandbox."""

    name = "rlvr"

    def __init__(self, cfg: RunConfig, tasks: list, fmt, sandbox: ProcessSplitSandbox):
        self.cfg, self.tasks, self.fmt, self.sandbox = cfg, tasks, fmt, sandbox
        self.stops = tuple(fmt.stops)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RLVREnv:
        tasks, fmt = load_training_tasks(cfg)
        limits = Limits(timeout_s=cfg.rlvr.timeout_s, memory_mb=cfg.rlvr.memory_mb)
        return cls(cfg, tasks, fmt, ProcessSplitSandbox(Sandbox(limits, workers=cfg.rlvr.sandbox_workers)))

    def prompt(self, task) -> str:
        return self.fmt.prompt(task)

    def score(self, idx, texts, out):
        G = self.cfg.policy.group_size
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
        return bool(self.cfg.eval.benchmarks)

    def evaluate(self, sampler, params, step, out_dir):
        return greedy_pass_at_1(
            sampler,
            params,
            self.cfg,
            self.sandbox,
            out_dir=os.path.join(out_dir, "eval", f"step_{step}"),
            batch_tasks=self.cfg.policy.prompts_per_step,
        )


def rlvr(cfg: RunConfig) -> dict:
    """``ra3 rlvr``: GRPO with sandbox rewards; resumable from ``train.out_dir``."""
    env = RLVREnv.from_config(cfg)
    return run_grpo(build_run_context(cfg), env)
