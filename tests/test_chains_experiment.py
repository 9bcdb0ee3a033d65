"""`ra3 experiment chains` end to end on a reduced setting (1 seed, a few documents, a 1-layer model): mechanics
only. Every arm leaves a loadable model dir, the results and report files are complete, RLVR runs from each
start, and a rerun skips every finished stage."""

import json
import os

import pytest

ARMS = ("base", "ntp", "ntp_flops", "ra3", "random")
REDUCED = [
    "chains.pretrain_docs=300",
    "chains.midtrain_docs=48",
    "chains.validation_docs=16",
    "chains.rlvr_tasks=16",
    "chains.eval_per_k=3",
    "pretrain:model.d_model=32",
    "pretrain:model.n_layers=1",
    "pretrain:model.n_heads=2",
    "pretrain:model.n_kv_heads=2",
    "pretrain:model.d_ff=64",
    "pretrain:train.steps=6",
    "pretrain:train.eval_every=3",
    "pretrain:train.ckpt_every=3",
    "pretrain:data.batch_size=8",
    "midtrain:ra3.iterations=1",
    "midtrain:ra3.docs_per_iteration=8",
    "midtrain:ra3.estep_batch_docs=8",
    "midtrain:ra3.candidates_per_doc=1",
    "midtrain:ra3.max_latent_tokens=8",
    "midtrain:ra3.mstep_steps=2",
    "midtrain:ra3.eval_docs=2",
    "midtrain:ra3.eval_candidates_per_doc=1",
    "midtrain:data.batch_size=8",
    "midtrain:policy.group_size=2",
    "rlvr:train.steps=2",
    "rlvr:train.eval_every=2",
    "rlvr:policy.prompts_per_step=4",
    "rlvr:policy.group_size=2",
    "rlvr:policy.max_new_tokens=16",
    "rlvr:eval.max_new_tokens=16",
]


@pytest.mark.slow
def test_reduced_chains_experiment_end_to_end(tmp_path, tfds_dir, capsys):
    from ra3_jax.cli import main
    from ra3_jax.experiments.chains import load_model_dir

    out = tmp_path / "chains"
    args = ["experiment", "chains", "--seeds", "1", "--out", str(out), "--samples", "2", "--gate", "0", "--base-step", "3"]
    args += [f"data.tfds_dir={tfds_dir}", "train.progress=false", *REDUCED]
    assert main(args) == 0
    for arm in ARMS:
        cfg, params, tok = load_model_dir(str(out / "seed0" / arm / "model"))
        assert cfg.d_model == 32 and tok.encode("def f(x):")
    rows = [json.loads(x) for x in open(out / "results.jsonl")]
    assert len(rows) == len(ARMS) * 3 * 2 * 6  # arms x modes x decodings x k
    assert {(r["arm"], r["mode"], r["decoding"]) for r in rows} == {
        (a, m, d) for a in ARMS for m in ("free", "forced", "banned") for d in ("greedy", "t0.8")
    }
    assert all(r["n_tasks"] == 3 and 0 <= r["pass@1"] <= 1 and r["seed"] == 0 for r in rows)
    for start in ("base", "ntp", "ra3"):
        metrics = [json.loads(x) for x in open(out / "seed0" / f"rlvr_{start}" / "metrics.jsonl")]
        assert [m["step"] for m in metrics if "eval/jsonl_eval/pass@1" in m] == [0, 2]
    random_cfg = (out / "seed0" / "random" / "run" / "config.yaml").read_text()
    assert "selection: random" in random_cfg
    flops_cfg = (out / "seed0" / "ntp_flops" / "run" / "config.yaml").read_text()
    assert "baseline: true" in flops_cfg and "mstep_steps: 2\n" not in flops_cfg  # more steps than RA3's 2
    report = (out / "report.md").read_text()
    assert "ra3" in report and os.path.getsize(out / "pass_by_k.png") > 5000
    assert json.load(open(out / "experiment.json"))["seeds"] == [0]
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0  # every stage is done: nothing reruns
    assert "[chains] seed 0:" not in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before
    # the base is pre-training step 3 of a 6-step schedule (a weaker base): pre-training stopped there
    import jax
    import numpy as np

    assert sorted(os.listdir(out / "pretrain" / "checkpoints")) == ["3"]
    base = load_model_dir(str(out / "seed0" / "base" / "model"))[1]
    step3 = load_model_dir(str(out / "pretrain"), 3)[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(step3)))
    other = [a if a != "3" else "6" for a in args]  # another base in the same dir would mix arms from two bases
    assert main(other) == 2
    assert "was run with --base-step 3" in capsys.readouterr().err
    # a sweep shares that pre-training (linked, not retrained) and may start from another of its steps
    out2 = tmp_path / "sweep"
    sweep = ["experiment", "chains", "--seeds", "1", "--out", str(out2), "--samples", "0", "--gate", "0"]
    sweep += ["--base-step", "3", "--pretrain-from", str(out), "--arms", "ra3", "--rlvr-starts", ""]
    sweep += [a for a in args[args.index("--base-step") + 2 :]]
    assert main(sweep) == 0
    assert os.path.islink(out2 / "pretrain" / "checkpoints") and os.path.islink(out2 / "tokenizer")
    base2 = load_model_dir(str(out2 / "pretrain" / "model"))[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base2), jax.tree.leaves(step3)))
    assert sorted(os.listdir(out2 / "seed0")) == ["ra3"]
    capsys.readouterr()
    wrong = [a if a != "3" else "5" for a in sweep]  # the shared run has no step 5
    assert main([*wrong[:5], str(tmp_path / "sweep2"), *wrong[6:]]) == 2
    assert "no checkpoint at step 5" in capsys.readouterr().err
