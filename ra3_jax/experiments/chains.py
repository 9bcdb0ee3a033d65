"""`ra3 experiment chains`: the whole CHAINS.md experiment, resumable stage by stage.

Layout of ``--out`` (OUT):
  tokenizer/, pretrain/ (the pre-training run) and pretrain/model (its model dir), gate.json (forced-mode thought
  accuracy of the base model: the gate before anything else), data/{eval,rlvr_train}.jsonl (HumanEval format),
  seed{S}/{arm}/run (a midtrain-ra3 run: RA3, its compute-matched NTP baselines, random acceptance),
  seed{S}/{arm}/model (loadable by ``ra3 eval --model``), seed{S}/{arm}/eval/ (per-sample results and rows.jsonl),
  seed{S}/rlvr_{start}/ (RLVR runs from base, ntp and ra3), results.jsonl, experiment.json, report.md, *.png.

Every stage leaves a marker (a model dir, rows.jsonl, a done file) and is skipped when it is there; the runs
under it resume from their own checkpoints, so a killed experiment continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys

from ra3_jax.config import RunConfig, load_config
from ra3_jax.data.chains import ChainsSpec, build_chains, export_jsonl, task_rows
from ra3_jax.errors import InputError, TrainingError

ARMS = ("base", "ntp", "ntp_flops", "ra3", "random")
RLVR_STARTS = ("base", "ntp", "ra3")
STAGES = ("pretrain", "midtrain", "rlvr")
_ORDER = ("ra3", "ntp", "ntp_flops", "random", "base")  # ra3 first: random and ntp_flops are matched to it


@dataclasses.dataclass
class Experiment:
    out: str
    seeds: list[int]
    configs: dict  # stage -> YAML path
    overrides: list[str] = dataclasses.field(default_factory=list)  # `key=v` (every stage) or `stage:key=v`
    arms: tuple = ARMS
    rlvr_starts: tuple = RLVR_STARTS
    samples: int = 10
    temperature: float = 0.8
    gate: float = 0.8
    base_step: int = 0  # the pre-training checkpoint step the arms start from (0: the last; an earlier one = a weaker base)
    pretrain_from: str = ""  # another experiment dir whose tokenizer and pre-training run this one shares (a sweep)

    def __post_init__(self):
        self.out = os.path.abspath(os.path.expanduser(self.out))
        bad = [a for a in self.arms if a not in ARMS] + [a for a in self.rlvr_starts if a not in RLVR_STARTS]
        if bad:
            raise InputError(f"unknown arm {bad[0]!r}; arms are {', '.join(ARMS)} (RLVR starts: {', '.join(RLVR_STARTS)})")
        for o in self.overrides:
            stage = o.split("=", 1)[0].split(":", 1)[0] if ":" in o.split("=", 1)[0] else None
            if stage is not None and stage not in STAGES:
                raise InputError(f"override {o!r}: the stage before ':' must be one of {', '.join(STAGES)}")

    def stage_overrides(self, stage: str) -> list[str]:
        """The overrides for ``stage``: plain ones apply to every stage, ``stage:key=v`` to that stage only."""
        out = []
        for o in self.overrides:
            if ":" in o.split("=", 1)[0]:
                st, rest = o.split(":", 1)
                out += [rest] if st == stage else []
            else:
                out.append(o)
        return out

    def cfg(self, stage: str, extra: list[str]) -> RunConfig:
        """A stage's run config: its YAML, the experiment's tokenizer, the pre-training config's chains section
        (one data spec for every stage), the overrides, then ``extra``."""
        shared = list(self.tokenizer_overrides)
        if stage != "pretrain":
            spec = dataclasses.asdict(self.spec)
            shared += [f"chains.{k}={v}" for k, v in spec.items()] + [f"model.path={self.path('pretrain', 'model')}"]
        return load_config(self.configs[stage], [*shared, *self.stage_overrides(stage), *extra])

    @property
    def tokenizer_overrides(self) -> list[str]:
        return ["tokenizer.kind=sentencepiece", f"tokenizer.path={self.path('tokenizer')}"]

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    @property
    def spec(self) -> ChainsSpec:
        return ChainsSpec.of(self.cfg("pretrain", []).chains)


def say(msg: str) -> None:
    print(f"[chains] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ model dirs
def load_model_dir(path: str, step: int = 0):
    """(model config, params, tokenizer) of a model directory or a training run (its checkpoint ``step``; 0: the
    latest), on one local device."""
    import jax

    from ra3_jax.model.store import check_model_dir, read_model_config, restore_params_from_dir
    from ra3_jax.sharding import make_mesh
    from ra3_jax.tokenizer import load_from_dir

    path = check_model_dir(path)
    cfg = read_model_config(path)
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    return cfg, restore_params_from_dir(path, cfg, mesh, step), load_from_dir(path)


def export_model_dir(run_dir: str, model_dir: str, step: int = 0) -> None:
    """A training run's checkpoint ``step`` (0: the latest) as a model directory (params + config + tokenizer),
    atomically."""
    from ra3_jax.model.store import save_model_dir

    cfg, params, tok = load_model_dir(run_dir, step)
    save_model_dir(model_dir, params, cfg, tok, overwrite=True)


# ---------------------------------------------------------------------------------------------------- stages
def pretrain_stage(ex: Experiment) -> str:
    """Tokenizer (sentencepiece, digits split, on the pre-training corpus) and the pre-trained base model."""
    from ra3_jax.tokenizer import train_sentencepiece
    from ra3_jax.train.ntp import train

    model_dir = ex.path("pretrain", "model")
    check_base_step(ex)
    if ex.pretrain_from:
        share_pretraining(ex)
    if os.path.isdir(model_dir):
        return model_dir
    cfg = ex.cfg("pretrain", [f"train.out_dir={ex.path('pretrain')}"])
    if ex.base_step > cfg.train.steps:
        raise InputError(f"--base-step {ex.base_step} is past the pre-training's {cfg.train.steps} steps")
    if not os.path.isdir(ex.path("tokenizer")):
        say("training the tokenizer on the pre-training corpus")
        src = build_chains(ex.spec, cfg.data.tfds_dir)["pretrain"]
        texts = (src[i]["text"].decode("utf-8") for i in range(len(src)))
        train_sentencepiece(texts, cfg.model.vocab_size, ex.path("tokenizer.tmp"))
        os.replace(ex.path("tokenizer.tmp"), ex.path("tokenizer"))
    last = ex.base_step or cfg.train.steps  # a weaker base: the run stops there (its lr schedule spans train.steps)
    if not os.path.isdir(ex.path("pretrain", "checkpoints", str(last))):
        if ex.pretrain_from:  # never train into another experiment's run
            raise InputError(f"--pretrain-from {ex.pretrain_from}: no checkpoint at step {last}; pass its pretrain:train.steps")
        say(f"pre-training (steps 1..{last} of a {cfg.train.steps}-step schedule) -> {ex.path('pretrain')}")
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_step=ex.base_step)), mode="pretrain")
    export_model_dir(ex.path("pretrain"), model_dir, ex.base_step)
    return model_dir


def share_pretraining(ex: Experiment) -> None:
    """Link ``ex.pretrain_from``'s tokenizer and pre-training run into OUT (every arm of a knob sweep starts from the
    same checkpoint; nothing is copied or retrained). Its own model dir (``pretrain/model``) stays per experiment,
    since ``--base-step`` may differ."""
    src = os.path.abspath(os.path.expanduser(ex.pretrain_from))
    for need in ("tokenizer", os.path.join("pretrain", "checkpoints")):
        if not os.path.isdir(os.path.join(src, need)):
            raise InputError(f"--pretrain-from {src}: no {need}/ there (run `ra3 experiment chains --out {src}` first)")
    os.makedirs(ex.path("pretrain"), exist_ok=True)
    names = ["tokenizer"] + [os.path.join("pretrain", n) for n in os.listdir(os.path.join(src, "pretrain")) if n != "model"]
    for name in names:
        if not os.path.lexists(ex.path(name)):
            os.symlink(os.path.join(src, name), ex.path(name))


def check_base_step(ex: Experiment) -> None:
    """One base per experiment dir: the first run records ``base_step`` in OUT/base.json; a later run with another
    one would mix arms from two bases, so it is refused."""
    path = ex.path("base.json")
    if os.path.exists(path):
        with open(path) as f:
            was = json.load(f)["base_step"]
        if was != ex.base_step:
            raise InputError(f"{ex.out} was run with --base-step {was}, not {ex.base_step}: use that, or another --out")
        return
    os.makedirs(ex.out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"base_step": ex.base_step}, f)
    os.replace(path + ".tmp", path)


def data_stage(ex: Experiment) -> list[dict]:
    """The eval and RLVR-train task files (HumanEval JSONL); returns the eval tasks."""
    tfds_dir = ex.cfg("pretrain", []).data.tfds_dir
    ev = task_rows(ex.spec, tfds_dir, "eval")
    if not os.path.exists(ex.path("data", "rlvr_train.jsonl")):
        export_jsonl(ev, ex.path("data", "eval.jsonl"))
        export_jsonl(task_rows(ex.spec, tfds_dir, "rlvr"), ex.path("data", "rlvr_train.jsonl"))
    return ev


def gate_stage(ex: Experiment, base_dir: str, tasks: list[dict]) -> dict:
    """CHAINS.md's gate: the base model in forced mode writes >= ``gate`` of the thought steps correctly."""
    path = ex.path("gate.json")
    if not os.path.exists(path):
        rows = evaluate_dir(base_dir, tasks, ex.path("gate"), modes=("forced",), samples=0, seed=0)
        acc = sum(r["step_acc"] * r["n_tasks"] for r in rows) / sum(r["n_tasks"] for r in rows)
        gate = {"step_acc": acc, "threshold": ex.gate, "passed": acc >= ex.gate, "by_k": rows}
        with open(path, "w") as f:
            json.dump(gate, f, indent=1)
    with open(path) as f:
        gate = json.load(f)
    say(f"gate: forced-mode thought-step accuracy {gate['step_acc']:.3f} (needs >= {gate['threshold']})")
    if not gate["passed"]:
        raise TrainingError(
            f"gate failed: the base model writes {gate['step_acc']:.1%} of the thought steps right in forced mode "
            f"(< {gate['threshold']:.0%}); pre-train longer (pretrain:train.steps=...) and delete {path}"
        )
    return gate


def evaluate_dir(model_dir: str, tasks: list[dict], out_dir: str, **kw) -> list[dict]:
    from ra3_jax.sampler import Sampler

    from .chains_eval import evaluate_chains_model

    cfg, params, tok = load_model_dir(model_dir)
    return evaluate_chains_model(Sampler(cfg, tok), params, tasks, out_dir, **kw)


def flops_ratio(run_dir: str, cfg: RunConfig, n_params: int) -> float:
    """(E-step + M-step FLOPs) / M-step FLOPs of an RA3 run: 2N per token forward, 6N forward+backward.
    E-step: proposal prefill (2N x prompt), sampling (2N x generated), scoring (2N x scored), PG update (2N x
    prompt + 6N x generated); M-step: 6N x the M-step tokens."""
    rows = iteration_rows(run_dir)
    e = sum(2 * (2 * r["estep/prompt_tokens"] + r["estep/generated_tokens"] + r["estep/scored_tokens"]) for r in rows)
    e += sum(6 * r["estep/generated_tokens"] for r in rows)
    m = 6 * len(rows) * cfg.ra3.mstep_steps * cfg.data.batch_size * cfg.data.seq_len
    return (e + m) / m


def iteration_rows(run_dir: str) -> list[dict]:
    """The EM iterations' rows of an RA3 run's ra3_metrics.jsonl (the start model's row -1 left out)."""
    from ra3_jax.train.loop import read_jsonl

    return [r for r in read_jsonl(os.path.join(run_dir, "ra3_metrics.jsonl")) if r["iteration"] >= 0]


def accept_rate(run_dir: str) -> float:
    rows = iteration_rows(run_dir)
    return sum(r["estep/accepted_fraction"] for r in rows) / len(rows)


def arm_overrides(ex: Experiment, seed: int, arm: str) -> list[str]:
    cfg = ex.cfg("midtrain", [])
    ra3_run = ex.path(f"seed{seed}", "ra3", "run")
    if arm in ("ntp_flops", "random") and not os.path.exists(os.path.join(ra3_run, "ra3_metrics.jsonl")):
        raise TrainingError(f"arm {arm} is matched to the ra3 arm of seed {seed}: run the ra3 arm first")
    if arm == "ntp":
        return ["ra3.baseline=true"]
    if arm == "ntp_flops":
        from ra3_jax.model.store import read_model_config

        n = read_model_config(ex.path("pretrain", "model")).num_params()
        steps = math.ceil(cfg.ra3.mstep_steps * flops_ratio(ra3_run, cfg, n))
        return ["ra3.baseline=true", f"ra3.mstep_steps={steps}"]
    if arm == "random":
        return ["ra3.selection=random", f"ra3.random_accept_rate={accept_rate(ra3_run):.6f}"]
    return []


def arm_stage(ex: Experiment, seed: int, arm: str, base_dir: str) -> str:
    """The arm's model dir: the base model, or a midtrain-ra3 run (RA3 / baseline / random) from it."""
    from ra3_jax.algorithms.ra3.em import midtrain_ra3

    model_dir = ex.path(f"seed{seed}", arm, "model")
    if os.path.isdir(model_dir):
        return model_dir
    if arm == "base":
        shutil.copytree(base_dir, model_dir + ".tmp", dirs_exist_ok=True)
        os.replace(model_dir + ".tmp", model_dir)
        return model_dir
    run = ex.path(f"seed{seed}", arm, "run")
    common = ["model.init=orbax", f"model.path={base_dir}", f"train.out_dir={run}", f"train.seed={seed}"]
    common += [f"data.shuffle_seed={seed}"]
    cfg = ex.cfg("midtrain", common + arm_overrides(ex, seed, arm))
    say(f"seed {seed}: mid-training arm {arm} -> {run}")
    midtrain_ra3(cfg)
    export_model_dir(run, model_dir)
    return model_dir


def eval_stage(ex: Experiment, seed: int, arm: str, model_dir: str, tasks: list[dict]) -> list[dict]:
    path = ex.path(f"seed{seed}", arm, "eval", "rows.jsonl")
    if not os.path.exists(path):
        say(f"seed {seed}: evaluating arm {arm}")
        rows = evaluate_dir(model_dir, tasks, os.path.dirname(path), samples=ex.samples, temperature=ex.temperature, seed=seed)
        export_jsonl([{"seed": seed, "arm": arm, **r} for r in rows], path)
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def rlvr_stage(ex: Experiment, seed: int, start: str, model_dir: str) -> None:
    from ra3_jax.algorithms.rlvr import rlvr

    run = ex.path(f"seed{seed}", f"rlvr_{start}")
    if os.path.exists(os.path.join(run, "done")):
        return
    extra = ["model.init=orbax", f"model.path={model_dir}", f"train.out_dir={run}", f"train.seed={seed}"]
    extra += [
        f"rlvr.tasks_file={ex.path('data', 'rlvr_train.jsonl')}",
        f"eval.benchmarks=[jsonl:{ex.path('data', 'eval.jsonl')}]",
    ]
    say(f"seed {seed}: RLVR from {start} -> {run}")
    rlvr(ex.cfg("rlvr", extra))
    open(os.path.join(run, "done"), "w").close()


def run_experiment(ex: Experiment) -> dict:
    """Every stage of every seed (skipping finished ones), then results.jsonl and the report."""
    os.makedirs(ex.out, exist_ok=True)
    base_dir = pretrain_stage(ex)
    tasks = data_stage(ex)
    gate = gate_stage(ex, base_dir, tasks)
    rows = []
    for seed in ex.seeds:
        dirs = {}
        for arm in [a for a in _ORDER if a in ex.arms or (a == "ra3" and {"random", "ntp_flops"} & set(ex.arms))]:
            dirs[arm] = arm_stage(ex, seed, arm, base_dir)
            if arm in ex.arms:
                rows += eval_stage(ex, seed, arm, dirs[arm], tasks)
        for start in ex.rlvr_starts:
            rlvr_stage(ex, seed, start, dirs.get(start) or arm_stage(ex, seed, start, base_dir))
        write_results(ex, rows, gate, ex.seeds[: ex.seeds.index(seed) + 1])  # the report grows seed by seed
    return {"out": ex.out, "rows": len(rows), "report": ex.path("report.md")}


def write_results(ex: Experiment, rows: list[dict], gate: dict, seeds: list[int]) -> None:
    """results.jsonl, experiment.json (the seeds finished so far) and the report."""
    export_jsonl(rows, ex.path("results.jsonl"))
    meta = {"seeds": seeds, "arms": list(ex.arms), "rlvr_starts": list(ex.rlvr_starts), "configs": ex.configs}
    meta |= {"overrides": ex.overrides, "samples": ex.samples, "temperature": ex.temperature, "gate": gate["step_acc"]}
    meta["base_step"] = ex.base_step
    with open(ex.path("experiment.json"), "w") as f:
        json.dump(meta, f, indent=1)
    from ra3_jax.evaluation.chains_report import write_chains_report

    write_chains_report(ex.out)
