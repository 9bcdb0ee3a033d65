"""Model directories: a converted / trained model is ``model_config.json`` + tokenizer files + Orbax params.

Two kinds of directory load through ``load_model``:
  * written by ``ra3 convert``: ``<dir>/params`` (Orbax StandardCheckpointer) ;
  * a training run: ``<dir>/checkpoints/<step>/state`` (the params of the latest step are restored).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from ra3_jax.model.convert import CheckpointError, load_gguf, load_hf, read_hf_config, resolve_model_path
from ra3_jax.model.llama import LlamaConfig
from ra3_jax.model.params import abstract_params, init_params, shard_params

MODEL_CONFIG = "model_config.json"

_RUNTIME_FIELDS = ("param_dtype", "compute_dtype", "remat", "scan_layers", "scan_unroll")


def save_model_config(directory: str, cfg: LlamaConfig) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_CONFIG), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)


def read_model_config(directory: str, **overrides) -> LlamaConfig:
    path = os.path.join(directory, MODEL_CONFIG)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} is not a model directory: {MODEL_CONFIG} not found")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    d.update(overrides)
    return LlamaConfig(**d)


def save_params(directory: str, params) -> None:
    path = os.path.join(os.path.abspath(directory), "params")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def runtime_overrides(section) -> dict:
    return {k: getattr(section, k) for k in _RUNTIME_FIELDS}


def model_config_from_section(section) -> LlamaConfig:
    """The config schema's model section carries every LlamaConfig field (plus init/path)."""
    return LlamaConfig(**{f.name: getattr(section, f.name) for f in dataclasses.fields(LlamaConfig)})


def load_model(section, mesh, key=None) -> tuple[LlamaConfig, dict]:
    """Model config + params placed on ``mesh`` per the sharding rules, from the config's model section."""
    rt = runtime_overrides(section)
    if section.init == "random":
        cfg = model_config_from_section(section)
        return cfg, init_params(cfg, jax.random.key(0) if key is None else key, mesh)
    path = resolve_model_path(section.path)
    if section.init == "gguf":
        cfg, params = load_gguf(path, rope_layout=section.rope_layout, dtype=np.dtype(section.param_dtype), **rt)
        return cfg, shard_params(params, cfg, mesh)
    if section.init == "hf":
        cfg, params = load_hf(path, dtype=np.dtype(section.param_dtype), **rt)
        return cfg, shard_params(params, cfg, mesh)
    if section.init == "orbax":
        cfg = read_model_config(path, **rt)
        return cfg, restore_params_from_dir(path, cfg, mesh)
    raise CheckpointError(f"unknown model.init {section.init!r}")


def restore_params_from_dir(path: str, cfg: LlamaConfig, mesh):
    target = abstract_params(cfg, mesh)
    if os.path.isdir(os.path.join(path, "params")):
        try:
            return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
        except Exception as e:
            raise CheckpointError(f"cannot restore params from {path}/params: {e}") from e
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from ra3_jax.train.checkpoint import RunCheckpointer

        ck = RunCheckpointer(os.path.join(path, "checkpoints"), async_save=False, resume_override=None)
        try:
            step = ck.pick_step()  # the latest step, checked: a damaged one is a CheckpointIOError naming the file
            if step is None:
                raise CheckpointError(f"run directory {path} has no finished checkpoint")
            return ck.restore_params(step, target)
        finally:
            ck.close()
    raise CheckpointError(f"{path} holds neither params/ (from `ra3 convert`) nor checkpoints/ (a training run)")


def read_model_shape(section) -> LlamaConfig:
    """The model config of the config's model section without reading any weights (AOT checks, planning)."""
    rt = runtime_overrides(section)
    if section.init == "random":
        return model_config_from_section(section)
    path = resolve_model_path(section.path)
    if section.init == "gguf":
        from ra3_jax.model.convert import _gguf_reader, gguf_config

        return gguf_config(_gguf_reader(path), rope_layout=section.rope_layout, **rt)
    if section.init == "hf":
        return read_hf_config(path, **rt)
    return read_model_config(path, **rt)
