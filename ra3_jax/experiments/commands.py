"""CLI of the chains benchmark: `ra3 chains export` and `ra3 experiment chains`."""

from __future__ import annotations

import json
import os

from ra3_jax.errors import InputError

DEFAULT_CONFIGS = {"pretrain": "chains_pretrain.yaml", "midtrain": "chains_midtrain.yaml", "rlvr": "chains_rlvr.yaml"}


def _configs_dir() -> str:
    """configs/ of the checkout (the package's parent) or of the current directory."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    return here if os.path.isdir(here) else os.path.abspath("configs")


def add_parsers(sub, with_config) -> None:
    ch = sub.add_parser("chains", help="the chains benchmark (CHAINS.md): data export")
    csub = ch.add_subparsers(dest="chains_command", required=True)
    ex = with_config(csub.add_parser("export", help="write a chains split as HumanEval-format JSONL (or a corpus as text JSONL)"))
    ex.add_argument("--split", required=True, choices=("eval", "rlvr", "pretrain", "midtrain"))
    ex.add_argument("--out", required=True, help="the JSONL file to write")
    ex.set_defaults(fn=cmd_chains_export)

    xp = sub.add_parser("experiment", help="whole experiments (resumable)")
    xsub = xp.add_subparsers(dest="experiment", required=True)
    c = xsub.add_parser("chains", help="CHAINS.md: pre-train, five arms x seeds, pass@1 by k and mode, RLVR, report")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    c.add_argument("--out", default="runs/chains")
    c.add_argument("--arms", default=",".join(("base", "ntp", "ntp_flops", "ra3", "random")), help="comma-separated")
    c.add_argument("--rlvr-starts", default="base,ntp,ra3", help="comma-separated arms RLVR starts from ('' = none)")
    c.add_argument("--samples", type=int, default=10, help="temperature samples per task (pass@1 / pass@10)")
    c.add_argument("--temperature", type=float, default=0.8)
    c.add_argument("--gate", type=float, default=0.8, help="required forced-mode thought-step accuracy of the base model")
    c.add_argument(
        "--base-step",
        type=int,
        default=1800,
        help="pre-training checkpoint step the arms start from (default 1800 of the 2,900-step schedule; 0: the last)",
    )
    c.add_argument("--pretrain-from", default="", help="share the tokenizer and pre-training of this experiment dir (sweeps)")
    for stage, name in DEFAULT_CONFIGS.items():
        c.add_argument(f"--{stage}-config", default="", help=f"default: configs/{name}")
    c.add_argument("overrides", nargs="*", help="key=value for every stage, or stage:key=value (pretrain|midtrain|rlvr)")
    c.set_defaults(fn=cmd_experiment_chains)


def cmd_chains_export(args):
    from ra3_jax.config import load_config
    from ra3_jax.data.chains import ChainsSpec, build_chains, export_jsonl, task_rows

    cfg = load_config(args.config, list(args.overrides))
    spec = ChainsSpec.of(cfg.chains)
    if args.split in ("eval", "rlvr"):
        rows = task_rows(spec, cfg.data.tfds_dir, args.split)
    else:
        src = build_chains(spec, cfg.data.tfds_dir)[args.split]
        rows = [{"text": src[i]["text"].decode("utf-8"), "k": int(src[i]["k"])} for i in range(len(src))]
    export_jsonl(rows, args.out)
    print(json.dumps({"out": os.path.abspath(args.out), "split": args.split, "rows": len(rows)}))


def _names(s: str) -> tuple:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def cmd_experiment_chains(args):
    from .chains import Experiment, run_experiment

    if args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: at least one seed")
    configs = {}
    for stage, name in DEFAULT_CONFIGS.items():
        path = getattr(args, f"{stage}_config") or os.path.join(_configs_dir(), name)
        if not os.path.exists(path):
            raise InputError(f"--{stage}-config: {path} not found")
        configs[stage] = path
    ex = Experiment(
        args.out,
        list(range(args.seeds)),
        configs,
        list(args.overrides),
        arms=_names(args.arms),
        rlvr_starts=_names(args.rlvr_starts),
        samples=args.samples,
        temperature=args.temperature,
        gate=args.gate,
        base_step=args.base_step,
        pretrain_from=args.pretrain_from,
    )
    print(json.dumps(run_experiment(ex), indent=1))
