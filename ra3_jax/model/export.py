"""Export a model directory or training run (Orbax) to a Hugging Face checkpoint: safetensors + config.json.

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (Llama, or Qwen2 when the model
has q/k/v biases) and back into ra3_jax with ``model.init=hf``. Weights are written in HF's layout: [out, in]
linear weights, RoPE in the rotate_half layout (interleaved/GGUF-layout models are permuted back), and shards
of at most ``max_shard_bytes`` with a ``model.safetensors.index.json`` when there is more than one. The files
are written into a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ra3_jax.model.convert import HF_LAYER_NAMES, CheckpointError
from ra3_jax.model.llama import LlamaConfig


def _interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a Q/K projection (or bias) from RoPE pairs (2i, 2i+1) to HF's (i, i + Dh/2)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(cfg: LlamaConfig, *, dtype: str = "float32", bos_id: int | None = None, eos_id: int | None = None) -> dict:
    qwen = cfg.qkv_bias  # Llama's attention_bias would also put a bias on o_proj, which this model lacks
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if bos_id is not None:
        out["bos_token_id"] = int(bos_id)
    if eos_id is not None:
        out["eos_token_id"] = int(eos_id)
    return out


def hf_tensors(params: dict, cfg: LlamaConfig, dtype=np.float32):
    """Yield (HF name, array) in checkpoint order from host (numpy) params."""
    cast = lambda a: np.ascontiguousarray(np.asarray(a, np.float32).astype(dtype))  # noqa: E731
    yield "model.embed_tokens.weight", cast(params["embed"])
    layers = params["layers"]
    for i in range(cfg.n_layers):
        for ours, (name, transpose) in HF_LAYER_NAMES.items():
            if ours not in layers:
                continue
            w = np.asarray(layers[ours][i])
            if transpose:
                w = w.T
            if cfg.rope_layout == "interleaved" and ours in ("wq", "bq", "wk", "bk"):
                w = _interleaved_to_half(w, cfg.n_heads if ours in ("wq", "bq") else cfg.n_kv_heads)
            yield f"model.layers.{i}.{name}", cast(w)
    yield "model.norm.weight", cast(params["final_norm"])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", cast(np.asarray(params["lm_head"]).T)


def write_safetensors(tensors, out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write named tensors into ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index."""
    from safetensors.numpy import save_file

    shards: list[dict] = [{}]
    size = 0
    total = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
        total += arr.nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for f, shard in zip(files, shards):
        save_file(shard, os.path.join(out_dir, f), metadata={"format": "pt"})
        weight_map.update({k: f for k in shard})
    if n > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    return files


def export_hf(model_dir: str, out_dir: str, *, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30) -> dict:
    """Orbax model directory (``ra3 convert``) or training run -> HF checkpoint in ``out_dir``."""
    import jax

    from ra3_jax.model.store import read_model_config, restore_params_from_dir
    from ra3_jax.sharding import make_mesh
    from ra3_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, TokenizerError, load_from_dir

    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"export dtype {dtype!r} is not float32 or bfloat16")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new folder for the HF checkpoint")
    cfg = read_model_config(model_dir)
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    params = jax.device_get(restore_params_from_dir(model_dir, cfg, mesh))
    try:
        tok = load_from_dir(model_dir)
    except TokenizerError:
        tok = None
    np_dtype = np.float32 if dtype == "float32" else jax.numpy.bfloat16
    tmp = out_dir + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files = write_safetensors(hf_tensors(params, cfg, np_dtype), tmp, max_shard_bytes=max_shard_bytes)
        conf = hf_config(cfg, dtype=dtype, bos_id=getattr(tok, "bos_id", None), eos_id=getattr(tok, "eos_id", None))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(conf, f, indent=1)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({k: conf[k] for k in ("bos_token_id", "eos_token_id") if k in conf}, f, indent=1)
        if isinstance(tok, HFTokenizer):
            tok.save(tmp)  # tokenizer.json: AutoTokenizer loads it as a fast tokenizer
            with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}, f, indent=1)
        elif isinstance(tok, SentencePieceTokenizer):
            tok.save(tmp)  # spm.model: read back by ra3_jax (model.init=hf, tokenizer.kind=auto)
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out_dir, "files": files, "model_type": conf["model_type"], "params": cfg.num_params(), "dtype": dtype}
