"""The run context: what every command builds before its first step, built by ONE function.

``build_run_context(cfg)`` makes the output directory, the device mesh, the tokenizer and the model (params
placed on the mesh), checks that they fit together, and opens the run's checkpointer. ``ctx.start_run(step)``
then writes the run's metadata (the config actually used, the model config, the tokenizer: a run dir loads as a
model dir) and opens the metrics writer. Host batches become global arrays through ``global_batch``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from ra3_jax import meshes, sharding
from ra3_jax.config import RunConfig, config_used, dump_config
from ra3_jax.errors import TrainingError
from ra3_jax.model.convert import resolve_model_path
from ra3_jax.model.llama import LlamaConfig
from ra3_jax.model.store import load_model, save_model_config
from ra3_jax.tokenizer import TokenizerError, load_from_dir, load_tokenizer
from ra3_jax.train.checkpoint import RunCheckpointer
from ra3_jax.train.loop import MetricsWriter, is_main_process

log = logging.getLogger(__name__)


def make_run_mesh(cfg: RunConfig):
    return meshes.make_run_mesh(cfg.mesh)


def resolve_tokenizer(cfg: RunConfig):
    kind, path = cfg.tokenizer.kind, cfg.tokenizer.path
    if kind == "auto":
        if cfg.model.init == "gguf":
            return load_tokenizer("gguf", cfg.model.path)
        if cfg.model.init in ("hf", "orbax"):
            return load_from_dir(resolve_model_path(cfg.model.path))
        raise TokenizerError(
            "model.init=random needs an explicit tokenizer.kind and tokenizer.path (pass a config, e.g. "
            "--config configs/tiny_cpu.yaml, or set them)"
        )
    if not path:
        raise TokenizerError(f"tokenizer.kind={kind} needs tokenizer.path")
    return load_tokenizer(kind, path)


def check_vocab(tokenizer, model_cfg) -> None:
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only {model_cfg.vocab_size}: "
            "pair the model with its own tokenizer (tokenizer.kind/path) or raise model.vocab_size"
        )


def load_model_and_tokenizer(cfg: RunConfig, mesh, key=None):
    """(tokenizer, model config, params on ``mesh``) of the config, checked to fit together."""
    tokenizer = resolve_tokenizer(cfg)
    model_cfg, params = load_model(cfg.model, mesh, key=key)
    check_vocab(tokenizer, model_cfg)
    return tokenizer, model_cfg, params


def global_batch(local: dict, mesh, global_rows: int | None = None) -> dict:
    """Per-process host batch (this process's rows, ``distributed.process_rows``) -> global jax.Arrays sharded
    over (data, fsdp). ``global_rows`` defaults to local rows x the number of distinct row blocks."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        shape = None if global_rows is None else (global_rows,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v, shape)
    return out


def write_run_metadata(out_dir: str, cfg: RunConfig, model_cfg: LlamaConfig, tokenizer) -> None:
    """config.yaml (the config this run actually used, real model shape included), model_config.json and the
    tokenizer next to the checkpoints (a run dir loads as a model dir)."""
    if is_main_process():
        dump_config(config_used(cfg, model_cfg), os.path.join(out_dir, "config.yaml"))
        save_model_config(out_dir, model_cfg)
        tokenizer.save(out_dir)


@dataclasses.dataclass
class RunContext:
    cfg: RunConfig
    out_dir: str
    mesh: jax.sharding.Mesh
    tokenizer: object
    model_cfg: LlamaConfig
    params: object  # the starting params (None once a trainer took them over)
    ckpt: RunCheckpointer

    @property
    def train(self):
        return self.cfg.train

    def start_run(self, start_step: int) -> MetricsWriter:
        """Write the run's metadata and open its metrics writer (entries after ``start_step`` are dropped)."""
        write_run_metadata(self.out_dir, self.cfg, self.model_cfg, self.tokenizer)
        return MetricsWriter(self.out_dir, start_step, self.cfg.train.wandb_project)

    def take_params(self):
        """Hand the starting params over (the context drops its reference, so they can be donated / freed)."""
        params, self.params = self.params, None
        return params


def check_rows(rows: int, mesh, what: str) -> None:
    dp = sharding.data_parallel_size(mesh)
    if rows % dp:
        raise TrainingError(f"{what}={rows} must be divisible by the data-parallel size {dp}")


def build_run_context(cfg: RunConfig) -> RunContext:
    """Out dir, mesh, tokenizer, model (params placed on the mesh, vocabulary checked) and checkpointer."""
    out_dir = os.path.abspath(os.path.expanduser(cfg.train.out_dir))
    os.makedirs(out_dir, exist_ok=True)
    mesh = make_run_mesh(cfg)
    tokenizer, model_cfg, params = load_model_and_tokenizer(cfg, mesh, key=jax.random.key(cfg.train.seed))
    ckpt = RunCheckpointer(
        os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoints
    )
    return RunContext(cfg, out_dir, mesh, tokenizer, model_cfg, params, ckpt)
