"""RLVR step time split (rollout / reward / update) on MBPP train prompts.

    python benchmarks/rlvr_step.py --preset tiny|smollm2 [--model-path smollm2] [--steps 4] [--tasks F.jsonl]

--preset smollm2 is SmolLM2-135M's shape (d=576, 30 layers, GQA 9/3, vocab 49152, tied); with --model-path it
loads real weights (GGUF or Orbax dir), otherwise random ones (then every sample runs to --max-new-tokens and
fails its tests: the worst case for rollout time). Tasks come from the MBPP train split (--data-dir) or a JSONL
of {task_id, prompt, test, prefix} (--tasks, e.g. written by --write-tasks on a machine that has the data).
Prints the mean of each phase over the steps after the first (which includes compilation).
"""

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    "tiny": [
        "model.vocab_size=512",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=128",
        "model.max_seq_len=2048",
    ],
    "smollm2": [
        "model.vocab_size=49152",
        "model.d_model=576",
        "model.n_layers=30",
        "model.n_heads=9",
        "model.n_kv_heads=3",
        "model.d_ff=1536",
        "model.max_seq_len=2048",
        "model.rope_theta=100000",
        "model.tie_embeddings=true",
    ],
}


def write_tasks(path, data_dir, tfds_dir):
    from ra3_jax.data.code_benchmarks import load_benchmark
    from ra3_jax.evaluation.code_eval import PromptFormat

    fmt = PromptFormat.create("mbpp")
    with open(path, "w") as f:
        for t in load_benchmark("mbpp", "train", data_dir=data_dir, tfds_dir=tfds_dir):
            f.write(json.dumps({"task_id": t["task_id"], "prompt": fmt.prompt(t), "test": t["test"], "prefix": ""}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=PRESETS)
    ap.add_argument("--model-path", default="", help="real weights: a GGUF ('smollm2') or an Orbax model dir")
    ap.add_argument("--tokenizer", default="", help="tokenizer dir/file (default: from the model, or the test spm)")
    ap.add_argument("--tasks", default="")
    ap.add_argument("--write-tasks", default="", help="write MBPP train tasks as JSONL here and exit")
    ap.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "shared", "data"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=0, help="rows per update micro-batch (0 = all)")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="rlvr-bench-")
    if args.write_tasks:
        write_tasks(args.write_tasks, args.data_dir, os.path.join(out, "tfds"))
        return
    from ra3_jax import enable_compilation_cache
    from ra3_jax.algorithms.grpo import run_grpo
    from ra3_jax.algorithms.rlvr import RLVREnv
    from ra3_jax.config import load_config

    enable_compilation_cache()
    over = [
        f"model.param_dtype={args.dtype}",
        f"model.compute_dtype={args.dtype}",
        "mesh.data=-1",
        f"data.tfds_dir={os.path.join(out, 'tfds')}",
        f"train.out_dir={os.path.join(out, 'run')}",
        "train.progress=false",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        f"train.ckpt_every={10**6}",
        "eval.benchmarks=[]",
        f"policy.prompts_per_step={args.prompts}",
        f"policy.group_size={args.group}",
        f"policy.max_new_tokens={args.max_new_tokens}",
        f"rlvr.sandbox_workers={args.workers}",
        f"policy.micro_batch={args.micro_batch}",
        "optim.lr=1e-6",
        "optim.schedule=constant",
        "optim.warmup_steps=1",
    ]
    if args.model_path:
        over += [
            "model.init=" + ("gguf" if args.model_path == "smollm2" or args.model_path.endswith(".gguf") else "orbax"),
            f"model.path={args.model_path}",
        ]
    else:
        over += PRESETS[args.preset]
    if args.tokenizer:
        kind = "sentencepiece" if os.path.exists(os.path.join(args.tokenizer, "tokenizer.model")) else "hf"
        over += [f"tokenizer.kind={kind}", f"tokenizer.path={args.tokenizer}"]
    if args.tasks:
        over.append(f"rlvr.tasks_file={args.tasks}")
    else:
        over += [f"data.benchmark_dir={args.data_dir}", "rlvr.benchmark=mbpp", "rlvr.split=train"]
    cfg = load_config(None, over)
    from ra3_jax.train.context import build_run_context

    env = RLVREnv.from_config(cfg)
    run_grpo(build_run_context(cfg), env)
    sandbox = env.sandbox.sandbox
    rows = [json.loads(x) for x in open(os.path.join(cfg.train.out_dir, "metrics.jsonl"))][1:]
    if not rows:
        sys.exit("need --steps >= 2 (the first step includes compilation)")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    import jax

    print(
        f"device: {jax.devices()[0].device_kind}; preset {args.preset}"
        f"{' (real weights)' if args.model_path else ' (random weights)'}; "
        f"{args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens, {args.dtype}; "
        f"sandbox isolated={sandbox.isolated}, process cap={sandbox.process_cap}; mean of {len(rows)} steps after the first"
    )
    print(
        f"  rollout {mean('rollout_s'):.3f} s ({mean('rollout_tokens_per_s'):,.0f} tokens/s, "
        f"mean response {mean('response_len'):.0f} tokens)"
    )
    print(
        f"  reward  {mean('reward_s'):.3f} s ({args.prompts * args.group} programs; "
        f"reward share {100 * mean('reward_share'):.1f}%)"
    )
    print(f"  update  {mean('update_s'):.3f} s")
    print(f"  step    {mean('step_s'):.3f} s; mean reward {mean('reward'):.3f}")


if __name__ == "__main__":
    main()
