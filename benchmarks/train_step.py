"""Train-step throughput: ours vs HF transformers LlamaForCausalLM (eager, CPU torch), and MFU against a
matmul ceiling measured in the same run. Shape (issue #2): d=512, 8 layers, vocab 16k, seq 512,
2048 tokens/step, float32. Usage: python benchmarks/train_step.py [--steps 4] [--trials 3] [--scan-unroll 1]
[--dtype float32|bfloat16] [--preset cpu|1b] (1b = a ~1B Llama shape for GPUs) [--attention xla,blocked,pallas]
[--attention-block 128]. Each attention implementation (model/attention.py) is measured in the same run; ratios
are against the first one (the XLA reference by default) and against HF eager. Each side's best of ``--trials``
timed runs counts (the 2-core VM's run-to-run spread is ~5%, HF's more).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ra3_jax import sharding
from ra3_jax.config import OptimSection
from ra3_jax.model import LlamaConfig, init_params
from ra3_jax.train.state import create_state, make_optimizer, state_shardings
from ra3_jax.train.step import jit_train_step

PRESETS = {
    "cpu": dict(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408, batch=4, seq=512),
    "1b": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=5632, batch=8, seq=2048),
}


def model_flops_per_token(cfg: LlamaConfig, seq: int) -> float:
    """6 * (matmul params incl. output head) + causal attention scores/values (6 * L * T * d, fwd+bwd)."""
    d, f, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    hq, hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    dense = L * (d * hq + 2 * d * hk + hq * d + 3 * d * f) + d * V
    return 6.0 * dense + 6.0 * L * seq * hq


def best_rate(run, work: float, trials: int) -> float:
    """The best of ``trials`` timings of ``run()`` (which returns once its work is done), as ``work`` per second."""
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        run()
        best = max(best, work / (time.perf_counter() - t))
    return best


def matmul_ceiling(dtype, n=None, reps=5, trials=3) -> float:
    """Best-of-`trials` FLOP/s of a square matmul (the machine's practical peak for this dtype)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)  # big enough to saturate an H100
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()

    def run():
        for _ in range(reps):
            out = f(a, b)
        out.block_until_ready()

    return best_rate(run, 2 * n**3 * reps, trials)


def bench_ours(cfg, batch, seq, steps, dtype, trials=1):
    mesh = sharding.make_mesh(-1, 1, 1)
    tx = make_optimizer(OptimSection(lr=1e-4, warmup_steps=1), 1000)
    state = create_state(init_params(cfg, jax.random.key(0), mesh), tx, cfg, mesh)
    step = jit_train_step(cfg, tx, 1, mesh, state_shardings(cfg, tx, mesh))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }
    b = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in b.items()}
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    state, m = step(state, b)
    jax.block_until_ready(m)

    def run():
        nonlocal state, m
        for _ in range(steps):
            state, m = step(state, b)
        jax.block_until_ready(m)

    return best_rate(run, batch * seq * steps, trials), compile_s


def bench_hf(cfg, batch, seq, steps, trials=1):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=seq,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    toks = torch.randint(0, cfg.vocab_size, (batch, seq))

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=toks, labels=toks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    one()
    return best_rate(lambda: [one() for _ in range(steps)], batch * seq * steps, trials)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="steps per trial")
    ap.add_argument("--trials", type=int, default=3, help="each side's best trial counts (both sides alike)")
    ap.add_argument("--scan-unroll", type=int, default=1, help="model.scan_unroll (layers per scan iteration)")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--attention", default="xla,blocked", help="comma-separated implementations (model/attention.py)")
    ap.add_argument("--attention-block", type=int, default=128)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    batch, seq = p.pop("batch"), p.pop("seq")
    cfg = LlamaConfig(
        **p,
        tie_embeddings=False,
        max_seq_len=seq,
        param_dtype="float32",
        compute_dtype=args.dtype,
        remat=args.remat,
        scan_unroll=args.scan_unroll,
    )
    ceiling = matmul_ceiling(jnp.dtype(args.dtype))
    flops = model_flops_per_token(cfg, seq)
    res = {
        "device": str(jax.devices()[0].device_kind),
        "n_devices": len(jax.devices()),
        "preset": args.preset,
        "dtype": args.dtype,
        "params": cfg.num_params(),
        "tokens_per_step": batch * seq,
        "scan_unroll": args.scan_unroll,
        "timing": f"best of {args.trials} trials of {args.steps} steps, each side",
        "matmul_ceiling_tflops": round(ceiling / 1e12, 3),
        "attention": {},
    }
    first = None
    for impl in args.attention.split(","):
        c = cfg.replace(attention=impl, attention_block=args.attention_block)
        ours, compile_s = bench_ours(c, batch, seq, args.steps, args.dtype, args.trials)
        first = first or ours
        res["attention"][impl] = {
            "tokens_per_s": round(ours, 1),
            "compile_s": round(compile_s, 1),
            "model_tflops": round(ours * flops / 1e12, 3),
            "mfu_vs_measured_ceiling": round(ours * flops / ceiling, 3),
            "ratio_vs_first": round(ours / first, 3),
        }
    if not args.no_hf:
        hf = bench_hf(cfg, batch, seq, args.steps, args.trials)
        res["hf_eager_tokens_per_s"] = round(hf, 1)
        for r in res["attention"].values():
            r["ratio_vs_hf_eager"] = round(r["tokens_per_s"] / hf, 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
