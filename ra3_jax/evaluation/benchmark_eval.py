"""Greedy pass@1 of a policy on code benchmarks during training (RLVR and RLPT evaluate through this)."""

from __future__ import annotations

import os

from ra3_jax.data.code_benchmarks import benchmark_dir, load_benchmark
from ra3_jax.distributed import is_main_process
from ra3_jax.evaluation.code_eval import PromptFormat, evaluate_model, sampler_generate
from ra3_jax.sampler import Greedy


def greedy_pass_at_1(sampler, params, cfg, sandbox, *, out_dir: str, batch_tasks: int) -> dict:
    """``eval/<name>/pass@1`` on the test split of each of ``cfg.eval.benchmarks`` (first ``cfg.eval.tasks`` tasks;
    0 = all); per-task results under ``out_dir/<name>`` (process 0 writes)."""
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
            out_dir=os.path.join(out_dir, name.replace("+", "_plus")) if is_main_process() else None,
            progress=False,
        )
        res[f"eval/{name}/pass@1"] = rep.pass_at[1]
    return res
