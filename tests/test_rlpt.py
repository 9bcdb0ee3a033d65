"""RLPT: segmenters and the prefix judge on hand-made cases; a tiny-model run on a synthetic corpus whose next
sentences are predictable (half the time): the ASR reward must rise from sampling (sum p^2) toward the mode."""

import json

import numpy as np

from ra3_jax.data.segments import make_triples, split_code, split_sentences
from ra3_jax.objectives.segment_reward import END, START, extract_prediction, normalize, prefix_reward


def test_sentence_splitter():
    text = "Dr. Smith arrived at 3 p.m. today. He said hi! Was it 3.5 mm wide? Yes, e.g. the blue one.\n\nNew part here."
    segs = split_sentences(text)
    assert "".join(segs) == text
    assert [s.strip() for s in segs] == [
        "Dr. Smith arrived at 3 p.m. today.",
        "He said hi!",
        "Was it 3.5 mm wide?",
        "Yes, e.g. the blue one.",
        "New part here.",
    ]
    assert split_sentences("no end") == ["no end"] and split_sentences("") == []


def test_code_segmenter_and_triples():
    src = "import os\n\n\ndef f(x):\n    y = x + 1\n    return y\n\nprint(f(2))\n"
    segs = split_code(src)
    assert "".join(segs) == src
    assert [s.strip().splitlines()[0] for s in segs] == ["import os", "def f(x):", "y = x + 1", "return y", "print(f(2))"]
    tr = make_triples(src, "a.py", "code", min_chars=9)
    assert [t.target.strip() for t in tr] == ["def f(x):", "y = x + 1", "print(f(2))"]  # "return y" is too short
    t = tr[1]
    assert t.context == "import os\n\n\ndef f(x):\n" and t.next.strip() == "return y"
    assert t.after[0] == t.target and len(t.after) <= 4
    assert all(x.index >= 1 for x in tr)  # s_0 is never a target (empty context)


def test_prefix_judge_hand_cases():
    after = ("The cat sat on the mat. ", "Then it slept. ", "The end.")
    target = after[0]
    assert prefix_reward("The cat sat on the mat.", after, target) == 1.0
    assert prefix_reward("  The cat   sat on\nthe mat. ", after, target) == 1.0  # whitespace-insensitive
    assert prefix_reward("The cat sat on the mat. Then it", after, target) == 1.0  # runs into the next segment
    assert prefix_reward("The cat sat", after, target) == 0.0  # does not cover the target
    assert prefix_reward("The cat sat on a mat.", after, target) == 0.0  # diverges
    assert prefix_reward("the cat sat on the mat.", after, target) == 0.0  # case matters
    assert prefix_reward("", after, target) == 0.0 and prefix_reward("   ", after, target) == 0.0
    assert prefix_reward(None, after, target) == 0.0
    # extraction: the end tag is required; a re-opened start tag keeps what follows it
    assert extract_prediction("The cat sat on the mat." + END + " junk") == "The cat sat on the mat."
    assert extract_prediction("The cat sat on the mat.") is None  # missing end tag
    assert extract_prediction("x" + START + "The cat." + END) == "The cat."
    assert extract_prediction(END) == ""
    assert normalize(" a \n\t b ") == "a b"


SENTENCES = [
    "Red fox runs.",
    "Blue owl sings.",
    "Green frog jumps.",
    "Gold bee hums.",
    "Gray wolf howls.",
    "Pink fish swims.",
    "Black cat naps.",
    "White dog digs.",
]


def _doc(rng, n, tag, p_next=0.5):
    k = int(rng.integers(len(SENTENCES)))
    seq = []
    for _ in range(n):
        seq.append(k)
        k = (k + 1) % len(SENTENCES) if rng.random() < p_next else int(rng.integers(len(SENTENCES)))
    parts = [SENTENCES[i] + " " for i in seq]
    if tag:  # pre-training text that shows the prediction format
        j = int(rng.integers(1, n))
        parts[j] = START + SENTENCES[seq[j]] + END + " "
    return "".join(parts)


def test_rlpt_reward_rises_on_predictable_next_sentences(tmp_path):
    from ra3_jax.algorithms.rlpt import RLPTEnv, cold_start_sft, rlpt
    from ra3_jax.config import load_config
    from ra3_jax.tokenizer import train_sentencepiece
    from ra3_jax.train.context import build_run_context
    from ra3_jax.train.ntp import train

    rng = np.random.default_rng(0)
    # pre-training text: the successor sentence half the time (a random one otherwise), the prediction format in
    # 70% of documents; RLPT text: always the successor. The pretrained policy samples the successor ~56% of the
    # time; RL should make it (nearly) always.
    for name, n, tag, p_next in (("pre", 800, 0.7, 0.5), ("rl", 200, 0.0, 1.0)):
        d = tmp_path / name
        d.mkdir()
        for j in range(n):
            (d / f"d{j:04d}.txt").write_text(_doc(rng, 8, rng.random() < tag, p_next))
    texts = [p.read_text() for p in sorted((tmp_path / "pre").iterdir())]
    tok = train_sentencepiece(texts, 320, str(tmp_path / "tok"), num_threads=1)
    common = [
        "tokenizer.kind=sentencepiece",
        f"tokenizer.path={tmp_path / 'tok'}",
        f"data.tfds_dir={tmp_path / 'tfds'}",
        "data.include_glob=*.txt",
        "data.exclude_tests=false",
        "data.seq_len=128",
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
        "model.max_seq_len=512",
    ]
    train(
        load_config(
            None,
            common
            + model
            + [
                f"data.source_dirs=[{tmp_path / 'pre'}]",
                "train.steps=400",
                "optim.lr=3e-3",
                f"train.out_dir={tmp_path / 'pre_run'}",
                "optim.warmup_steps=10",
                "train.eval_every=0",
                "train.ckpt_every=400",
                "data.validation_fraction=0.0",
            ],
        ),
        mode="pretrain",
    )
    run = tmp_path / "rlpt"
    rl_cfg = load_config(
        None,
        common
        + [
            "model.init=orbax",
            f"model.path={tmp_path / 'pre_run'}",
            f"data.source_dirs=[{tmp_path / 'rl'}]",
            "data.validation_fraction=0.1",
            "rlpt.segmenter=text",
            "rlpt.min_segment_chars=4",
            "rlpt.max_context_chars=200",
            "rlpt.msr_fraction=0.25",
            "rlpt.msr_weight=0.5",
            "policy.prompts_per_step=8",
            "policy.group_size=8",
            "policy.max_new_tokens=40",
            "rlpt.eval_triples=64",
            "eval.max_new_tokens=40",
            "optim.lr=5e-4",
            "optim.schedule=constant",
            "optim.warmup_steps=1",
            "optim.weight_decay=0",
            "train.steps=24",
            "train.eval_every=24",
            "train.ckpt_every=12",
            f"train.out_dir={run}",
        ],
    )
    tr = RLPTEnv.from_config(rl_cfg)
    kinds = {t.kind for t in tr.tasks}
    assert kinds == {"asr", "msr"}
    msr_rows = tr.adv_weights(list(range(8)), 8)
    assert set(np.unique(msr_rows)) <= {0.5, 1.0}  # lambda = 0.5 on MSR rows, 1 on ASR rows
    assert np.array_equal(msr_rows == 0.5, np.repeat([tr.tasks[i].kind == "msr" for i in range(8)], 8))
    rlpt(rl_cfg)
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    asr = [r["reward_asr"] for r in rows if "reward_asr" in r]
    evals = [r["eval/next_segment_acc"] for r in rows if "eval/next_segment_acc" in r]
    print("rlpt asr rewards:", [round(x, 2) for x in asr], "held-out acc:", evals)
    # The run is not bitwise reproducible across processes (measured over 9 runs: first 3 steps 0.45-0.66,
    # last 4 steps 0.79-0.89; on an AVX-512 VM 4 more runs: first 3 0.51-0.62, last 4 0.71-0.88, last 8
    # 0.73-0.88), hence the margins; the last 8 steps' mean (512 rollouts) is the steadier statistic.
    assert np.mean(asr[:3]) < 0.75 and np.mean(asr[-8:]) > max(0.7, np.mean(asr[:3]) + 0.15), asr
    assert len(evals) == 2 and evals[-1] >= evals[0] - 0.1
    assert np.mean([r["end_tag_rate"] for r in rows if "end_tag_rate" in r][-4:]) > 0.5  # MSR rows included

    # cold-start SFT (format teaching) lowers its loss; a model judge scores through our sampler, cached
    common_rl = common + [
        "model.init=orbax",
        f"model.path={tmp_path / 'pre_run'}",
        f"data.source_dirs=[{tmp_path / 'rl'}]",
        "data.validation_fraction=0.1",
        "rlpt.segmenter=text",
        "rlpt.min_segment_chars=4",
        "rlpt.eval_triples=0",
        "train.steps=1",
    ]
    sft_cfg = load_config(
        None, common_rl + ["rlpt.sft_steps=6", "rlpt.sft_lr=1e-3", "rlpt.sft_batch=8", f"train.out_dir={tmp_path / 'sft'}"]
    )
    ctx = build_run_context(sft_cfg)
    _, sft_losses = cold_start_sft(ctx, RLPTEnv.from_config(sft_cfg), ctx.params)
    ctx.ckpt.close()
    assert len(sft_losses) == 6 and sft_losses[-1] < sft_losses[0], sft_losses
    judged = RLPTEnv.from_config(
        load_config(
            None,
            common_rl
            + [
                "rlpt.judge=model",
                "rlpt.judge_init=orbax",
                f"rlpt.judge_model={tmp_path / 'pre_run'}",
                f"train.out_dir={tmp_path / 'j'}",
            ],
        )
    )
    t = judged.tasks[0].triple
    r = judged.judge_many([t.target, None, ""], [t, t, t])
    assert r.shape == (3,) and set(r.tolist()) <= {0.0, 1.0} and r[1] == 0.0 and r[2] == 0.0
    n = len(judged._judge_cache)
    judged.judge_many([t.target], [t])
    assert len(judged._judge_cache) == n  # cached
