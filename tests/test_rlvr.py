"""RLVR (GRPO with sandbox rewards): hand-computed update pieces, task streaming, and a tiny-model run on a
synthetic "return the constant K" task where the reward must rise; resume after interruption is exact."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ra3_jax.algorithms.grpo import grpo_update, rollout_rows, task_batch
from ra3_jax.config import load_config
from ra3_jax.model.llama import LlamaConfig, forward
from ra3_jax.model.params import init_params
from ra3_jax.train.state import TrainState

K = 7


def test_task_batch_is_an_endless_resumable_permutation_stream():
    a = task_batch(5, 0, 12, seed=3)
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:10]) == list(range(5))
    assert task_batch(5, 7, 5, seed=3) == a[7:12]  # any cursor resumes the same stream
    # epoch e is the permutation drawn from default_rng([seed, e]) (reference computed here)
    assert a[:5] == np.random.default_rng([3, 0]).permutation(5).tolist()
    assert a[5:10] == np.random.default_rng([3, 1]).permutation(5).tolist()
    assert len({tuple(task_batch(5, 0, 5, seed=s)) for s in range(3, 9)}) > 1  # the seed changes the stream


def test_rollout_rows_mask_the_response_only():
    class Out:
        tokens = np.array([[5, 6, 0], [7, 0, 0]])
        lengths = np.array([2, 1])

    rows = rollout_rows([[1, 2, 3]], Out, G=2, pad=0)
    assert rows["inputs"][0, :4].tolist() == [1, 2, 3, 5] and rows["targets"][0, :4].tolist() == [2, 3, 5, 6]
    assert rows["resp_mask"][0, :5].tolist() == [0, 0, 1, 1, 0]  # targets 5 and 6 are the response
    assert rows["resp_mask"][1, :4].tolist() == [0, 0, 1, 0]
    assert rows["segment_ids"][1, :4].tolist() == [1, 1, 1, 0]


def test_grpo_update_loss_and_entropy_hand_computed():
    import optax

    cfg = LlamaConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=16)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    N, T, G = 8, 6, 4
    toks = rng.integers(1, 32, (N, T + 1)).astype(np.int32)
    mask = np.zeros((N, T), np.float32)
    for i in range(N):
        mask[i, 2 : 2 + 1 + i % 4] = 1  # 1..4 response tokens per row
    rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0], np.float32)
    batch = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "positions": np.tile(np.arange(T, dtype=np.int32), (N, 1)),
        "segment_ids": np.ones((N, T), np.int32),
        "resp_mask": mask,
        "old_logp": np.zeros((N, T), np.float32),
        "rewards": rewards,
    }
    tx = optax.sgd(0.0)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    _, m = grpo_update(
        state,
        None,
        batch,
        cfg=cfg,
        tx=tx,
        G=G,
        clip_eps=0.2,
        advantage="grpo",
        kl_coef=0.0,
        kl_estimator="k3",
        aggregation="token",
        on_policy=True,
    )
    # GRPO advantages by hand: group 1 = [1,0,0,0] -> mean 1/4, std sqrt(3)/4; group 2 = [1,1,0,0] -> +-1
    s = np.sqrt(3) / 4
    adv = np.array([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s, 1, 1, -1, -1])
    n_i = mask.sum(1)
    assert float(m["loss"]) == pytest.approx(-(adv * n_i).sum() / n_i.sum(), rel=1e-4, abs=1e-5)
    logits, _ = forward(params, batch["inputs"], batch["positions"], cfg)
    p = np.asarray(jax.nn.softmax(np.asarray(logits, np.float64), -1))
    ent = -(p * np.log(p)).sum(-1)
    assert float(m["entropy"]) == pytest.approx((ent * mask).sum() / mask.sum(), rel=1e-4)
    assert float(m["clip_frac"]) == 0.0 and float(m["kl"]) == 0.0
    # micro-batches of 2 rows (scan with gradient accumulation) take the same step
    for agg in ("token", "sequence"):
        sgd = optax.sgd(1.0)
        full, mf = grpo_update(
            TrainState(jnp.zeros((), jnp.int32), params, sgd.init(params)),
            None,
            batch,
            cfg=cfg,
            tx=sgd,
            G=G,
            clip_eps=0.2,
            advantage="grpo",
            kl_coef=0.0,
            kl_estimator="k3",
            aggregation=agg,
            on_policy=True,
        )
        part, mp = grpo_update(
            TrainState(jnp.zeros((), jnp.int32), params, sgd.init(params)),
            None,
            batch,
            cfg=cfg,
            tx=sgd,
            G=G,
            clip_eps=0.2,
            advantage="grpo",
            kl_coef=0.0,
            kl_estimator="k3",
            aggregation=agg,
            on_policy=True,
            micro_batch=2,
        )
        assert float(mp["loss"]) == pytest.approx(float(mf["loss"]), rel=1e-5, abs=1e-6)
        assert float(mp["entropy"]) == pytest.approx(float(mf["entropy"]), rel=1e-5)
        for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(part.params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def _final_params(run_dir):
    from ra3_jax.model.params import abstract_params
    from ra3_jax.model.store import read_model_config
    from ra3_jax.train.checkpoint import RunCheckpointer

    ck = RunCheckpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
    try:
        return jax.device_get(ck.restore_params(ck.latest_step(), abstract_params(read_model_config(str(run_dir)))))
    finally:
        ck.close()


def _constant_corpus(d, n, seed):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = []
    for j in range(n):
        t = f"def f():\n    return {int(rng.integers(10))}\n"
        texts.append(t)
        with open(os.path.join(d, f"p{j:05d}.py"), "w") as f:
            f.write(t)
    return texts


def test_rlvr_reward_rises_on_return_constant_and_resumes_exactly(tmp_path, shared_data):
    """A tiny model pretrained on `def f(): return <random digit>` (reward ~ 1/10 for "return 7") is GRPO-trained
    with sandbox rewards on `assert f() == 7`: the pass rate must rise. A run interrupted at step 4 and resumed
    ends with the same parameters as an uninterrupted one."""
    from ra3_jax.algorithms.rlvr import rlvr
    from ra3_jax.tokenizer import train_sentencepiece
    from ra3_jax.train.ntp import train

    texts = _constant_corpus(str(tmp_path / "src"), 600, 0)
    tok = train_sentencepiece(texts * 4, 320, str(tmp_path / "tok"))
    common = [
        "tokenizer.kind=sentencepiece",
        f"tokenizer.path={tmp_path / 'tok'}",
        f"data.tfds_dir={tmp_path / 'tfds'}",
        "data.exclude_tests=false",
        "data.seq_len=64",
        "data.batch_size=16",
        "train.progress=false",
        "mesh.data=-1",
    ]
    model = [
        f"model.vocab_size={tok.vocab_size}",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=128",
        "model.max_seq_len=1024",
    ]
    train(
        load_config(
            None,
            common
            + model
            + [
                f"data.source_dirs=[{tmp_path / 'src'}]",
                "train.steps=120",
                "optim.lr=3e-3",
                f"train.out_dir={tmp_path / 'pre'}",
                "optim.warmup_steps=10",
                "train.eval_every=0",
                "train.ckpt_every=120",
                "data.validation_fraction=0.0",
            ],
        ),
        mode="pretrain",
    )
    tasks = tmp_path / "tasks.jsonl"
    with open(tasks, "w") as f:
        for i in range(4):
            f.write(json.dumps({"task_id": f"const/{i}", "prompt": "def f():\n", "test": f"assert f() == {K}\n"}) + "\n")

    def rl_cfg(out, steps, extra=()):
        return load_config(
            None,
            common
            + [
                "model.init=orbax",
                f"model.path={tmp_path / 'pre'}",
                f"rlvr.tasks_file={tasks}",
                "policy.prompts_per_step=4",
                "policy.group_size=8",
                "policy.max_new_tokens=8",
                "eval.benchmarks=[]",
                "rlvr.timeout_s=5",
                "optim.lr=1e-3",
                "optim.schedule=constant",
                "optim.warmup_steps=1",
                "optim.weight_decay=0",
                f"train.steps={steps}",
                "train.ckpt_every=4",
                "train.eval_every=0",
                f"train.out_dir={out}",
                *extra,
            ],
        )

    rlvr(rl_cfg(tmp_path / "rl", 16))
    import yaml

    saved = yaml.safe_load(open(tmp_path / "rl" / "config.yaml"))["model"]  # the config the run actually used:
    assert saved["vocab_size"] == tok.vocab_size != 512 and saved["init"] == "orbax"  # the loaded shape, not the default
    rows = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    rewards = [r["reward"] for r in rows if "reward" in r]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-4:])
    print("rlvr rewards:", [round(x, 2) for x in rewards])
    assert first < 0.4 and last > first + 0.3, rewards
    assert {"rollout_s", "reward_s", "update_s", "reward_share", "kl", "entropy", "response_len", "rollout_tokens_per_s"} <= set(
        rows[-1]
    )

    # resume: 4 steps, then the same run continued to 8, against 8 uninterrupted steps
    assert rlvr(rl_cfg(tmp_path / "a", 4))["task_cursor"] == 16
    ra = rlvr(rl_cfg(tmp_path / "a", 8))
    assert ra["resumed_from"] == 4 and ra["task_cursor"] == 32
    # the uninterrupted run also evaluates greedy pass@1 on 2 HumanEval tasks at steps 0, 4 and 8
    rb = rlvr(
        rl_cfg(
            tmp_path / "b",
            8,
            [
                f"data.benchmark_dir={shared_data}",
                "eval.benchmarks=[humaneval]",
                "eval.tasks=2",
                "eval.max_new_tokens=8",
                "train.eval_every=4",
            ],
        )
    )
    assert rb["resumed_from"] == 0
    evals = [
        (r["step"], r["eval/humaneval/pass@1"])
        for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl"))
        if "eval/humaneval/pass@1" in r
    ]
    assert [s for s, _ in evals] == [0, 4, 8] and all(v == 0.0 for _, v in evals)  # a digit model solves nothing
    assert (tmp_path / "b" / "eval" / "step_8" / "humaneval" / "results.jsonl").exists()
    for x, y in zip(jax.tree.leaves(_final_params(tmp_path / "a")), jax.tree.leaves(_final_params(tmp_path / "b"))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # the CLI on the same run: `ra3 eval` with this model (2 HumanEval tasks) and `ra3 report`
    from ra3_jax.cli import main

    model_args = common + ["model.init=orbax", f"model.path={tmp_path / 'pre'}", f"train.out_dir={tmp_path / 'rl'}"]
    assert (
        main(
            [
                "eval",
                "--benchmark",
                "humaneval",
                "--data-dir",
                shared_data,
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--k",
                "1",
                "--out",
                str(tmp_path / "ev"),
                *model_args,
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in open(tmp_path / "ev" / "results.jsonl")]
    assert len(rows) == 2 and {r["task_id"] for r in rows} == {"HumanEval/0", "HumanEval/1"}
    assert (
        main(
            [
                "report",
                str(tmp_path / "rl"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "rep"),
                "--label",
                "long",
                "--label",
                "resumed",
            ]
        )
        == 0
    )
    assert (tmp_path / "rep" / "reward.png").stat().st_size > 5000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| long | 16 |" in md and "| resumed | 8 |" in md and "reward.png" in md
