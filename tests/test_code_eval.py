"""Code benchmarks (tfds builders over ../shared/data), their checks in the sandbox, prompts and pass@k reports."""

import functools
import json
import os
import re

import pytest

from ra3_jax.cli import main
from ra3_jax.data.code_benchmarks import BenchmarkError, load_benchmark, read_tasks
from ra3_jax.errors import InputError
from ra3_jax.evaluation.code_eval import (
    CHAT_INSTRUCTION,
    CHAT_RESPONSE,
    DEFAULT_LIMITS,
    REFERENCE_CPU_S,
    REFERENCE_FACTOR,
    ChatFormat,
    PromptFormat,
    check_completions,
    cut_at_stops,
    evaluate_model,
    extract_code,
    make_format,
    task_limits,
)
from ra3_jax.evaluation.passk import resolve_ks
from ra3_jax.execution import Sandbox
from ra3_jax.model.chat_template import render_chat

from .conftest import REPO
from .test_tokenizer import CHATML

EXPECTED = {"humaneval": 164, "humaneval+": 164, "mbpp": 974, "mbpp_sanitized": 427, "mbpp+": 378}


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(workers=2)


def all_tasks(name, tfds_dir, shared_data):
    splits = ("prompt", "test", "validation", "train") if name in ("mbpp", "mbpp_sanitized") else ("test",)
    return [t for s in splits for t in load_benchmark(name, s, data_dir=shared_data, tfds_dir=tfds_dir)]


def stub(name, task):
    """A `return None` body with the right function name."""
    if name.startswith("humaneval"):
        return task["prompt"] + "    return None\n"
    called = set(re.findall(r"(\w+)\(", task["test"]))
    defs = re.findall(r"^(?:def|class) (\w+)", task["canonical_solution"], re.M)
    names = [m for m in defs if m in called] or defs
    return "".join(f"def {fn}(*args, **kwargs):\n    return None\n" for fn in names)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_canonical_solutions_pass_and_stubs_fail(name, tfds_dir, sandbox, shared_data):
    tasks = all_tasks(name, tfds_dir, shared_data)
    assert len(tasks) == EXPECTED[name] and len({t["task_id"] for t in tasks}) == EXPECTED[name]
    fmt = PromptFormat.create(name)
    canon = [t["canonical_solution"] if name.startswith("mbpp") else t["canonical_solution"] for t in tasks]
    rows = check_completions(tasks, [[c] for c in canon], fmt, sandbox)
    failed = [(r["task_id"], r["status"], r["detail"]) for r in rows if not r["passed"]]
    assert not failed, failed[:5]
    stubs = [[stub(name, t)[len(t["prefix"]) :] if name.startswith("humaneval") else stub(name, t)] for t in tasks]
    rows = check_completions(tasks, stubs, fmt, sandbox)
    passed = [r["task_id"] for r in rows if r["passed"]]
    assert not passed, passed[:5]


def test_find_zero_special_oracle(tfds_dir, sandbox, shared_data):
    t = next(t for t in load_benchmark("humaneval+", data_dir=shared_data, tfds_dir=tfds_dir) if t["task_id"] == "HumanEval/32")
    fmt = PromptFormat.create("humaneval+")
    # A tighter Newton tolerance returns other values than the release's expected outputs on 274 of 886 inputs,
    # yet all are roots: the oracle passes it. A non-root fails.
    assert "x, tol = 0, 1e-5" in t["canonical_solution"]
    newton = t["canonical_solution"].replace("x, tol = 0, 1e-5", "x, tol = 0, 1e-7")
    off = t["canonical_solution"].rstrip() + " + 0.5\n"
    rows = check_completions([t, t], [[newton], [off]], fmt, sandbox)
    assert [r["passed"] for r in rows] == [True, False], rows


def test_mbpp_splits_and_fields(tfds_dir, shared_data):
    sizes = {
        s: len(load_benchmark("mbpp", s, data_dir=shared_data, tfds_dir=tfds_dir))
        for s in ("prompt", "test", "validation", "train")
    }
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    t = load_benchmark("mbpp+", data_dir=shared_data, tfds_dir=tfds_dir)[0]
    assert t["task_id"] == "Mbpp/2" and t["example_test"].startswith("assert set(similar_elements(")
    with pytest.raises(BenchmarkError, match="no split 'train'"):
        load_benchmark("humaneval", "train", data_dir=shared_data, tfds_dir=tfds_dir)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(BenchmarkError, match="not found.*--data-dir"):
        read_tasks("mbpp+", tmp_path)
    (tmp_path / "mbpp").mkdir()
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text('{"task_id": 1, "text": \n')
    with pytest.raises(BenchmarkError, match="corrupt"):
        read_tasks("mbpp", tmp_path)
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        read_tasks("apps", tmp_path)


def test_prompt_formats_and_stops(tfds_dir, shared_data):
    he = load_benchmark("humaneval", data_dir=shared_data, tfds_dir=tfds_dir)[0]
    fmt = PromptFormat.create("humaneval")
    assert fmt.prompt(he) == he["prompt"] and fmt.prompt(he).rstrip().endswith('"""')
    body = "    return any(abs(a - b) < threshold for a in numbers for b in numbers if a is not b)\n"
    assert cut_at_stops(body + "\n\ndef main():\n    pass\n", fmt.stops) == body + "\n"
    job = fmt.program(he, body)
    assert job.program == he["prompt"] + body and job.test.rstrip().endswith("check(has_close_elements)")

    mb = load_benchmark("mbpp", data_dir=shared_data, tfds_dir=tfds_dir)[0]
    p0 = PromptFormat.create("mbpp").prompt(mb)
    assert p0 == f'"""\n{mb["description"]}\n{mb["example_test"]}\n"""\n'
    three = PromptFormat.create("mbpp", "3shot", data_dir=shared_data)
    p3 = three.prompt(mb)
    assert p3.count("[BEGIN]") == 4 and p3.count("[DONE]") == 3 and p3.endswith("[BEGIN]\n")
    assert "similar_elements" in p3 and mb["description"] in p3
    assert cut_at_stops("def f():\n    return 1\n[DONE]\nYou are", three.stops) == "def f():\n    return 1\n"


def test_evaluate_model_pass_at_k(tfds_dir, sandbox, tmp_path, shared_data):
    """Task i gets i correct samples out of 4 (i = 0..3): pass@1 = mean(i/4), pass@2 by hand."""
    tasks = load_benchmark("humaneval", data_dir=shared_data, tfds_dir=tfds_dir)[:4]
    fmt = PromptFormat.create("humaneval")
    by_prompt = {fmt.prompt(t): (i, t) for i, t in enumerate(tasks)}

    def generate(prompts, n):
        out = []
        for p in prompts:
            i, t = by_prompt[p]
            good = t["canonical_solution"] + "\n\ndef unrelated():\n    pass\n"  # must be cut at "\ndef"
            out.append([good if s < i else "    return None\n" for s in range(n)])
        return out

    rep = evaluate_model(
        generate,
        tasks,
        fmt,
        sandbox,
        n_samples=4,
        temperature=0.8,
        ks=(1, 2, 10),
        batch_tasks=3,
        out_dir=str(tmp_path),
        progress=False,
    )
    assert rep.n_tasks == 4 and set(rep.pass_at) == {1, 2}
    assert rep.pass_at[1] == pytest.approx((0 + 1 + 2 + 3) / 16)
    # pass@2 per task: 1 - C(4-c,2)/C(4,2) = 0, 1/2, 5/6, 1
    assert rep.pass_at[2] == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert os.path.exists(tmp_path / "results.jsonl") and os.path.exists(tmp_path / "summary.json")
    assert sum(1 for _ in open(tmp_path / "results.jsonl")) == 16
    assert "| humaneval | 4 | 4 | 0.8 |" in rep.table()
    assert DEFAULT_LIMITS["mbpp+"].timeout_s >= 60


def test_task_limits_scale_with_the_reference(tfds_dir, shared_data):
    # "+" budgets are CPU seconds (a loaded machine stretches wall time, not CPU time), raised per task to 4x the
    # reference's CPU time where that is more: MBPP+/599's reference spends ~35 s.
    for name, refs in REFERENCE_CPU_S.items():
        ids = {t["task_id"] for t in load_benchmark(name, data_dir=shared_data, tfds_dir=tfds_dir)}
        assert set(refs) <= ids, set(refs) - ids  # a stale table would silently give the default budget
    base = DEFAULT_LIMITS["mbpp+"]
    assert base.resolved()["cpu_s"] == 60 and base.timeout_s >= 3 * 60
    assert task_limits("mbpp+", "Mbpp/2") == base and task_limits("mbpp+", "Mbpp/392") == base  # 4 x 7.9 < 60
    big = task_limits("mbpp+", "Mbpp/599")
    assert big.cpu_s == 142 == int(-(-REFERENCE_FACTOR * 35.3 // 1)) and big.timeout_s == 3 * 142
    assert big.memory_mb == base.memory_mb
    assert task_limits("humaneval", "HumanEval/15") == DEFAULT_LIMITS["humaneval"] and task_limits("mine", "x") is None


# --------------------------------------------------------------------------------------------- chat format
def test_extract_code_from_markdown_replies():
    assert extract_code("Here it is:\n```python\ndef f():\n    return 1\n```\nIt returns 1.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # a bare fence
    assert extract_code("def f():\n    return 2\n") == "def f():\n    return 2\n"  # no fence: all code
    assert extract_code("```python\na = 1\n```\nor\n```python\nb = 2\n```\n") == "a = 1\n"  # the first of two
    assert extract_code("```bash\npip install x\n```\n```py\nc = 3\n```") == "c = 3\n"  # the first Python block
    assert extract_code("```text\nonly\n```") == "only\n"  # no Python block: the first block
    assert extract_code("```python\nd = 4\nprint(d)") == "d = 4\nprint(d)"  # never closed: to the end
    assert extract_code("```python\n```") == ""


def chatml_format(benchmark):
    return ChatFormat(PromptFormat.create(benchmark), functools.partial(render_chat, CHATML, add_generation_prompt=False))


def test_chat_prompt_is_evalplus_request_in_the_template(tfds_dir, shared_data):
    he = load_benchmark("humaneval", data_dir=shared_data, tfds_dir=tfds_dir)[0]
    assert CHAT_INSTRUCTION == (
        "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
    )
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert chatml_format("humaneval").prompt(he) == (
        f"{system}<|im_start|>user\n{CHAT_INSTRUCTION}\n```\n{he['prompt'].strip()}\n```\n<|im_end|>\n"
        f"<|im_start|>assistant\n{CHAT_RESPONSE}\n```python\n"
    )
    mb = load_benchmark("mbpp", data_dir=shared_data, tfds_dir=tfds_dir)[0]
    user = f'{CHAT_INSTRUCTION}\n```\n"""\n{mb["description"]}\n{mb["example_test"]}\n"""\n```\n'
    assert f"<|im_start|>user\n{user}<|im_end|>" in chatml_format("mbpp").prompt(mb)
    assert chatml_format("mbpp").stops == ("\n```\n",)


def test_chat_programs_pass_and_fail_as_they_should(tfds_dir, sandbox, shared_data):
    """HumanEval/0 annotates with typing.List: a whole solution without the import passes only because the
    prompt's imports go in front; a bare body continues the prompt; a wrong name fails."""
    t = load_benchmark("humaneval", data_dir=shared_data, tfds_dir=tfds_dir)[0]
    fmt = chatml_format("humaneval")
    whole = t["prompt"] + t["canonical_solution"]
    no_imports = "".join(x + "\n" for x in whole.splitlines() if not x.startswith(("from ", "import ")))
    assert "List[float]" in no_imports and "typing" not in no_imports
    replies = [
        no_imports + "\n```\n\nThis checks every pair.",
        t["canonical_solution"] + "```",
        "def other():\n    return 1\n```",
    ]
    completions = [cut_at_stops(r, fmt.stops) for r in replies]
    assert completions[0] == no_imports
    rows = check_completions([t], [completions], fmt, sandbox)
    assert [r["passed"] for r in rows] == [True, True, False], rows
    assert fmt.program(t, completions[0]).program.startswith("from typing import List\n")

    mb = load_benchmark("mbpp", data_dir=shared_data, tfds_dir=tfds_dir)[:2]
    fmt = chatml_format("mbpp")
    rows = check_completions(mb, [[t["canonical_solution"].rstrip() + "\n```\nDone."] for t in mb], fmt, sandbox)
    assert all(r["passed"] for r in rows), rows


def test_make_format_and_pass_at_k_choices(spm_tokenizer):
    assert isinstance(make_format("mbpp", "completion", "docstring"), PromptFormat)
    with pytest.raises(InputError, match="3-shot"):
        make_format("mbpp", "chat", "3shot")
    with pytest.raises(InputError, match="no"):
        make_format("humaneval", "chat", tokenizer=spm_tokenizer)  # sentencepiece: no chat template
    with pytest.raises(InputError, match="prompt format"):
        make_format("humaneval", "instruct")
    assert resolve_ks(None, 1) == (1,) and resolve_ks(None, 20) == (1, 10) and resolve_ks([1, 5], 5) == (1, 5)
    with pytest.raises(InputError, match="pass@100 needs at least 100 samples per task, but n-samples is 1"):
        resolve_ks([1, 10, 100], 1)
    with pytest.raises(InputError, match="k >= 1"):
        resolve_ks([0, 1], 4)


def test_eval_cli_k_error_chat_canonical_and_table_on_its_own_line(tfds_dir, shared_data, tmp_path, capsys):
    cfg = os.path.join(REPO, "configs", "smollm2_135m_cpu.yaml")
    base = ["eval", "-c", cfg, "--data-dir", shared_data, "--canonical", "--limit", "3", f"data.tfds_dir={tfds_dir}"]
    he = base + ["--benchmark", "humaneval"]
    assert main(he + ["--k", "1", "10", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass@100 needs at least 100 samples per task" in err
    assert main(base + ["--benchmark", "mbpp", "--mbpp-style", "3shot", "--prompt-format", "chat"]) == 2
    assert "3-shot" in capsys.readouterr().err
    # the reference solutions through the chat format (SmolLM2's template), the table after the progress bars
    assert main(he + ["--prompt-format", "chat", "--out", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert "check humaneval" in cap.err and cap.err.endswith("\n")  # the bar's line ended (it ends in '\r')
    assert cap.out.startswith("| benchmark |") and "| humaneval | 3 | 1 | 0 | 100.00 |" in cap.out
    assert json.loads(cap.out[cap.out.index("{") :])["prompt_format"] == "chat"
