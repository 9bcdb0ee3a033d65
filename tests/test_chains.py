"""The chains benchmark (../shared/design/CHAINS.md): the generator against the spec's own example and a naive
mod-10 evaluator, determinism, disjointness, the tfds builder, the export command, mode formats, thought-step
accuracy, and the random-acceptance selection of the E-step."""

import json
import os

import numpy as np
import pytest

from ra3_jax.data import chains
from ra3_jax.data.chains import Chain, ChainsSpec, check_disjoint, generate_splits, parse_prompt
from ra3_jax.errors import InputError

SMALL = ChainsSpec(seed=3, eval_per_k=20, pretrain_docs=600, midtrain_docs=200, validation_docs=50, rlvr_tasks=100)
# CHAINS.md's example, character for character
EXAMPLE = Chain(4, (("+", 7), ("*", 3), ("-", 2), ("+", 5), ("*", 2)))


def test_the_spec_example_to_the_character():
    assert EXAMPLE.prompt() == 'def f(x):\n    """start 4; ops +7 *3 -2 +5 *2 (mod 10)"""\n'
    assert EXAMPLE.thought() == "4+7=1 1*3=3 3-2=1 1+5=6 6*2=2"
    assert EXAMPLE.answer == 2
    assert EXAMPLE.expert_solution() == "    return (x + 2) % 10\n"
    assert EXAMPLE.worked_solution() == "    # thought: 4+7=1 1*3=3 3-2=1 1+5=6 6*2=2\n    return (x + 2) % 10\n"
    assert EXAMPLE.test() == "def check(candidate):\n    for x in range(10):\n        assert candidate(x) == (x + 2) % 10\n"
    assert parse_prompt(EXAMPLE.prompt()) == EXAMPLE


def _naive_answer(s: int, ops) -> int:
    v = s
    for op, d in ops:  # Python's own arithmetic, then %: results in 0..9 for negative values too
        v = eval(f"({v}) {op} {d}") % 10
    return v


def test_answers_and_programs_against_a_naive_evaluator():
    rng = np.random.default_rng(0)
    for _ in range(300):
        c = chains.random_chain(rng, int(rng.integers(1, 7)))
        assert c.answer == _naive_answer(c.s, c.ops)
        for solution, ok in ((c.worked_solution(), True), (f"    return (x + {(c.answer + 1) % 10}) % 10\n", False)):
            ns: dict = {}
            exec(c.prompt() + solution, ns)
            try:
                exec(c.test() + "\ncheck(f)\n", dict(ns))
                passed = True
            except AssertionError:
                passed = False
            assert passed is ok


def test_splits_are_deterministic_sized_and_disjoint():
    a, b = generate_splits(SMALL), generate_splits(SMALL)
    assert a == b
    other = generate_splits(ChainsSpec(**{**SMALL.__dict__, "seed": 4}))
    assert other["eval"] != a["eval"]
    assert {k: len(v) for k, v in a.items()} == {
        "eval": 120,
        "pretrain": 600,
        "pretrain_validation": 50,
        "midtrain": 200,
        "midtrain_validation": 50,
        "rlvr": 100,
    }
    ks = [t["k"] for t in a["eval"]]
    assert [ks.count(k) for k in range(1, 7)] == [20] * 6
    assert len({parse_prompt(t["prompt"]).key for t in a["eval"]}) == 120  # distinct eval tasks
    eval_keys = {parse_prompt(t["prompt"]).key for t in a["eval"]}
    for name in ("pretrain", "pretrain_validation", "midtrain", "midtrain_validation", "rlvr"):
        for r in a[name]:
            assert parse_prompt(r.get("prompt") or r["text"]).key not in eval_keys
    share = np.mean([r["thought"] for r in a["pretrain"]])
    assert 0.33 < share < 0.47 and all("# thought:" in r["text"] for r in a["pretrain"] if r["thought"])
    assert not any("# thought:" in r["text"] for r in a["midtrain"])
    assert {r["k"] for r in a["pretrain"]} == set(range(1, 7))
    leaked = dict(a, midtrain=a["midtrain"] + [{"text": a["eval"][5]["prompt"], "path": "planted.py"}])
    with pytest.raises(InputError, match="planted.py repeats an eval task"):
        check_disjoint(leaked)


def test_tfds_builder_and_export(tfds_dir, tmp_path):
    rows = generate_splits(SMALL)
    corpus = chains.corpus_sources(SMALL, tfds_dir, "midtrain")
    texts = sorted(corpus["train"][i]["text"].decode() for i in range(len(corpus["train"])))
    assert texts == sorted(r["text"] for r in rows["midtrain"])
    assert len(corpus["validation"]) == 50
    ev = chains.task_rows(SMALL, tfds_dir, "eval")
    assert sorted(ev, key=lambda t: t["task_id"]) == sorted(rows["eval"], key=lambda t: t["task_id"])
    with pytest.raises(InputError, match="chains:pretrain or chains:midtrain"):
        chains.corpus_sources(SMALL, tfds_dir, "eval")

    from ra3_jax.cli import main

    out = tmp_path / "eval.jsonl"
    sizes = [f"chains.{k}={v}" for k, v in SMALL.__dict__.items()]
    assert main(["chains", "export", "--split", "eval", "--out", str(out), f"data.tfds_dir={tfds_dir}", *sizes]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 120 and set(lines[0]) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert lines[0]["entry_point"] == "f" and lines[0]["task_id"].startswith("chains/k1/")


def test_mode_formats_and_step_accuracy():
    from ra3_jax.data.code_benchmarks import humaneval_task
    from ra3_jax.evaluation.code_eval import PromptFormat
    from ra3_jax.evaluation.forcing import forced_format
    from ra3_jax.experiments.chains_eval import rows_by_k, step_accuracy, thought_line

    task = EXAMPLE.task("t0")
    banned = forced_format(PromptFormat.create("jsonl:chains"), "banned")
    assert banned.prompt(task) == task["prompt"] + "    return (x +"
    job = banned.program(humaneval_task(task, "t0"), " 2) % 10\n")
    assert job.program == task["prompt"] + "    return (x + 2) % 10\n" and job.test.endswith("check(f)\n")
    assert chains.FORCED_PREFIXES == {"free": "", "forced": "    # thought:", "banned": "    return (x +"}
    assert thought_line("    # thought: 4+7=1 1*3=3\n    return (x + 3) % 10\n") == "4+7=1 1*3=3"
    assert thought_line("    return (x + 3) % 10\n") is None
    assert step_accuracy(task["prompt"], "4+7=1 1*3=3 3-2=1 1+5=6 6*2=2") == 1.0
    assert step_accuracy(task["prompt"], "4+7=1 1*3=4 3-2=1") == pytest.approx(2 / 5)  # wrong and missing steps
    from ra3_jax.experiments.chains_eval import Decoding

    tasks = [task, {**EXAMPLE.task("t1"), "k": 5}]
    res = [
        {"task_id": "t0", "passed": True, "completion": " 4+7=1 1*3=3 3-2=1 1+5=6 6*2=2\n    return (x + 2) % 10\n"},
        {"task_id": "t1", "passed": False, "completion": " 4+7=1\n    return (x + 5) % 10\n"},
    ]
    (row,) = rows_by_k(res, tasks, "    # thought:", Decoding("greedy", 0.0, 1))
    assert row == {"k": 5, "n_tasks": 2, "pass@1": 0.5, "pass@10": None, "think_rate": 1.0, "step_acc": pytest.approx(0.6)}


def test_random_acceptance_ignores_the_scores():
    from ra3_jax.algorithms.ra3.estep import Candidate, select

    cands = [Candidate(d, 2, "p" * d, [1], [2], "h", True, "    ") for d in range(400)]
    groups = [[{"text": f"z{d}-{g}"} for g in range(4)] for d in range(400)]
    S = np.full((400, 4), -5.0)  # nothing is worth keeping: best-of selection accepts none
    best: dict = {}
    assert select(cands, groups, S, S, best)["accepted"] == 0 and best == {}
    rand: dict = {}
    stats = select(cands, groups, S, S, rand, random_accept=(0.3, 7))
    assert 0.22 < stats["accepted"] / 400 < 0.38
    picked = [int(v[2]["text"].split("-")[1]) for v in rand.values()]
    assert set(picked) == {0, 1, 2, 3}  # a uniformly chosen sample, not the argmax
    again: dict = {}
    select(cands, groups, S, S, again, random_accept=(0.3, 7))
    assert again == rand  # seeded


def test_bad_experiment_input(tmp_path):
    from ra3_jax.cli import main

    assert main(["experiment", "chains", "--out", str(tmp_path / "x"), "--arms", "base,bogus"]) == 2
    assert main(["experiment", "chains", "--out", str(tmp_path / "x"), "--pretrain-config", str(tmp_path / "none.yaml")]) == 2
    assert main(["experiment", "chains", "--out", str(tmp_path / "x"), "evalx:train.steps=3"]) == 2
    assert not os.path.exists(tmp_path / "x" / "results.jsonl")
