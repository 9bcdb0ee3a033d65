"""`ra3 eval --benchmark jsonl:PATH` (HumanEval-format task files), forced completion prefixes (--mode /
--forced-prefix), thought flags, `--model DIR` (save_model_dir) and HumanEval rows in rlvr task files."""

import json
import os
import types

import jax
import pytest

from ra3_jax.cli import main
from ra3_jax.data.code_benchmarks import BenchmarkError, benchmark_slug, check_benchmark_name, read_humaneval_jsonl
from ra3_jax.errors import InputError
from ra3_jax.evaluation.code_eval import TaskFormat, evaluate_model
from ra3_jax.evaluation.forcing import FORCED_PREFIXES, forced_format, has_thought
from ra3_jax.execution import Sandbox

from .conftest import REPO

ADD = (3, 5, 7)


def chain_task(i, add, canonical_add=None):
    return {
        "task_id": f"chain/{i}",
        "prompt": f'def f(x):\n    """start 4; ops +{add} *1 (mod 10)"""\n',
        "canonical_solution": f"    return (x + {add if canonical_add is None else canonical_add}) % 10\n",
        "test": f"def check(candidate):\n    for x in range(10):\n        assert candidate(x) == (x + {add}) % 10\n",
        "entry_point": "f",
    }


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def chains(tmp_path):
    return write_jsonl(tmp_path / "chains.jsonl", [chain_task(i, a) for i, a in enumerate(ADD)])


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(workers=2)


def run_eval(capsys, *argv):
    rc = main(["eval", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def summary_of(out: str) -> dict:
    return json.loads(out[out.index("{") :])


def test_reader_matches_the_humaneval_shape(chains):
    tasks = read_humaneval_jsonl(chains)
    assert [t["task_id"] for t in tasks] == ["chain/0", "chain/1", "chain/2"]
    t = tasks[0]
    assert t["prefix"] == t["prompt"] and t["entry_point"] == "f"
    assert t["test"] == chain_task(0, 3)["test"] + "\n\ncheck(f)\n"
    assert benchmark_slug(f"jsonl:{chains}") == "jsonl_chains" and benchmark_slug("humaneval+") == "humaneval_plus"
    assert check_benchmark_name(f"jsonl:{chains}") == f"jsonl:{chains}"
    with pytest.raises(BenchmarkError, match="did you mean 'mbpp'"):
        check_benchmark_name("mbp")


def test_canonical_jsonl_passes_and_a_wrong_reference_fails(chains, tmp_path, capsys):
    rc, out, _ = run_eval(capsys, "--benchmark", f"jsonl:{chains}", "--canonical", f"train.out_dir={tmp_path / 'run'}")
    assert rc == 0
    s = summary_of(out)
    assert s["pass_at"] == {"1": 1.0} and s["mode"] == "free" and s["forced_prefix"] == "" and s["think_rate"] == 0.0
    folder = tmp_path / "run" / "eval" / "jsonl_chains"  # the default --out
    assert s["out"] == str(folder)
    rows = [json.loads(x) for x in open(folder / "results.jsonl")]
    assert [(r["task_id"], r["sample"], r["passed"], r["thought"]) for r in rows] == [
        (f"chain/{i}", 0, True, False) for i in range(3)
    ]
    saved = json.load(open(folder / "summary.json"))
    assert saved["think_rate"] == 0.0 and saved["mode"] == "free" and saved["n_tasks"] == 3
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [chain_task(0, 3), chain_task(1, 5, canonical_add=4)])
    rc, out, _ = run_eval(capsys, "--benchmark", f"jsonl:{wrong}", "--canonical", "--out", str(tmp_path / "w"))
    assert rc == 0 and summary_of(out)["pass_at"] == {"1": 0.5}
    assert [json.loads(x)["passed"] for x in open(tmp_path / "w" / "results.jsonl")] == [True, False]


def test_modes_through_the_cli(chains, tmp_path, capsys):
    base = ["--benchmark", f"jsonl:{chains}", "--canonical"]
    # banned: the program is prompt + "    return (x +" + the reference less that prefix -> still right
    rc, out, _ = run_eval(capsys, *base, "--mode", "banned", "--out", str(tmp_path / "b"))
    s = summary_of(out)
    assert rc == 0 and s["pass_at"] == {"1": 1.0} and s["mode"] == "banned" and s["forced_prefix"] == "    return (x +"
    assert json.load(open(tmp_path / "b" / "summary.json"))["forced_prefix"] == FORCED_PREFIXES["banned"]
    # forced: "    # thought:" then the whole reference on that comment line -> an empty body, and every sample thinks
    rc, out, _ = run_eval(capsys, *base, "--mode", "forced", "--out", str(tmp_path / "f"))
    s = summary_of(out)
    assert rc == 0 and s["pass_at"] == {"1": 0.0} and s["think_rate"] == 1.0
    assert all(json.loads(x)["thought"] for x in open(tmp_path / "f" / "results.jsonl"))
    # --forced-prefix replaces the mode's prefix
    rc, out, _ = run_eval(capsys, *base, "--mode", "forced", "--forced-prefix", "    return (x", "--out", str(tmp_path / "c"))
    s = summary_of(out)
    assert rc == 0 and s["pass_at"] == {"1": 1.0} and s["forced_prefix"] == "    return (x" and s["think_rate"] == 0.0


def test_forced_prefix_program_is_prompt_prefix_completion(chains, sandbox, tmp_path):
    tasks = read_humaneval_jsonl(chains)
    seen = []

    def generate(prompts, n):
        seen.extend(prompts)
        return [[" 3) % 10\n# trailing text is cut at the stops"] * n for _ in prompts]

    fmt = forced_format(TaskFormat("chains"), "banned")
    run = dict(n_samples=2, temperature=0.0, ks=(1,), progress=False)
    rep = evaluate_model(generate, tasks[:1], fmt, sandbox, **run, out_dir=str(tmp_path / "o"))
    assert seen == [tasks[0]["prompt"] + "    return (x +"]
    assert fmt.program(tasks[0], " 3) % 10\n").program == tasks[0]["prompt"] + "    return (x + 3) % 10\n"
    assert rep.pass_at[1] == 1.0 and rep.mode == "banned" and rep.think_rate == 0.0
    # free mode: the same completion alone is not a program; a thought line in the completion is flagged
    by_prompt = {
        tasks[0]["prompt"]: " 3) % 10\n",
        tasks[1]["prompt"]: "    # thought: add 3, wrap at 10\n    return (x + 3) % 10\n",
    }
    rep = evaluate_model(lambda ps, n: [[by_prompt[p]] * n for p in ps], tasks[:2], TaskFormat("chains"), sandbox, **run)
    assert rep.pass_at[1] == 0.0 and rep.think_rate == 0.5  # task 1 (+5) fails with +3, but it thought
    assert rep.n_samples == 2 and rep.mode == "free" and rep.forced_prefix == ""
    assert has_thought("x = 1\n  # thought: y\n") and not has_thought("x = 1  # thought: y\n# thoughts\n")
    with pytest.raises(InputError, match="unknown mode"):
        forced_format(TaskFormat("t"), "sometimes")


BAD = {
    "bad JSON": ([json.dumps(chain_task(0, 3)), '{"task_id": "a",'], ":2: not valid JSON"),
    "missing field": (
        [json.dumps(chain_task(0, 3)), json.dumps({k: v for k, v in chain_task(1, 5).items() if k != "entry_point"})],
        ":2: task lacks ['entry_point']",
    ),
    "not an object": ([json.dumps(chain_task(0, 3)), "[1, 2]"], ":2: a task must be a JSON object, got list"),
    "duplicate id": (
        [json.dumps(chain_task(0, 3)), json.dumps(chain_task(0, 5))],
        ":2: duplicate task_id 'chain/0' (first on line 1)",
    ),
    "empty": (["", "  "], ": no tasks (the file is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_task_files_are_one_line_and_exit_2(case, tmp_path, capsys):
    lines, expected = BAD[case]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rc, _, err = run_eval(capsys, "--benchmark", f"jsonl:{path}", "--canonical", "--out", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("ra3 eval: error: ") and f"{path}{expected}" in err, err


def test_missing_file_no_reference_and_unknown_names(chains, tmp_path, capsys):
    rc, _, err = run_eval(capsys, "--benchmark", f"jsonl:{tmp_path / 'nope.jsonl'}", "--canonical")
    assert rc == 2 and err.count("\n") == 1 and f"task file not found: {tmp_path / 'nope.jsonl'}" in err
    bare = write_jsonl(tmp_path / "bare.jsonl", [{k: v for k, v in chain_task(0, 3).items() if k != "canonical_solution"}])
    rc, _, err = run_eval(capsys, "--benchmark", f"jsonl:{bare}", "--canonical", "--out", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and "--canonical needs each task's canonical_solution" in err
    with pytest.raises(SystemExit) as e:  # argparse: usage + the did-you-mean line
        main(["eval", "--benchmark", "humanevl", "--canonical"])
    assert e.value.code == 2 and "did you mean 'humaneval'" in capsys.readouterr().err


def test_rlvr_task_files_take_humaneval_rows(tmp_path):
    from ra3_jax.algorithms.rlvr import read_task_file

    plain = {"task_id": "p", "prompt": "def g():\n", "test": "assert g() == 1\n"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [chain_task(0, 3), plain])
    he, own = read_task_file(str(path))
    assert he["test"].endswith("\n\ncheck(f)\n") and he["prefix"] == he["prompt"]
    assert own == {**plain, "prefix": plain["prompt"]}
    write_jsonl(path, [{k: v for k, v in chain_task(0, 3).items() if k != "test"}])
    with pytest.raises(BenchmarkError, match=r"mixed.jsonl:1: task lacks \['test'\]"):
        read_task_file(str(path))


def test_greedy_pass_at_1_on_a_task_file(chains, sandbox, tmp_path):
    from ra3_jax.evaluation.benchmark_eval import greedy_pass_at_1

    class Stub:  # the sampler: "    return (x + 3) % 10" (right for task 0 only), with a thought first
        def complete(self, params, prompts, num_samples, **kw):
            text = "    # thought: plus 3\n    return (x + 3) % 10\n"
            return [types.SimpleNamespace(text=text) for _ in range(len(prompts) * num_samples)]

    cfg = types.SimpleNamespace(
        data=types.SimpleNamespace(benchmark_dir="", tfds_dir=str(tmp_path), mbpp_style="docstring"),
        eval=types.SimpleNamespace(benchmarks=[f"jsonl:{chains}"], tasks=0, max_new_tokens=8),
    )
    res = greedy_pass_at_1(Stub(), None, cfg, sandbox, out_dir=str(tmp_path / "ev"), batch_tasks=4)
    assert res == {"eval/jsonl_chains/pass@1": pytest.approx(1 / 3), "eval/jsonl_chains/think_rate": 1.0}
    assert (tmp_path / "ev" / "jsonl_chains" / "results.jsonl").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_tokenizer):
    """A tiny random model saved as a model directory (save_model_dir)."""
    from ra3_jax.config import load_config
    from ra3_jax.model.params import init_params
    from ra3_jax.model.store import model_config_from_section, save_model_dir

    cfg = model_config_from_section(load_config(f"{REPO}/configs/tiny_cpu.yaml").model)
    d = tmp_path_factory.mktemp("models") / "model"
    params = init_params(cfg, jax.random.key(0))
    assert save_model_dir(str(d), params, cfg, spm_tokenizer) == str(d)
    with pytest.raises(InputError, match="not empty; refusing to overwrite"):
        save_model_dir(str(d), params, cfg, spm_tokenizer)
    save_model_dir(str(d), params, cfg, spm_tokenizer, overwrite=True)
    assert sorted(os.listdir(d.parent)) == ["model"]  # no .tmp / .old left behind
    return d


def test_eval_and_sample_with_a_model_dir(model_dir, chains, tmp_path, capsys):
    assert {"params", "model_config.json", "spm.model"} <= set(os.listdir(model_dir))
    argv = ["--model", str(model_dir), "--benchmark", f"jsonl:{chains}", "--limit", "2", "--max-new-tokens", "8"]
    rc, out, err = run_eval(capsys, *argv, "--out", str(tmp_path / "o"))
    assert rc == 0, err
    rows = [json.loads(x) for x in open(tmp_path / "o" / "results.jsonl")]
    assert [r["task_id"] for r in rows] == ["chain/0", "chain/1"] and all(isinstance(r["passed"], bool) for r in rows)
    assert summary_of(out)["mode"] == "free"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):\\n"}\n')
    assert main(["sample", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["index"] == 0


def test_model_dir_errors_are_one_line(model_dir, chains, tmp_path, capsys):
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in os.listdir(model_dir):
        if name != "spm.model":
            os.symlink(model_dir / name, no_tok / name)
    base = ["--benchmark", f"jsonl:{chains}", "--limit", "1"]
    cases = {
        str(no_tok): f"{no_tok} has no tokenizer (tokenizer.json or spm.model)",
        str(tmp_path / "absent"): f"model directory not found: {tmp_path / 'absent'}",
    }
    for d, expected in cases.items():
        rc, _, err = run_eval(capsys, "--model", d, *base)
        assert rc == 2 and err.count("\n") == 1 and expected in err, err
    rc, _, err = run_eval(capsys, "--model", str(model_dir), *base, "model.param_dtype=bfloat16")
    assert rc == 2 and err.count("\n") == 1 and "drop the override(s) model.param_dtype=bfloat16" in err
