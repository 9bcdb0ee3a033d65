"""Code benchmarks as ``ra3 eval`` runs them (reference-solution self-check, sandbox, summary) and greedy pass@1 of a
policy during training (RLVR and RLPT evaluate through this). A benchmark is a name of ``BENCHMARKS`` or
``jsonl:PATH`` (a HumanEval-format task file)."""

from __future__ import annotations

import os

from ra3_jax.data.code_benchmarks import benchmark_dir, benchmark_slug, is_jsonl_benchmark, load_benchmark
from ra3_jax.distributed import is_main_process
from ra3_jax.errors import InputError
from ra3_jax.evaluation.code_eval import DEFAULT_LIMITS, EvalReport, PromptFormat, evaluate_model, sampler_generate
from ra3_jax.execution import Limits, Sandbox
from ra3_jax.sampler import Greedy

TASK_FILE_LIMITS = Limits(timeout_s=10)  # a jsonl:PATH benchmark's sandbox limits (HumanEval's)


def canonical_generate(tasks: list[dict], fmt):
    """``generate(prompts, n)`` answering each task's prompt with its reference solution (the harness self-check);
    under a forced prefix, the reference less that prefix where it starts with it."""
    missing = [t["task_id"] for t in tasks if not t.get("canonical_solution")]
    if missing:
        raise InputError(
            f"--canonical needs each task's canonical_solution; {len(missing)} tasks have none (first: {missing[0]})"
        )
    prefix = getattr(fmt, "forced_prefix", "")
    by_prompt = {fmt.prompt(t): t["canonical_solution"].removeprefix(prefix) for t in tasks}
    return lambda prompts, n: [[by_prompt[p]] * n for p in prompts]


def eval_sandbox(benchmark: str, timeout: float = 0, workers: int = 2) -> tuple[Sandbox, Limits | None]:
    """(sandbox, limits for every program) of ``ra3 eval``: ``timeout`` > 0 is one wall limit for every program;
    else each task gets ``task_limits`` (None)."""
    base = DEFAULT_LIMITS.get(benchmark, TASK_FILE_LIMITS)
    limits = Limits(timeout_s=timeout, memory_mb=base.memory_mb) if timeout else None
    return Sandbox(limits or base, workers=workers), limits


def eval_summary(rep: EvalReport, out: str, sandbox: Sandbox, prompt_format: str) -> dict:
    """The JSON summary ``ra3 eval`` prints."""
    return {
        "out": os.path.abspath(out),
        "benchmark": rep.benchmark,
        "prompt_format": prompt_format,
        "mode": rep.mode,
        "forced_prefix": rep.forced_prefix,
        "pass_at": rep.pass_at,
        "think_rate": rep.think_rate,
        "status": rep.status_counts,
        "sample_s": round(rep.sample_s, 2),
        "check_s": round(rep.check_s, 2),
        "programs_per_s": round(rep.programs_per_s, 2),
        "sandbox_isolated": sandbox.isolated,
    }


def greedy_pass_at_1(sampler, params, cfg, sandbox, *, out_dir: str, batch_tasks: int) -> dict:
    """``eval/<name>/pass@1`` on the test split of each of ``cfg.eval.benchmarks`` (first ``cfg.eval.tasks`` tasks;
    0 = all); per-task results under ``out_dir/<slug>`` (process 0 writes). A ``jsonl:PATH`` entry logs as
    ``eval/jsonl_<stem>/pass@1`` and ``eval/jsonl_<stem>/think_rate``."""
    data_dir = benchmark_dir(cfg.data.benchmark_dir)
    res = {}
    for name in cfg.eval.benchmarks:
        tasks = load_benchmark(name, "test", data_dir=data_dir, tfds_dir=cfg.data.tfds_dir)
        tasks = tasks[: cfg.eval.tasks] if cfg.eval.tasks else tasks
        fmt = PromptFormat.create(name, cfg.data.mbpp_style, data_dir=data_dir)
        generate = sampler_generate(sampler, params, Greedy(), cfg.eval.max_new_tokens, fmt.stops)
        rep = evaluate_model(
            generate,
            tasks,
            fmt,
            sandbox,
            n_samples=1,
            temperature=0.0,
            ks=(1,),
            batch_tasks=batch_tasks,
            out_dir=os.path.join(out_dir, benchmark_slug(name)) if is_main_process() else None,
            progress=False,
        )
        key = benchmark_slug(name) if is_jsonl_benchmark(name) else name
        res[f"eval/{key}/pass@1"] = rep.pass_at[1]
        if is_jsonl_benchmark(name):
            res[f"eval/{key}/think_rate"] = rep.think_rate
    return res
