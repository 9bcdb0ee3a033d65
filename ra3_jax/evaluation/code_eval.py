"""pass@k evaluation of a model on HumanEval(+)/MBPP(+): prompts -> samples -> sandboxed checks -> report.

Prompt styles
- HumanEval(+): the benchmark prompt (signature + docstring); the completion is the function body and the
  program is ``prompt + completion``. Stops: Codex's ``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``.
- MBPP family, ``mbpp_style="docstring"`` (default, 0-shot, the evalplus format): a docstring holding the task
  text and its first test; the completion is the whole solution. ``"3shot"``: Austin et al.'s format with MBPP
  tasks 2, 3, 4 as examples, ``[BEGIN]``/``[DONE]`` delimiters (needs ``mbpp/mbpp.jsonl``).
- Chat (:class:`ChatFormat`, instruct models, evalplus' format): the task (the HumanEval prompt, or the MBPP
  docstring) in a fenced block after an instruction, through the model's chat template; the assistant's turn
  opened with evalplus' response prefix and a ```python fence. The program is the completion's first code block.
- ``jsonl:PATH`` (a HumanEval-format task file): as HumanEval. Forced completion prefixes: ``evaluation/forcing.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence

from ra3_jax.data.code_benchmarks import JSONL_PREFIX, check_benchmark_name, read_tasks
from ra3_jax.errors import InputError
from ra3_jax.evaluation.forcing import has_thought
from ra3_jax.evaluation.passk import mean_pass_at_k
from ra3_jax.execution import Job, Limits, Sandbox

HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
HUMANEVAL_STYLE = ("humaneval", JSONL_PREFIX)  # benchmarks prompted and checked as HumanEval
MBPP_DOCSTRING_STOPS = ('\n"""', "\nassert", "\nif __name__", "\nprint(", "\n```", "\n# Test", "\n# test")
MBPP_3SHOT_STOPS = ("[DONE]",)
# Per-benchmark sandbox limits. The "+" checks run each task's base and plus inputs in one program (MBPP+/255's
# own reference needs ~3 GB), so their budget is CPU seconds, which a loaded machine does not inflate; the wall
# limit (3x) only catches programs that sleep or block.
DEFAULT_LIMITS = {
    "humaneval": Limits(timeout_s=10),
    "mbpp": Limits(timeout_s=10),
    "mbpp_sanitized": Limits(timeout_s=10),
    "humaneval+": Limits(timeout_s=180, cpu_s=60, memory_mb=4096),
    "mbpp+": Limits(timeout_s=180, cpu_s=60, memory_mb=4096),
}
# CPU seconds of the reference solution's check, for the "+" tasks whose reference takes >= 1 s (measured on a
# 2-core x86 VM by benchmarks/reference_times.py). A task's budget is max(the benchmark's, REFERENCE_FACTOR x
# this), as evalplus scales its limits by the reference's time (gt_time_limit_factor 4): MBPP+/599's reference
# alone spends 35 s summing ranges of 1e8.
REFERENCE_FACTOR = 4.0
REFERENCE_CPU_S = {
    "humaneval+": {
        "HumanEval/15": 10.3,
        "HumanEval/139": 9.5,
        "HumanEval/130": 4.2,
        "HumanEval/83": 3.0,
        "HumanEval/36": 2.5,
        "HumanEval/94": 2.4,
        "HumanEval/59": 2.3,
    },
    "mbpp+": {
        "Mbpp/599": 35.3,
        "Mbpp/392": 7.9,
        "Mbpp/255": 6.3,
        "Mbpp/271": 6.2,
        "Mbpp/123": 3.9,
        "Mbpp/603": 3.7,
        "Mbpp/592": 2.9,
        "Mbpp/589": 2.7,
        "Mbpp/300": 2.2,
        "Mbpp/389": 2.0,
        "Mbpp/84": 1.7,
        "Mbpp/583": 1.6,
        "Mbpp/630": 1.5,
    },
}


def task_limits(benchmark: str, task_id: str) -> Limits | None:
    """The sandbox limits for one task's check: the benchmark's, with the CPU budget raised to
    ``REFERENCE_FACTOR`` x the reference solution's CPU time where that is larger (the wall limit kept >= 3x the
    CPU budget). None for a benchmark without defaults (the sandbox's own limits apply)."""
    base = DEFAULT_LIMITS.get(benchmark)
    ref = REFERENCE_CPU_S.get(benchmark, {}).get(task_id)
    if base is None or ref is None or REFERENCE_FACTOR * ref <= base.resolved()["cpu_s"]:
        return base
    cpu = int(math.ceil(REFERENCE_FACTOR * ref))
    return dataclasses.replace(base, cpu_s=cpu, timeout_s=max(base.timeout_s, 3.0 * cpu))


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    benchmark: str
    mbpp_style: str = "docstring"
    shots: tuple = ()  # (description, tests, code) for 3-shot

    @classmethod
    def create(cls, benchmark: str, mbpp_style: str = "docstring", data_dir=None) -> PromptFormat:
        check_benchmark_name(benchmark)
        if mbpp_style not in ("docstring", "3shot"):
            raise ValueError(f"mbpp_style must be 'docstring' or '3shot', got {mbpp_style!r}")
        shots = ()
        if benchmark.startswith("mbpp") and mbpp_style == "3shot":
            prompt_split = {r["task_id"]: r for r in read_tasks("mbpp", data_dir)["prompt"]}
            shots = tuple(
                (
                    prompt_split[f"Mbpp/{i}"]["description"],
                    _mbpp_tests(prompt_split[f"Mbpp/{i}"]),
                    prompt_split[f"Mbpp/{i}"]["canonical_solution"],
                )
                for i in (2, 3, 4)
            )
        return cls(benchmark, mbpp_style, shots)

    @property
    def stops(self) -> tuple[str, ...]:
        if self.benchmark.startswith(HUMANEVAL_STYLE):
            return HUMANEVAL_STOPS
        return MBPP_3SHOT_STOPS if self.mbpp_style == "3shot" else MBPP_DOCSTRING_STOPS

    def prompt(self, task: dict) -> str:
        if self.benchmark.startswith(HUMANEVAL_STYLE):
            return task["prompt"]
        if self.mbpp_style == "docstring":
            return f'"""\n{task["description"]}\n{task["example_test"]}\n"""\n'
        blocks = [_austin_block(d, t, c) for d, t, c in self.shots]
        tests = _mbpp_tests(task) if self.benchmark != "mbpp+" else task["example_test"]
        blocks.append(_austin_block(task["description"], tests, None))
        return "".join(blocks)

    def program(self, task: dict, completion: str) -> Job:
        """The sandbox job that checks ``completion`` (already cut at the stop strings)."""
        return Job(program=task["prefix"] + completion, test=task["test"])


@dataclasses.dataclass(frozen=True)
class TaskFormat:
    """User tasks ({task_id, prompt, test, prefix}): the prompt as is; program = prefix + completion."""

    benchmark: str
    stops: tuple = HUMANEVAL_STOPS

    def prompt(self, task: dict) -> str:
        return task["prompt"]

    def program(self, task: dict, completion: str) -> Job:
        return Job(program=task.get("prefix", task["prompt"]) + completion, test=task["test"])


# evalplus' chat prompt (codegen.py's instruction / response prefixes, make_raw_chat_prompt's layout).
CHAT_INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
CHAT_RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
CHAT_FENCE = "```python\n"  # the prompt ends with it: the completion starts inside the code block
CHAT_STOPS = ("\n```\n",)  # the closing fence (evalplus' extra stop for chat); end-of-turn tokens stop too
_SPLIT = "-[[]]-ra3-the-generation-starts-here-[[]]-"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Instruct models in chat format. ``render(messages)`` writes a conversation with the model's chat template
    (``tokenizer.apply_chat_template``, no generation prompt); the prompt is the conversation cut where the
    assistant's code starts."""

    base: PromptFormat  # the task text: HumanEval's prompt, MBPP's docstring
    render: Callable[[list[dict]], str]
    stops: tuple = CHAT_STOPS

    @property
    def benchmark(self) -> str:
        return self.base.benchmark

    def prompt(self, task: dict) -> str:
        user = f"{CHAT_INSTRUCTION}\n```\n{self.base.prompt(task).strip()}\n```\n"
        reply = f"{CHAT_RESPONSE}\n{CHAT_FENCE}{_SPLIT}\n```\n"
        text = self.render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
        if _SPLIT not in text:
            raise InputError("the chat template does not write the assistant's turn; use --prompt-format completion")
        return text.split(_SPLIT)[0]

    def program(self, task: dict, completion: str) -> Job:
        """The completion's code block (it continues the prompt's open fence) as the program: on its own (after
        the prompt's imports) when it defines the entry point, else continuing the task's prefix."""
        code = extract_code(CHAT_FENCE + completion)
        entry = task.get("entry_point") or ""
        if entry and re.search(rf"^def {re.escape(entry)}\b", code, re.M):
            imports = "".join(x + "\n" for x in task["prefix"].splitlines() if x.startswith(("import ", "from ")))
            return Job(program=imports + code, test=task["test"])
        return Job(program=task.get("prefix", "") + code, test=task["test"])


def make_format(
    benchmark: str, prompt_format: str = "completion", mbpp_style: str = "docstring", *, data_dir=None, tokenizer=None
):
    """The prompt format of ``ra3 eval --prompt-format``: ``completion`` (:class:`PromptFormat`) or ``chat``
    (:class:`ChatFormat` over ``tokenizer``'s chat template; MBPP asked with its docstring, never 3-shot)."""
    if prompt_format == "completion":
        return PromptFormat.create(benchmark, mbpp_style, data_dir=data_dir)
    if prompt_format != "chat":
        raise InputError(f"prompt format must be 'completion' or 'chat', got {prompt_format!r}")
    if mbpp_style != "docstring":
        raise InputError("the 3-shot MBPP style is a completion prompt; the chat format asks with the task's docstring")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the chat prompt format needs the model's chat template, and its tokenizer has none")
    from ra3_jax.tokenizer import apply_chat_template

    return ChatFormat(
        PromptFormat.create(benchmark), functools.partial(apply_chat_template, tokenizer, add_generation_prompt=False)
    )


_BLOCK = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.M | re.S)


def extract_code(text: str) -> str:
    """The first ```python (or bare ```) block of a Markdown reply; else its first block of any language; an
    unclosed fence runs to the end; a reply without a fence is all code."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _BLOCK.finditer(text)]
    python = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    return python[0] if python else blocks[0][1] if blocks else text


def _mbpp_tests(task: dict) -> str:
    return "\n".join(line for line in task["test"].splitlines() if line.startswith("assert"))


def _austin_block(desc, tests, code) -> str:
    head = f"You are an expert Python programmer, and here is your task: {desc} Your code should pass these tests:\n\n{tests}\n"
    return head + ("[BEGIN]\n" + (f"{code.strip()}\n[DONE]\n" if code is not None else ""))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The completion up to (not including) the earliest stop string."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


@dataclasses.dataclass
class EvalReport:
    benchmark: str
    n_tasks: int
    n_samples: int
    temperature: float
    pass_at: dict  # {k: value}
    status_counts: dict
    sample_s: float
    check_s: float
    programs_per_s: float
    think_rate: float = 0.0  # the fraction of samples whose forced prefix + completion holds a "# thought:" line
    mode: str = "free"  # the forced-prefix mode (evaluation/forcing.py) and its prefix
    forced_prefix: str = ""

    def table(self) -> str:
        ks = sorted(self.pass_at)
        head = "| benchmark | tasks | n | T | " + " | ".join(f"pass@{k}" for k in ks) + " |"
        sep = "|" + "---|" * (4 + len(ks))
        row = (
            f"| {self.benchmark} | {self.n_tasks} | {self.n_samples} | {self.temperature:g} | "
            + " | ".join(f"{100 * self.pass_at[k]:.2f}" for k in ks)
            + " |"
        )
        return "\n".join([head, sep, row])


def check_completions(
    tasks: list[dict],
    completions: list[list[str]],
    fmt: PromptFormat,
    sandbox: Sandbox,
    limits: Limits | None = None,
    progress: str | None = None,
):
    """Runs every completion's check; returns per-sample result rows (task-major).

    ``limits`` applies to every program as given; by default each task gets ``task_limits``."""
    jobs, index, per_job, forced = [], [], [], getattr(fmt, "forced_prefix", "")
    for t, comps in zip(tasks, completions):
        lim = limits or task_limits(fmt.benchmark, t["task_id"])
        for s, c in enumerate(comps):
            jobs.append(fmt.program(t, c))
            index.append((t["task_id"], s, c))
            per_job.append(lim)
    results = sandbox.run_many(jobs, limits=per_job, progress=progress)
    return [
        {
            "task_id": tid,
            "sample": s,
            "completion": c,
            "passed": r.passed,
            "status": r.status,
            "detail": r.detail,
            "cached": r.cached,
            "thought": has_thought(forced + c),
        }
        for (tid, s, c), r in zip(index, results)
    ]


def summarize(
    rows: list[dict],
    benchmark: str,
    n_samples: int,
    temperature: float,
    ks: Sequence[int],
    sample_s: float = 0.0,
    check_s: float = 0.0,
    fmt=None,
) -> EvalReport:
    per_task: dict[str, list[bool]] = {}
    status: dict[str, int] = {}
    for r in rows:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
        status[r["status"]] = status.get(r["status"], 0) + 1
    counts = [(len(v), sum(v)) for v in per_task.values()]
    pass_at = {k: mean_pass_at_k(counts, k) for k in ks if k <= n_samples}
    return EvalReport(
        benchmark,
        len(per_task),
        n_samples,
        temperature,
        pass_at,
        status,
        sample_s,
        check_s,
        len(rows) / check_s if check_s else 0.0,
        sum(bool(r.get("thought")) for r in rows) / len(rows) if rows else 0.0,
        getattr(fmt, "mode", "free"),
        getattr(fmt, "forced_prefix", ""),
    )


def sampler_generate(sampler, params, sampling, max_new_tokens: int, stops: Sequence[str], key=None):
    """``generate(prompts, n)`` for :func:`evaluate_model` backed by the in-graph sampler on ``params`` (G = n
    samples share one prefill); a fresh key per call."""
    import jax

    state = {"key": key if key is not None else jax.random.key(0)}

    def generate(prompts, n):
        state["key"], sub = jax.random.split(state["key"])
        comps = sampler.complete(
            params, prompts, max_new_tokens=max_new_tokens, sampling=sampling, key=sub, num_samples=n, stop_strings=list(stops)
        )
        return [[c.text for c in comps[i * n : (i + 1) * n]] for i in range(len(prompts))]

    return generate


def evaluate_model(
    generate: Callable[[list[str], int], list[list[str]]],
    tasks: list[dict],
    fmt: PromptFormat,
    sandbox: Sandbox,
    *,
    n_samples: int,
    temperature: float,
    ks: Sequence[int] = (1, 10, 100),
    batch_tasks: int = 8,
    out_dir: str | None = None,
    limits: Limits | None = None,
    progress: bool = True,
) -> EvalReport:
    """``generate(prompts, n)`` returns n raw completions per prompt; they are cut at ``fmt.stops`` here.

    Writes ``results.jsonl`` (one row per sample) and ``summary.json`` under ``out_dir`` when given.
    """
    if not tasks:
        raise InputError(f"{fmt.benchmark}: no tasks to evaluate")
    order = sorted(range(len(tasks)), key=lambda i: len(fmt.prompt(tasks[i])))  # similar lengths batch together
    completions: list[list[str]] = [[] for _ in tasks]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"sample {fmt.benchmark}", unit="task")
    t0 = time.perf_counter()
    for lo in range(0, len(order), batch_tasks):
        idx = order[lo : lo + batch_tasks]
        outs = generate([fmt.prompt(tasks[i]) for i in idx], n_samples)
        for i, o in zip(idx, outs):
            completions[i] = [cut_at_stops(x, fmt.stops) for x in o]
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    sample_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rows = check_completions(tasks, completions, fmt, sandbox, limits, progress=f"check {fmt.benchmark}" if progress else None)
    check_s = time.perf_counter() - t1
    report = summarize(rows, fmt.benchmark, n_samples, temperature, ks, sample_s, check_s, fmt)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, "results.jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(out_dir, "results.jsonl"))
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=1)
    return report
