"""CPU seconds of each HumanEval+/MBPP+ reference solution's check (the program the sandbox runs for it), one
interpreter per task, serially; prints the tasks at or above --min as the ``REFERENCE_CPU_S`` table of
ra3_jax/evaluation/code_eval.py.
Usage: python benchmarks/reference_times.py [--data-dir ../shared/data] [--min 1.0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from ra3_jax.data.code_benchmarks import read_tasks


def cpu_seconds(program: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-"], input=program.encode(), capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"reference failed its own check:\n{r.stderr.decode()[-2000:]}")
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--min", type=float, default=1.0)
    args = ap.parse_args()
    table = {}
    for name in ("humaneval+", "mbpp+"):
        tasks = [t for split in read_tasks(name, args.data_dir).values() for t in split]
        times = {t["task_id"]: cpu_seconds(t["prefix"] + t["canonical_solution"] + "\n" + t["test"]) for t in tasks}
        table[name] = {k: round(v, 1) for k, v in sorted(times.items(), key=lambda kv: -kv[1]) if v >= args.min}
        print(f"{name}: {len(tasks)} tasks, {sum(times.values()):.1f} CPU s in all", file=sys.stderr)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
