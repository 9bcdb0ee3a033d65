"""Evaluation of one chains arm (CHAINS.md): pass@1 by k and inference mode, greedy and sampled, think rate and
thought-step accuracy, every program checked in the project's sandbox.

Rows (one per mode x decoding x k) go to ``<arm>/eval/rows.jsonl``; the experiment's ``results.jsonl`` is their
concatenation over arms and seeds (``chains_report`` reads it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from ra3_jax.data.chains import parse_prompt
from ra3_jax.data.code_benchmarks import humaneval_task
from ra3_jax.evaluation.code_eval import PromptFormat, evaluate_model, sampler_generate
from ra3_jax.evaluation.forcing import forced_format, thought_line
from ra3_jax.evaluation.passk import pass_at_k
from ra3_jax.execution import Limits, Sandbox

CHAINS_LIMITS = Limits(timeout_s=5.0, memory_mb=512)
_STEP = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")


def step_accuracy(prompt: str, thought: str) -> float:
    """Fraction of the chain's k steps written correctly (step i is ``v_{i-1}{op}{d}={v_i}``; missing = wrong)."""
    chain = parse_prompt(prompt)
    v = chain.values()
    truth = [f"{v[i]}{op}{d}={v[i + 1]}" for i, (op, d) in enumerate(chain.ops)]
    written = thought.split()
    return sum(w == t for w, t in zip(written, truth)) / len(truth)


@dataclasses.dataclass(frozen=True)
class Decoding:
    name: str  # "greedy" | "t0.8"
    temperature: float
    n: int


def decodings(samples: int, temperature: float) -> list[Decoding]:
    out = [Decoding("greedy", 0.0, 1)]
    if samples > 0:
        out.append(Decoding(f"t{temperature:g}", temperature, samples))
    return out


def rows_by_k(results: list[dict], tasks: list[dict], prefix: str, dec: Decoding) -> list[dict]:
    """Per-k summary rows of one (mode, decoding) evaluation's per-sample results."""
    by_id = {t["task_id"]: t for t in tasks}
    per: dict[int, dict[str, list]] = {}
    for r in results:
        task = by_id[r["task_id"]]
        d = per.setdefault(task["k"], {"passed": {}, "think": [], "acc": []})
        d["passed"].setdefault(r["task_id"], []).append(bool(r["passed"]))
        body = thought_line(prefix + r["completion"])
        d["think"].append(body is not None)
        if body is not None:
            d["acc"].append(step_accuracy(task["prompt"], body))
    rows = []
    for k in sorted(per):
        d = per[k]
        counts = [(len(v), sum(v)) for v in d["passed"].values()]
        row = {"k": k, "n_tasks": len(counts), "pass@1": float(np.mean([pass_at_k(n, c, 1) for n, c in counts]))}
        row["pass@10"] = float(np.mean([pass_at_k(n, c, 10) for n, c in counts])) if dec.n >= 10 else None
        row["think_rate"] = float(np.mean(d["think"]))
        row["step_acc"] = float(np.mean(d["acc"])) if d["acc"] else None
        rows.append(row)
    return rows


def evaluate_chains_model(
    sampler,
    params,
    tasks: list[dict],
    out_dir: str,
    *,
    modes=("free", "forced", "banned"),
    samples: int = 10,
    temperature: float = 0.8,
    max_new_tokens: int = 64,
    seed: int = 0,
    sandbox: Sandbox | None = None,
) -> list[dict]:
    """Every (mode, decoding) of CHAINS.md on ``tasks``; per-sample results under ``out_dir/<mode>_<decoding>/``.
    Returns the per-k rows (mode, decoding, k, n_tasks, pass@1, pass@10, think_rate, step_acc)."""
    import jax

    from ra3_jax.sampler import sampling_method

    sandbox = sandbox or Sandbox(CHAINS_LIMITS, workers=2)
    key, rows = jax.random.key(seed), []
    checked = [{**humaneval_task(t, t["task_id"]), "k": t["k"]} for t in tasks]  # the test calls check(f)
    for mode in modes:
        fmt = forced_format(PromptFormat.create("jsonl:chains"), mode)
        prefix = getattr(fmt, "forced_prefix", "")
        for dec in decodings(samples, temperature):
            key, sub = jax.random.split(key)
            gen = sampler_generate(sampler, params, sampling_method(dec.temperature), max_new_tokens, fmt.stops, sub)
            sub_dir = os.path.join(out_dir, f"{mode}_{dec.name}")
            evaluate_model(
                gen,
                checked,
                fmt,
                sandbox,
                n_samples=dec.n,
                temperature=dec.temperature,
                ks=(1, 10) if dec.n >= 10 else (1,),
                batch_tasks=max(1, 256 // dec.n),
                out_dir=sub_dir,
                limits=CHAINS_LIMITS,
            )
            with open(os.path.join(sub_dir, "results.jsonl"), encoding="utf-8") as f:
                results = [json.loads(line) for line in f if line.strip()]
            rows += [{"mode": mode, "decoding": dec.name, **r} for r in rows_by_k(results, tasks, prefix, dec)]
    return rows
