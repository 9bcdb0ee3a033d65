"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2) as one pure function.

Conventions: B batch, T new tokens, S cache slots, N = B*T, D d_model, H query heads, K kv heads,
G = H // K (query heads per kv head), Dh head dim, F d_ff, V vocab, L layers.
Activations stay flat ``[N, D]`` around every dense layer (measured faster on CPU than ``[B, T, D]``);
attention reshapes to heads only inside the attention block. The KV cache is ``[L, B, K, S, Dh]``.

``forward(params, tokens, positions, cfg, segment_ids=..., cache=...)`` is used unchanged by the trainer
(no cache: causal + same-segment mask, packed documents never attend to each other) and the sampler (cache:
the T new tokens are written at ``cache.index`` and attend to every valid earlier slot).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp

from ra3_jax.errors import InputError
from ra3_jax.model.attention import NEG_INF, AttentionImpl, dense, self_attention
from ra3_jax.model.matmul import matmul, matmul_t, matmuls, swiglu

RopeLayout = Literal["half", "interleaved"]
DType = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = "half"  # half: HF rotate_half pairs (i, i+Dh/2); interleaved: GGUF/Meta pairs (2i, 2i+1)
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: Remat = "none"  # none | full | dots | dots_no_batch (per-layer checkpointing policy)
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per scan iteration (>1 trades compile time for fewer loop overheads)
    attention: AttentionImpl = "auto"  # training attention (model/attention.py): auto|xla|blocked|pallas|splash
    attention_block: int = 128  # query block of the blocked and flash implementations
    decode_buckets: int = 4  # cached attention reads the first k/n of the cache slots when the rest are empty

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise InputError("head_dim must be even for RoPE")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **kw) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        from ra3_jax.model.params import param_specs

        return sum(int(jnp.prod(jnp.array(s.shape))) for s in jax.tree.leaves(param_specs(self), is_leaf=_is_spec))


def _is_spec(x):
    from ra3_jax.model.params import ParamSpec

    return isinstance(x, ParamSpec)


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, Dh]
    v: jax.Array  # [L, B, K, S, Dh]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-pad) token
    index: jax.Array  # [] int32: next slot to write (shared by all rows; rows differ by padding + positions)

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = dtype or cfg.dtype
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def repeat(self, k: int) -> KVCache:
        """Each of the B rows repeated k times along the batch: row i*k + j of the result is row i ([B*k] rows)."""
        return KVCache(
            k=jnp.repeat(self.k, k, axis=1),
            v=jnp.repeat(self.v, k, axis=1),
            valid=jnp.repeat(self.valid, k, axis=0),
            index=self.index,
        )


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin, cos of shape [B, T, Dh/2] (float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(ang), jnp.cos(ang)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array, layout: str) -> jax.Array:
    """x: [B, T, n, Dh]; sin/cos: [B, T, Dh/2]."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    if layout == "half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
    else:
        raise InputError(f"unknown rope_layout {layout!r}")
    return out.astype(dtype)


def head_weight(params, cfg: LlamaConfig) -> jax.Array:
    """The output projection as stored, in the compute dtype: [V, D] (the embedding) when tied, else [D, V]."""
    return (params["embed"] if cfg.tie_embeddings else params["lm_head"]).astype(cfg.dtype)


def apply_head(x: jax.Array, w: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """x [N, D] @ the output projection ``w`` (``head_weight``) -> [N, V] in x's dtype."""
    return matmul_t(x, w) if cfg.tie_embeddings else matmul(x, w)


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }[name]


def _attention_cached(q, ck, cv, k_new, v_new, mask_old, mask_new):
    """Attention of T new queries over the cache's S slots plus the T new keys, without writing the new keys
    into the cache first (that copy of the layer's cache per step dominated decode on CPU).

    q: [B,T,K,G,Dh]; ck, cv: [B,K,S,Dh]; k_new, v_new: [B,K,T,Dh]; mask_old [B,T,S]; mask_new [B,T,T]. One
    softmax over both blocks (shared max and denominator), so the result equals attention over the
    concatenated keys."""
    B, T, K, G, Dh = q.shape
    S = ck.shape[2]
    qt = q.transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, Dh)
    s_old = jnp.einsum("bqd,bsd->bqs", qt, ck.reshape(B * K, S, Dh), preferred_element_type=jnp.float32)
    s_new = jnp.einsum("bqd,bsd->bqs", qt, k_new.reshape(B * K, T, Dh), preferred_element_type=jnp.float32)
    s_old = jnp.where(mask_old[:, None, None], s_old.reshape(B, K, G, T, S) * (Dh**-0.5), NEG_INF)
    s_new = jnp.where(mask_new[:, None, None], s_new.reshape(B, K, G, T, T) * (Dh**-0.5), NEG_INF)
    m = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    p_old, p_new = jnp.exp(s_old - m), jnp.exp(s_new - m)
    denom = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
    dt = cv.dtype
    out = jnp.einsum(
        "bqs,bsd->bqd", p_old.astype(dt).reshape(B * K, G * T, S), cv.reshape(B * K, S, Dh), preferred_element_type=jnp.float32
    )
    out = out + jnp.einsum(
        "bqs,bsd->bqd", p_new.astype(dt).reshape(B * K, G * T, T), v_new.reshape(B * K, T, Dh), preferred_element_type=jnp.float32
    )
    out = out / denom.reshape(B * K, G * T, 1)
    return out.astype(dt).reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4)


def attended_lengths(S: int, n: int) -> list[int]:
    """The static cache lengths a cached attention may read: n buckets up to S (multiples of 8 where S allows)."""
    if n <= 1 or S <= 8 * n:
        return [S]
    sizes = sorted({min(S, -(-(S * (i + 1) // n) // 8) * 8) for i in range(n)})
    return sizes if sizes[-1] == S else [*sizes, S]


def _attention_cached_bucketed(q, ck, cv, k_new, v_new, mask_old, mask_new, index, n_buckets: int, dt):
    """``_attention_cached`` over the first L cache slots only, L the smallest of ``attended_lengths`` that holds
    every slot written so far (``index``; the slots after it are masked out, so the result is the same): a
    decode step early in a long cache stops reading the empty slots. One ``lax.switch`` branch per length."""
    S = ck.shape[2]
    sizes = attended_lengths(S, n_buckets)

    def branch(L):
        return lambda: _attention_cached(
            q, ck[:, :, :L].astype(dt), cv[:, :, :L].astype(dt), k_new, v_new, mask_old[..., :L], mask_new
        )

    if len(sizes) == 1:
        return branch(S)()
    return jax.lax.switch(attended_bucket(sizes, index), [branch(L) for L in sizes])


def attended_bucket(sizes: list[int], index):
    """Index of the smallest of ``sizes`` that holds ``index`` written slots (traced or concrete)."""
    return jnp.minimum(jnp.searchsorted(jnp.asarray(sizes, jnp.int32), index, side="left"), len(sizes) - 1)


def _layer(x, lp, sin, cos, mask, cache_kv, cache_index, cfg: LlamaConfig, B: int, T: int):
    """One decoder block on flat activations x: [N, D]. Returns (x, (k_cache, v_cache))."""
    dt = cfg.dtype
    K, G, Dh = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    with jax.named_scope("attention"):
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q, k, v = matmuls(h, (lp["wq"].astype(dt), lp["wk"].astype(dt), lp["wv"].astype(dt)))
        if cfg.qkv_bias:
            q, k, v = q + lp["bq"].astype(dt), k + lp["bk"].astype(dt), v + lp["bv"].astype(dt)
        q = apply_rope(q.reshape(B, T, K * G, Dh), sin, cos, cfg.rope_layout).reshape(B, T, K, G, Dh)
        k = apply_rope(k.reshape(B, T, K, Dh), sin, cos, cfg.rope_layout).transpose(0, 2, 1, 3)  # [B,K,T,Dh]
        v = v.reshape(B, T, K, Dh).transpose(0, 2, 1, 3)
        if cache_kv is not None:
            ck, cv = cache_kv
            k_new, v_new = k.astype(ck.dtype), v.astype(cv.dtype)
            # only the T new slots leave the layer; the caller writes them into the cache once, in place
            mask_old, mask_new = mask
            if mask_old is None:  # an empty cache (prefill): only the new keys
                attn = dense(q, k_new.astype(dt), v_new.astype(dt), mask_new)
            else:
                args = (q, ck, cv, k_new.astype(dt), v_new.astype(dt), mask_old, mask_new)
                attn = _attention_cached_bucketed(*args, cache_index, cfg.decode_buckets, dt)
            new_kv = (k_new, v_new)
        else:
            attn, new_kv = self_attention(q, k, v, mask, impl=cfg.attention, block=cfg.attention_block), None
        attn = attn.reshape(B * T, K * G * Dh)
        x = x + matmul(attn, lp["wo"].astype(dt))
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
        gate, up = matmuls(h, (lp["w_gate"].astype(dt), lp["w_up"].astype(dt)))
        x = x + matmul(swiglu(gate, up), lp["w_down"].astype(dt))
    return x, new_kv


def _masks(segment_ids: jax.Array, cache: KVCache | None, empty_cache: bool):
    """Attention masks -> (mask, cache valid after this call or None).

    Without a cache: the segment ids themselves (model/attention.py builds the causal + same-segment mask its
    implementation needs). With one: (mask_old [B, T, S] over the
    slots written before this call and real -- None for an empty cache --, mask_new [B, T, T] causal among the
    new tokens, pads excluded)."""
    B, T = segment_ids.shape
    if cache is None:
        return segment_ids, None
    S = cache.max_len
    valid = jax.lax.dynamic_update_slice(cache.valid, segment_ids != 0, (0, cache.index))
    mask_old = None
    if not empty_cache:
        mask_old = jnp.broadcast_to(((jnp.arange(S) < cache.index)[None, :] & cache.valid)[:, None, :], (B, T, S))
    mask_new = jnp.tril(jnp.ones((T, T), bool))[None] & (segment_ids != 0)[:, None, :]
    return (mask_old, mask_new), valid


def _run_layers(x, layers, sin, cos, mask, cache: KVCache | None, cfg: LlamaConfig, B: int, T: int):
    """Every decoder block (a scan over the stacked layers, or a Python loop) -> (x, new keys/values
    [L, B, K, T, Dh] each, or None without a cache)."""
    cache_index = None if cache is None else cache.index

    def body(x, layer_in):
        lp, kv = layer_in
        return _layer(x, lp, sin, cos, mask, kv, cache_index, cfg, B, T)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(cfg.remat))

    kv_in = None if cache is None else (cache.k, cache.v)
    if cfg.scan_layers:
        return jax.lax.scan(body, x, (layers, kv_in), unroll=cfg.scan_unroll)
    outs = []
    for i in range(cfg.n_layers):
        sl = jax.tree.map(lambda a, i=i: a[i], (layers, kv_in))
        x, kv = body(x, sl)
        outs.append(kv)
    return x, None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)


def forward(
    params: dict[str, Any],
    tokens: jax.Array,
    positions: jax.Array,
    cfg: LlamaConfig,
    *,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    return_hidden: bool = False,
    empty_cache: bool = False,
):
    """Run the decoder.

    tokens, positions: [B, T] int. segment_ids: [B, T] int, 0 = padding; without a cache, tokens attend only
    within their own segment (packed documents); with a cache, 0 marks pad tokens that no one attends to.
    Returns (logits [B, T, V] in float32 -- or the final hidden [B, T, D] if return_hidden -- , new cache).
    empty_cache=True promises the cache holds nothing yet (a prefill): attention then skips the cache slots.
    """
    B, T = tokens.shape
    dt = cfg.dtype
    x = jnp.take(params["embed"], tokens.reshape(-1), axis=0).astype(dt)  # [N, D]
    sin, cos = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    mask, valid = _masks(segment_ids, cache, empty_cache)
    x, kv_out = _run_layers(x, params["layers"], sin, cos, mask, cache, cfg, B, T)
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    new_cache = None
    if cache is not None:
        # kv_out: the new keys/values [L, B, K, T, Dh]. Writing them with one update (instead of returning the
        # whole cache from the layer scan) keeps decode cost flat in the cache length inside a while loop.
        at = (0, 0, 0, cache.index, 0)
        new_cache = KVCache(
            k=jax.lax.dynamic_update_slice(cache.k, kv_out[0], at),
            v=jax.lax.dynamic_update_slice(cache.v, kv_out[1], at),
            valid=valid,
            index=cache.index + T,
        )
    if return_hidden:
        return x.reshape(B, T, -1), new_cache
    logits = apply_head(x, head_weight(params, cfg), cfg)
    return logits.astype(jnp.float32).reshape(B, T, -1), new_cache


def prefix_layout(tokens, lengths, right_padded: bool = False):
    """-> (valid [n, P] bool, positions [n, P] int32) of n padded prompts [n, P] (lengths [n]): LEFT-padded unless
    ``right_padded``; row i's real tokens get positions 0 .. len_i - 1."""
    P = tokens.shape[1]
    slot = jnp.arange(P)[None, :]
    lengths = jnp.asarray(lengths, jnp.int32)[:, None]
    offset = jnp.zeros_like(lengths) if right_padded else P - lengths
    valid = (slot >= offset) & (slot < offset + lengths)
    return valid, jnp.where(valid, slot - offset, 0).astype(jnp.int32)


def prefill_cache(params, tokens, lengths, cfg: LlamaConfig, *, cache_len: int, right_padded: bool = False):
    """Run n padded prompts [n, P] (``prefix_layout``) into a fresh cache of ``cache_len`` slots, pad slots marked
    invalid. -> (final hidden states [n, P, D], cache); no LM head (callers apply it where they need logits)."""
    valid, positions = prefix_layout(tokens, lengths, right_padded)
    cache = KVCache.init(cfg, tokens.shape[0], cache_len)
    return forward(
        params, tokens, positions, cfg, segment_ids=valid.astype(jnp.int32), cache=cache, return_hidden=True, empty_cache=True
    )
