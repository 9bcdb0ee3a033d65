"""The `ra3` commands that work on files alone, without a run config: show-latents, convert, export-hf, report."""

from __future__ import annotations

import json
import os

from ra3_jax.errors import RA3Error


def cmd_show_latents(args):
    from ra3_jax.data.bootstrap import is_complete, read_records

    run = os.path.abspath(args.run)
    if not os.path.isdir(run):
        raise RA3Error(f"run directory not found: {run}")
    iters = sorted(
        int(d.split("_", 1)[1])
        for d in os.listdir(run)
        if d.startswith("iter_") and os.path.isdir(os.path.join(run, d, "bootstrap"))
    )
    if not iters:
        raise RA3Error(f"{run} holds no bootstrap corpus (iter_<k>/bootstrap); run `ra3 midtrain-ra3` first")
    k = iters[-1] if args.iteration is None else args.iteration
    corpus = os.path.join(run, f"iter_{k}", "bootstrap")
    if not is_complete(corpus):
        raise RA3Error(
            f"no complete bootstrap corpus in {corpus} (E-step interrupted?); iterations with a bootstrap folder: {iters}"
        )
    recs = read_records(corpus)
    if args.only_with_latents:
        recs = [r for r in recs if r.n_latents]
    for r in recs[: args.limit]:
        print(f"===== {r.doc_id}  (iteration {r.iteration}, {r.n_latents} latents, from model step {r.source_step})")
        for line in r.text.splitlines():
            mark = ">>" if args.marker and line.lstrip().startswith(args.marker) else "  "
            print(f"{mark} {line}")


def cmd_convert(args):
    import numpy as np

    from ra3_jax.model.convert import load_gguf, load_hf, resolve_model_path
    from ra3_jax.model.store import save_model_config, save_params
    from ra3_jax.tokenizer import HFTokenizer, load_from_dir

    path = resolve_model_path(args.path)
    if args.source == "gguf":
        cfg, params = load_gguf(path, rope_layout=args.rope_layout, dtype=np.dtype(args.dtype), param_dtype=args.dtype)
        tok = HFTokenizer.from_gguf(path)
    else:
        cfg, params = load_hf(path, dtype=np.dtype(args.dtype), param_dtype=args.dtype)
        tok = load_from_dir(path)
    os.makedirs(args.out, exist_ok=True)
    save_params(args.out, params)
    save_model_config(args.out, cfg)
    tok.save(args.out)
    print(json.dumps({"out": os.path.abspath(args.out), "params": cfg.num_params(), "config": cfg.__dict__}, indent=1))


def cmd_export_hf(args):
    from ra3_jax.model.export import export_hf

    print(json.dumps(export_hf(args.model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30)), indent=1))


def cmd_report(args):
    """Run directories -> curves and a table in ``--out``; an experiment directory (``ra3 experiment chains``)
    -> its report.md and plots, written into it."""
    from ra3_jax.evaluation.chains_report import is_experiment_dir, write_chains_report
    from ra3_jax.evaluation.report import write_report

    if len(args.runs) == 1 and is_experiment_dir(args.runs[0]):
        print(write_chains_report(args.runs[0]))
        return
    if not args.out:
        raise RA3Error("ra3 report needs --out for run directories (only an experiment directory reports into itself)")
    print(write_report(args.runs, args.out, labels=args.label))
