"""The one prepared device check (issue #17): random weights in real shapes, every number in one JSON.

Sections (each runs on its own; a failing one is recorded with its error and the others still run):
- ``train``: train-step tokens/s and MFU at the ~1B Llama shape (benchmarks/train_step.py's ``1b`` preset), bf16,
  for each attention implementation (model/attention.py), MFU against the device's dense bf16 peak and against
  a matmul ceiling measured in the same run.
- ``decode``: the in-graph sampler's decode tokens/s at the SmolLM2-135M shape for several batch sizes, against
  the HBM-bandwidth roofline (each step reads every weight once plus the KV cache slots it attends).
- ``estep``: one RA3 E-step round (propose, score, policy-gradient update) at the SmolLM2-135M shape, on
  documents cut from the Python standard library with a sentencepiece tokenizer trained here (no GGUF there).

Usage: python benchmarks/gpu_check.py --out DIR [--dry-run] [--sections train,decode,estep]
``--dry-run`` shrinks every shape so the script runs on a CPU in about a minute (CI runs it that way);
``benchmarks/gpu_check.sh`` runs it on the device machine and writes DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from sampler import SMOLLM2_SHAPE  # noqa: E402  (benchmarks/sampler.py)

from ra3_jax.model import LlamaConfig, init_params  # noqa: E402

# Dense bf16 peak and HBM bandwidth by device kind (vendor figures); other devices: measured ceiling only.
DEVICE_PEAKS = {"H200": (989.4e12, 4.8e12), "H100": (989.4e12, 3.35e12)}
TINY = dict(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def device_peaks():
    kind = str(jax.devices()[0].device_kind)
    for name, peaks in DEVICE_PEAKS.items():
        if name in kind:
            return kind, peaks
    return kind, (None, None)


def section_train(dry: bool, impls: list[str]) -> dict:
    from train_step import PRESETS, bench_ours, matmul_ceiling, model_flops_per_token

    p = dict(PRESETS["1b"])
    if dry:
        p = dict(TINY, batch=2, seq=256)
    batch, seq = p.pop("batch"), p.pop("seq")
    dtype = "float32" if dry else "bfloat16"
    cfg = LlamaConfig(**p, tie_embeddings=False, max_seq_len=seq, param_dtype="float32", compute_dtype=dtype)
    ceiling = matmul_ceiling(jnp.dtype(dtype), n=512 if dry else None)
    peak = device_peaks()[1][0]
    flops = model_flops_per_token(cfg, seq)
    out = {"shape": {**p, "batch": batch, "seq": seq, "dtype": dtype, "params": cfg.num_params()}}
    out["matmul_ceiling_tflops"] = round(ceiling / 1e12, 3)
    for impl in impls:
        try:
            tps, compile_s = bench_ours(cfg.replace(attention=impl), batch, seq, 2 if dry else 10, dtype)
            row = {"tokens_per_s": round(tps, 1), "compile_s": round(compile_s, 1), "model_tflops": round(tps * flops / 1e12, 2)}
            row["mfu_vs_measured_ceiling"] = round(tps * flops / ceiling, 3)
            row["mfu_vs_peak"] = round(tps * flops / peak, 3) if peak else None
        except Exception as e:  # one implementation failing (a kernel the device rejects) is a result too
            row = {"error": f"{type(e).__name__}: {e}"[:800]}
        out[impl] = row
    return out


def section_decode(dry: bool, batches: list[int]) -> dict:
    from sampler import decode_roofline, run_ours

    dtype = "float32" if dry else "bfloat16"
    shape = TINY if dry else SMOLLM2_SHAPE
    prompt, new = (16, 16) if dry else (64, 128)
    cfg = LlamaConfig(**shape, max_seq_len=1024, param_dtype=dtype, compute_dtype=dtype)
    params = init_params(cfg, jax.random.key(0))
    bw = device_peaks()[1][1]
    nbytes = jnp.dtype(dtype).itemsize
    out = {"shape": {**shape, "dtype": dtype, "prompt": prompt, "new": new}}
    for b in batches:
        prompts = np.random.default_rng(b).integers(1, cfg.vocab_size, (b, prompt)).astype(np.int32)
        tps = run_ours(params, cfg, prompts, new)[0]
        # the cache slots attended on average: half way through the decode
        roof = decode_roofline(cfg, b, prompt + new / 2, nbytes, bw) if bw else None
        out[f"batch_{b}"] = {
            "tokens_per_s": round(tps, 1),
            "roofline_tokens_per_s": round(roof, 1) if roof else None,
            "fraction_of_roofline": round(tps / roof, 3) if roof else None,
        }
    return out


def stdlib_texts(limit_bytes: int) -> list[str]:
    """The standard library's sources (tests left out, the corpus builder's listing), up to ``limit_bytes``."""
    from ra3_jax.data.corpus import list_source_files, read_source

    texts, n = [], 0
    for f in list_source_files(["stdlib"]):
        if n >= limit_bytes:
            break
        if (text := read_source(f, skip_non_utf8=True)) is not None:
            texts.append(text)
            n += len(text)
    return texts


def section_estep(dry: bool, workdir: str) -> dict:
    from ra3_jax.algorithms.ra3 import LatentProposer, candidate_rounds, make_documents
    from ra3_jax.config import load_config
    from ra3_jax.model.store import load_model
    from ra3_jax.tokenizer import train_sentencepiece
    from ra3_jax.train.context import make_run_mesh

    texts = stdlib_texts(1_000_000 if dry else 3_000_000)
    vocab = 1024 if dry else 8192
    tok = train_sentencepiece(texts, vocab, os.path.join(workdir, "spm"))
    shape = dict(TINY, vocab_size=vocab) if dry else SMOLLM2_SHAPE
    dtype = "float32" if dry else "bfloat16"
    over = ["model.init=random", f"model.param_dtype={dtype}", f"model.compute_dtype={dtype}"]
    over += [f"model.{k}={v}" for k, v in shape.items()] + ["tokenizer.kind=sentencepiece", f"tokenizer.path={workdir}/spm"]
    over += [f"train.out_dir={workdir}/run"] + (["ra3.estep_batch_docs=4", "ra3.max_latent_tokens=8"] if dry else [])
    cfg = load_config(os.path.join(REPO, "configs", "ra3_smollm2_cpu.yaml"), over)
    r = cfg.ra3
    mesh = make_run_mesh(cfg)
    model_cfg, params = load_model(cfg.model, mesh)
    docs = [d for t in texts[:200] for d in make_documents(t, "stdlib", tok, r) if d.num_steps > 2][: r.estep_batch_docs]
    prop = LatentProposer(cfg, model_cfg, tok, mesh)
    rnd = candidate_rounds(docs, list(range(len(docs))), 1, (0, 0), prop.first)[0]
    cands = [prop.candidate(docs, d, t, {}) for d, t in rnd]
    policy = prop.init_policy(params)
    t0 = time.perf_counter()
    policy, s = prop.run_round(cands, {}, jax.random.key(0), policy_state=policy, model_params=params)
    jax.block_until_ready(policy.params)
    first = time.perf_counter() - t0
    policy, s = prop.run_round(cands, {}, jax.random.key(0), policy_state=policy, model_params=params)
    jax.block_until_ready(policy.params)
    return {
        "shape": {**shape, "dtype": dtype, "params": model_cfg.num_params()},
        "docs": len(cands),
        "group_size": prop.G,
        "first_round_seconds": round(first, 2),
        "round_seconds": round(s["seconds"], 3),
        "propose_seconds": round(s["propose_seconds"], 3),
        "score_seconds": round(s["score_seconds"], 3),
        "update_seconds": round(s["update_seconds"], 3),
        "generated_tokens": s["generated_tokens"],
        "scored_tokens": s["scored_tokens"],
        "prompt_tokens": s["prompt_tokens"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU, CI)")
    ap.add_argument("--sections", default="train,decode,estep")
    ap.add_argument("--attention", default="", help="implementations to time (default: xla,pallas on GPU, xla,blocked otherwise)")
    ap.add_argument("--batches", default="16,64,128,256")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    gpu = jax.default_backend() == "gpu"
    impls = (a.attention or ("xla,pallas" if gpu else "xla,blocked")).split(",")
    batches = [int(b) for b in a.batches.split(",")] if not a.dry_run else [2, 4]
    kind, (peak, bw) = device_peaks()
    res = {"device": kind, "backend": jax.default_backend(), "jax": jax.__version__, "dry_run": a.dry_run}
    res |= {"peak_bf16_tflops": peak and peak / 1e12, "hbm_tb_per_s": bw and bw / 1e12}
    path = os.path.join(a.out, "gpu_check.json")
    with tempfile.TemporaryDirectory() as work:
        runs = {
            "train": lambda: section_train(a.dry_run, impls),
            "decode": lambda: section_decode(a.dry_run, batches),
            "estep": lambda: section_estep(a.dry_run, work),
        }
        for name in a.sections.split(","):
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                res[name] = runs[name]()
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {e}"[:800], "traceback": traceback.format_exc()[-3000:]}
            res[name]["wall_s"] = round(time.perf_counter() - t0, 1)
            res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            with open(path + ".tmp", "w") as f:  # written after every section: a timeout keeps what was measured
                json.dump(res, f, indent=1)
            os.replace(path + ".tmp", path)
    print(json.dumps(res, indent=1))
    return 0 if all("error" not in res[n] for n in a.sections.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
