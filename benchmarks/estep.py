"""RA3 E-step throughput against the raw sampler on the same shapes, one run.

E-step tokens/s = (rationale tokens generated + tokens scored by the frozen model) / wall time of full E-step
rounds (propose with the in-graph sampler, shared-prefix scoring with and without each rationale, one
policy-gradient update, selection). The rounds run twice from the same start with the same keys (the same
samples, so the same shapes): the first pass compiles (its time is printed too), the second is timed, with
its split into propose / score / update. The reference is the sampler alone generating the same rows (same
prompts, G samples, forced marker, same max new tokens), measured in the same run. Goal (issue #5): the E-step
keeps >= 60% of the raw sampler rate. Also printed: peak RSS, seconds and (approximate, 2 x params per token
forward, 6 x for forward + backward, attention not counted) FLOPs per round, and the achieved FLOP/s next to the
NTP train step's on this machine in the same run (goal, issue #14: >= 50% of it).

Usage: python benchmarks/estep.py [--config configs/ra3_tiny_cpu.yaml] [--smollm2] [--rounds 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax

from ra3_jax import enable_compilation_cache
from ra3_jax.algorithms.ra3 import LatentProposer, candidate_rounds, take_documents
from ra3_jax.config import load_config
from ra3_jax.data.corpus import build_corpus
from ra3_jax.errors import RA3Error
from ra3_jax.model.store import load_model
from ra3_jax.train.context import check_vocab, make_run_mesh, resolve_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "ra3_tiny_cpu.yaml"))
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M (configs/ra3_smollm2_cpu.yaml)")
    ap.add_argument("--rounds", type=int, default=4, help="E-step rounds (run twice: compile, then timed)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    enable_compilation_cache()
    path = os.path.join(REPO, "configs", "ra3_smollm2_cpu.yaml") if a.smollm2 else a.config
    cfg = load_config(path, a.overrides)
    r = cfg.ra3
    mesh = make_run_mesh(cfg)
    try:
        tok = resolve_tokenizer(cfg)
    except RA3Error as e:
        sys.exit(
            f"{e}\nThe tiny configs' tokenizer ({cfg.tokenizer.path}) is made by: "
            f"ra3 tokenizer train --config configs/tiny_cpu.yaml --vocab-size 512 --out {cfg.tokenizer.path}"
        )
    model_cfg, params = load_model(cfg.model, mesh)
    check_vocab(tok, model_cfg)
    need = r.estep_batch_docs * a.rounds
    docs = take_documents(build_corpus(cfg.data, cfg.chains)["train"], tok, r, need, cfg.data.shuffle_seed)
    prop = LatentProposer(cfg, model_cfg, tok, mesh)
    cands_all = []
    for b in range(a.rounds):
        idx = list(range(b * r.estep_batch_docs, (b + 1) * r.estep_batch_docs))
        rnd = candidate_rounds(docs, idx, 1, (0, b), prop.first)[0]
        cands_all.append([prop.candidate(docs, d, t, {}) for d, t in rnd])

    def e_pass():  # the rounds from the same start with the same keys: the same samples and shapes each pass
        policy, stats, t = prop.init_policy(params), [], 0.0
        for i, cands in enumerate(cands_all):
            t0 = time.perf_counter()
            policy, s = prop.run_round(cands, {}, jax.random.key(i), policy_state=policy, model_params=params)
            jax.block_until_ready(policy.params)
            t += time.perf_counter() - t0
            stats.append(s)
        return policy, stats, t

    _, _, t_first = e_pass()  # compiles every shape of these rounds
    policy, stats, t_e = e_pass()  # timed: warm
    gen, scored = sum(s["generated_tokens"] for s in stats), sum(s["scored_tokens"] for s in stats)
    phases = {k: sum(s[k] for s in stats) for k in ("propose_seconds", "score_seconds", "update_seconds")}
    # the raw sampler on the same prompts and shapes
    t_s, gen_s = 0.0, 0
    for i, cands in enumerate(cands_all):
        pad = cands + [cands[0]] * (prop.n_pairs - len(cands))
        F = max(len(c.forced) for c in pad)
        t0 = time.perf_counter()
        out = prop.sampler.generate_tokens(
            policy.params,
            [c.prompt for c in pad],
            max_new_tokens=F + r.max_latent_tokens,
            sampling=prop.sampling,
            key=jax.random.key(100 + i),
            num_samples=prop.G,
            stop_strings=["\n"],
            forced_prefix=[c.forced for c in pad],
        )
        t_s += time.perf_counter() - t0
        gen_s += int(sum(int(out.lengths[j]) for j in range(len(cands) * prop.G)))
    e_rate, s_rate = (gen + scored) / t_e, gen_s / t_s
    n_params = model_cfg.num_params()
    prompt = sum(len(c.prompt) + len(c.forced) for cands in cands_all for c in cands)
    # sampler: prefill + decode; scoring: prefix once + scored rows; PG: prefix forward + rows forward/backward
    flops = 2 * n_params * (prompt + gen) + 2 * n_params * (prompt + scored) + 2 * n_params * prompt + 6 * n_params * gen
    train_flops_s = train_step_flops_per_s(cfg, model_cfg)
    res = {
        "device": str(jax.devices()[0].platform),
        "model_params": model_cfg.num_params(),
        "docs_per_round": r.estep_batch_docs,
        "group_size": prop.G,
        "max_latent_tokens": r.max_latent_tokens,
        "estep_tokens_per_s": round(e_rate, 1),
        "estep_generated_tokens_per_s": round(gen / t_e, 1),
        "estep_seconds_per_round": round(t_e / a.rounds, 3),
        "first_pass_seconds_per_round": round(t_first / a.rounds, 3),
        "sampler_tokens_per_s": round(s_rate, 1),
        "ratio_estep_vs_sampler": round(e_rate / s_rate, 3),
        "estep_gflop_per_round": round(flops / a.rounds / 1e9, 2),
        "estep_gflop_per_s": round(flops / t_e / 1e9, 2),
        "train_step_gflop_per_s": round(train_flops_s / 1e9, 2),
        "ratio_estep_vs_train_step_flops": round(flops / t_e / train_flops_s, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "sampler_share_of_estep_time": round((gen / s_rate) / t_e, 3),
    } | {f"share_{k.replace('_seconds', '')}": round(v / t_e, 3) for k, v in phases.items()}
    print(json.dumps(res, indent=1))


def train_step_flops_per_s(cfg, model_cfg) -> float:
    """6 x params x tokens / s of the NTP train step (benchmarks/train_step.py) on a [data.batch_size,
    data.seq_len] batch of this model's shape."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import bench_ours

    tokens_per_s, _ = bench_ours(model_cfg, cfg.data.batch_size, cfg.data.seq_len, 3, model_cfg.param_dtype)
    return 6 * model_cfg.num_params() * tokens_per_s


if __name__ == "__main__":
    main()
