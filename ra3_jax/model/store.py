"""Model directories: a converted / trained model is ``model_config.json`` + tokenizer files + Orbax params.

Two kinds of directory load through ``load_model``:
  * written by ``ra3 convert``: ``<dir>/params`` (Orbax StandardCheckpointer) ;
  * a training run: ``<dir>/checkpoints/<step>/state`` (the params of the latest step are restored).
``save_model_dir`` writes the first kind atomically (a pipeline leaves a loadable ``.../model``);
``check_model_dir`` checks one before loading (``ra3 eval/sample --model DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from ra3_jax.errors import InputError
from ra3_jax.model.convert import CheckpointError, load_gguf, load_hf, read_hf_config, resolve_model_path
from ra3_jax.model.llama import LlamaConfig
from ra3_jax.model.params import abstract_params, init_params, shard_params
from ra3_jax.tokenizer import HFTokenizer, SentencePieceTokenizer

MODEL_CONFIG = "model_config.json"

# how the model runs, not what it is: the run's config wins over a checkpoint's model_config.json
_RUNTIME_FIELDS = (
    "param_dtype",
    "compute_dtype",
    "remat",
    "scan_layers",
    "scan_unroll",
    "attention",
    "attention_block",
    "decode_buckets",
)
TOKENIZER_FILES = (HFTokenizer.FILE, SentencePieceTokenizer.FILE)


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


def save_model_dir(directory: str, params, model_cfg: LlamaConfig, tokenizer, *, overwrite: bool = False) -> str:
    """Writes a model directory (Orbax ``params/``, ``model_config.json``, the tokenizer's files) that
    ``model.init=orbax`` and ``ra3 eval/sample --model`` load; returns its absolute path. Atomic: written into
    ``<directory>.tmp``, then renamed into place. An existing non-empty ``directory`` is an error unless
    ``overwrite``. One process writes it (a multi-process run's model is its run directory)."""
    path = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot save a model directory at {path}: a file is there")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise InputError(f"{path} exists and is not empty; refusing to overwrite it (pass overwrite=True to replace it)")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_params(tmp, params)
    save_model_config(tmp, model_cfg)
    tokenizer.save(tmp)
    if os.path.isdir(path):  # the old directory moves aside first: os.replace onto a non-empty one fails
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_model_dir(directory: str) -> str:
    """The absolute path of ``directory`` when it loads as a model (a model config, params or checkpoints, a
    tokenizer); else one clear line saying what is missing."""
    path = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(path):
        raise InputError(f"model directory not found: {path}")
    if not os.path.exists(os.path.join(path, MODEL_CONFIG)):
        raise InputError(f"{path} is not a model directory: {MODEL_CONFIG} not found (`ra3 convert` or save_model_dir write one)")
    if not any(os.path.isdir(os.path.join(path, d)) for d in ("params", "checkpoints")):
        raise InputError(f"{path} holds no weights: neither params/ (ra3 convert, save_model_dir) nor checkpoints/ (a run)")
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise InputError(
            f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the model's tokenizer there (tokenizer.save(DIR))"
        )
    return path


def model_dir_overrides(directory: str, overrides: list[str]) -> list[str]:
    """The config overrides that load the model directory ``directory`` with its own tokenizer (``ra3 eval/sample
    --model DIR``), checked first (:func:`check_model_dir`); ``model.*`` / ``tokenizer.*`` ones among
    ``overrides`` clash with it: one clear line."""
    clash = [o for o in overrides if o.split("=", 1)[0].strip().startswith(("model.", "tokenizer."))]
    if clash:
        raise InputError(f"--model {directory} brings the model and its tokenizer; drop the override(s) {' '.join(clash)}")
    return ["model.init=orbax", f"model.path={json.dumps(check_model_dir(directory))}", "tokenizer.kind=auto"]


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


def restore_params_from_dir(path: str, cfg: LlamaConfig, mesh, step: int = 0):
    """The params of a model dir, or of a training run's checkpoint ``step`` (0: the latest; a chosen step is read
    without touching the later ones)."""
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
            if step:
                have = ck.steps()
                if step not in have:
                    raise CheckpointError(f"{path} has no checkpoint step {step}; steps: {', '.join(map(str, have)) or 'none'}")
                return ck.restore_params(step, target)  # checked there: a damaged step is a CheckpointIOError
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
