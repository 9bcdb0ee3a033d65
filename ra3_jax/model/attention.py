"""Causal self-attention over packed segments, behind one function with implementations chosen by config and
platform (``LlamaConfig.attention``).

Layout (model/llama.py's): q [B, T, K, G, Dh] (query head h = kv head * G + g), k, v [B, K, T, Dh],
segment_ids [B, T] (0 = padding; a token attends to earlier tokens of its own segment only). Every
implementation returns [B, T, K, G, Dh] and agrees with ``dense`` (the XLA reference) on every non-pad query,
forward and gradient (tests/test_attention.py). Pad queries' outputs are unspecified: no loss reads them and
no real token attends to a pad key.

- ``xla``: the reference: one [T, T] score matrix per head, the causal + segment mask applied to it. Its
  gradient (and the blocked one's) is the closed form of softmax attention (``_attend_bwd``: one pass over the
  scores; saves the exponentiated scores, not autodiff's intermediates), tested against autodiff through a plain
  softmax.
- ``blocked`` (CPU): queries in blocks of ``attention_block``; block i attends to keys [0, (i + 1) * block)
  only, so the fully masked key blocks above the diagonal are never computed (~(n + 1) / 2n of the score and
  value FLOPs for n blocks; the segment and pad masks still apply inside). Exact: each block is one softmax.
- ``pallas`` (GPU): the Pallas (Triton) flash-attention kernel with segment ids and the causal mask; kv heads
  repeated for GQA. On the CPU it runs in interpret mode (correctness tests only: slow); on a TPU it falls back to
  ``xla``.
- ``splash`` (TPU): JAX's Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.splash_attention):
  a causal mask whose fully masked blocks are skipped, segment ids, GQA without repeating kv heads (head h reads
  kv head h // G); tiles of 512 (256, 128: the largest dividing T). On the CPU it runs in interpret mode (tests);
  on a GPU it falls back to ``xla``.
- ``auto``: ``blocked`` on CPU, ``xla`` elsewhere (the kernels are opt-in until the device checks have measured
  them; `benchmarks/train_step.py --attention` compares them).
A shape an implementation cannot take (T not a multiple of its block; flash tiles not powers of two; splash
tiles not multiples of 128) falls back to ``xla`` (``resolve``).

On a mesh the kernels run per shard: a pallas_call is not partitioned by XLA (it would gather its operands onto
every device), so inside a function wrapped by ``traced_on(mesh, fn)`` -- every jitted step of the trainers is --
they run under ``shard_map`` over the batch (data, fsdp) and kv-head (tensor; or query-group) axes, with the
layout the dense layers already give them (``sharding.LOGICAL_RULES``); tested on 8 devices against the
reference, without a collective where those sizes divide the mesh axes (``_per_shard``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from ra3_jax.model.matmul import from_residual, to_residual, transposed_copy

AttentionImpl = Literal["auto", "xla", "blocked", "pallas", "splash"]
IMPLEMENTATIONS = get_args(AttentionImpl)
NEG_INF = -1e30


def dense(q, k, v, mask):
    """q: [B,T,K,G,Dh]; k,v: [B,K,S,Dh]; mask: [B,T,S] bool -> [B,T,K,G,Dh].

    Computed as contiguous 3-D batched matmuls over (B*K) with the G query heads of a kv head stacked along
    the query axis ([B*K, G*T, Dh] x [B*K, S, Dh]); measured ~1.5x faster on CPU than a 5-D einsum. The gradient
    is the closed form (``_attend_bwd``), not autodiff through the softmax.
    """
    B, T, K, G, Dh = q.shape
    S = k.shape[2]
    qt = q.transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, Dh)
    out = _attend(qt, k.reshape(B * K, S, Dh), v.reshape(B * K, S, Dh), mask)
    return out.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4)


def _exp_scores(qt, k, mask):
    """exp(q k^T / sqrt(Dh) - row max) over the keys ``mask`` allows, and the row sums: qt [B*K, G*T, Dh],
    k [B*K, S, Dh], mask [B, T, S] -> ([B*K, G*T, S], [B*K, G*T, 1]) float32 (the softmax is their ratio)."""
    BK, GT, Dh = qt.shape
    B, T, S = mask.shape
    scores = jnp.einsum("bqd,bsd->bqs", qt * jnp.asarray(Dh**-0.5, qt.dtype), k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores.reshape(B, BK // B, GT // T, T, S), NEG_INF)
    e = jnp.exp(scores - scores.max(-1, keepdims=True)).reshape(BK, GT, S)
    return e, e.sum(-1, keepdims=True)


@jax.custom_vjp
def _attend(qt, k, v, mask):
    """[B*K, G*T, Dh] softmax attention over v [B*K, S, Dh] (weights: ``_exp_scores``)."""
    return _attend_fwd(qt, k, v, mask)[0]


def _attend_fwd(qt, k, v, mask):
    e, denom = _exp_scores(qt, k, mask)
    e = e.astype(v.dtype)
    # normalized after the product: one division per output element instead of per score
    out = (jnp.einsum("bqs,bsd->bqd", e, v, preferred_element_type=jnp.float32) / denom).astype(v.dtype)
    return out, tuple(map(to_residual, (qt, k, v, e, denom, out)))


def _attend_grads(res, g):
    """The softmax-attention gradient in closed form (as in FlashAttention's backward): with P the probabilities
    and O = P V, dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)) / sqrt(Dh), dQ = dS K, dK = dS^T Q. One pass
    over the scores instead of autodiff's several (exp, sum, divide, their transposes). -> (dQ in q's dtype, dK and
    dV in float32: the blocked attention sums them over query blocks before rounding)."""
    qt, k, v, e, denom, out = map(from_residual, res)
    scale = qt.shape[-1] ** -0.5
    f32 = jnp.float32
    p = e.astype(f32) / denom
    dp = jnp.einsum("bqd,bsd->bqs", g, v, preferred_element_type=f32)
    delta = (g.astype(f32) * out.astype(f32)).sum(-1, keepdims=True)
    ds = (p * (dp - delta) * scale).astype(qt.dtype)
    dq = jnp.einsum("bqs,bsd->bqd", ds, k, preferred_element_type=f32).astype(qt.dtype)
    # dK = dS^T Q and dV = P^T dO contract the query axis, the leading one of dS and P. In bfloat16 on the CPU,
    # XLA folds a transpose into such a dot and runs it in Eigen with both sides converted to float32 (76 vs 195
    # GFLOP/s at [32, 128, 512] x [32, 128, 64] on an AMX Xeon), so it gets row-major copies of dS^T and P^T
    # (``transposed_copy``). In float32 the Eigen dot is the faster one (the copies measured -1 to -2%).
    pv = p.astype(v.dtype)
    gv = g.astype(v.dtype)
    if qt.dtype == jnp.bfloat16:
        dk = jnp.einsum("bsq,bqd->bsd", transposed_copy(ds), qt, preferred_element_type=f32)
        dv = jnp.einsum("bsq,bqd->bsd", transposed_copy(pv), gv, preferred_element_type=f32)
    else:
        dk = jnp.einsum("bqs,bqd->bsd", ds, qt, preferred_element_type=f32)
        dv = jnp.einsum("bqs,bqd->bsd", pv, gv, preferred_element_type=f32)
    return dq, dk, dv


def _attend_bwd(res, g):
    dq, dk, dv = _attend_grads(res, g)
    k, v = map(from_residual, res[1:3])
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None  # no mask cotangent


_attend.defvjp(_attend_fwd, _attend_bwd)


def segment_mask(q_seg, k_seg, q_start: int = 0):
    """[B, Tq, Tk] bool: causal (query i at position q_start + i sees keys 0..q_start + i), same segment, key not
    padding."""
    Tq, Tk = q_seg.shape[1], k_seg.shape[1]
    causal = (jnp.arange(Tk)[None, :] <= q_start + jnp.arange(Tq)[:, None])[None]
    return causal & (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)


def flash_tiles(T: int, block: int) -> tuple[int, int]:
    """(forward tile, backward tile) of the Pallas kernel for T tokens."""
    bq = min(block, T)
    return bq, min(bq, 64)


def splash_tile(T: int) -> int | None:
    """The splash kernel's query and key tile for T tokens: 512, 256 or 128, the largest dividing T (its key tile
    must be a multiple of the TPU's 128 lanes); None when none does."""
    return next((t for t in (512, 256, 128) if T % t == 0), None)


def resolve(impl: str, T: int, block: int) -> str:
    """The implementation that runs for a sequence of T tokens (``auto`` by platform; fallbacks by shape and
    platform: the flash kernel needs power-of-two tiles >= 16 that divide T and a GPU, the splash kernel a tile
    (``splash_tile``) and a TPU; either runs on the CPU for tests (interpret mode); elsewhere it is ``xla``)."""
    if block < 1:
        raise ValueError(f"attention_block={block} must be >= 1")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    platform = jax.default_backend()
    if impl == "auto":
        impl = "blocked" if platform == "cpu" else "xla"
    if impl == "blocked" and (T <= block or T % block):
        return "xla"
    if impl == "pallas":
        bq, bk = flash_tiles(T, block)
        tiles_ok = bq >= 16 and bq & (bq - 1) == 0 and T % bq == 0 and T % bk == 0
        if not tiles_ok or platform not in ("gpu", "cpu"):
            return "xla"
    if impl == "splash" and (splash_tile(T) is None or platform not in ("tpu", "cpu")):
        return "xla"
    return impl


def self_attention(q, k, v, segment_ids, *, impl: str = "auto", block: int = 128):
    """Causal self-attention within segments (see the module docstring)."""
    T = q.shape[1]
    impl = resolve(impl, T, block)
    if impl == "xla":
        return dense(q, k, v, segment_mask(segment_ids, segment_ids))
    if impl == "blocked":
        return _blocked(q, k, v, segment_ids, block)
    if impl == "pallas":
        return _per_shard(functools.partial(_pallas, block=block), q, k, v, segment_ids)
    return _per_shard(_splash, q, k, v, segment_ids)


# ------------------------------------------------------------------------------------- kernels on a mesh
_KERNEL_MESH: contextvars.ContextVar = contextvars.ContextVar("ra3_kernel_mesh", default=None)


@contextlib.contextmanager
def kernel_mesh(mesh):
    """While tracing inside this context, the attention kernels run per shard of ``mesh`` (None: unsharded)."""
    token = _KERNEL_MESH.set(mesh)
    try:
        yield
    finally:
        _KERNEL_MESH.reset(token)


def traced_on(mesh, fn):
    """``fn`` tracing under ``kernel_mesh(mesh)``: wrap a function before ``jax.jit`` with the mesh its inputs
    are sharded over (the trainers' update, eval and scoring steps are)."""

    def wrapped(*args, **kwargs):
        with kernel_mesh(mesh):
            return fn(*args, **kwargs)

    inner = fn.func if isinstance(fn, functools.partial) else fn  # the jitted function keeps its name in profiles
    wrapped.__name__ = wrapped.__qualname__ = getattr(inner, "__name__", "traced_on")
    return wrapped


def _per_shard(kernel, q, k, v, segment_ids):
    """``kernel(q, k, v, segment_ids)`` on each shard of the context's mesh: rows over (data, fsdp) and kv heads
    over tensor where they divide (``sharding.logical_to_spec``; a kv head's G query heads stay together), or,
    when the kv heads do not divide it and the G query heads of each do, those (each shard: all kv heads, G / n
    query heads of each), the sequence whole. Attention is independent per row and per head, so no collective is
    needed; an axis that divides neither is left replicated (the kernel's work repeated on its devices, and the
    gradient summed over them)."""
    mesh = _KERNEL_MESH.get()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    from ra3_jax.sharding import logical_to_spec

    K, G = q.shape[2], q.shape[3]
    n = mesh.shape["tensor"]
    by_group = n > 1 and K % n != 0 and G % n == 0
    q_axes = ("batch", None, None, "q_heads", None) if by_group else ("batch", None, "kv_heads", None, None)
    q_spec = logical_to_spec(q_axes, q.shape, mesh)
    kv_spec = logical_to_spec(("batch", "kv_heads", None, None), k.shape, mesh)
    in_specs = (q_spec, kv_spec, kv_spec, P(q_spec[0], None))
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _block_inputs(q, k, v, segment_ids, block: int, i: int):
    """Query block i's ([B*K, G*block, Dh] queries, [B*K, hi, Dh] keys and values up to its end, mask)."""
    B, T, K, G, Dh = q.shape
    lo, hi = i * block, (i + 1) * block
    qt = q[:, lo:hi].transpose(0, 2, 3, 1, 4).reshape(B * K, G * block, Dh)
    mask = segment_mask(segment_ids[:, lo:hi], segment_ids[:, :hi], q_start=lo)
    return qt, k[:, :, :hi].reshape(B * K, hi, Dh), v[:, :, :hi].reshape(B * K, hi, Dh), mask


def _blocked(q, k, v, segment_ids, block: int):
    return _blocked_fwd(q, k, v, segment_ids, block)[0]


def _blocked_fwd(q, k, v, segment_ids, block: int):
    B, T, K, G, Dh = q.shape
    outs, saved = [], []
    for i in range(T // block):
        out, (_, _, _, e, denom, o) = _attend_fwd(*_block_inputs(q, k, v, segment_ids, block, i))
        outs.append(out.reshape(B, K, G, block, Dh).transpose(0, 3, 1, 2, 4))
        saved.append((e, denom, o))
    return jnp.concatenate(outs, axis=1), (*map(to_residual, (q, k, v)), segment_ids, saved)


def _blocked_bwd(block: int, res, g):
    """Each query block's closed-form gradient (``_attend_grads``); the key and value gradients are summed over
    the query blocks per key block in float32 and rounded once (autodiff through the per-block slices padded
    every block's dK/dV to the full length and added them in the inputs' dtype: in bfloat16 on the CPU a
    convert chain per add that cost ~15% of the train step)."""
    q, k, v, segment_ids, saved = res
    q, k, v = map(from_residual, (q, k, v))
    B, T, K, G, Dh = q.shape
    n = T // block
    dqs, dk_parts, dv_parts = [], [[] for _ in range(n)], [[] for _ in range(n)]
    for i in range(n):
        qt, ki, vi, _ = _block_inputs(q, k, v, segment_ids, block, i)
        gi = g[:, i * block : (i + 1) * block].transpose(0, 2, 3, 1, 4).reshape(B * K, G * block, Dh)
        dq, dk, dv = _attend_grads((qt, ki, vi, *saved[i]), gi)
        dqs.append(dq.reshape(B, K, G, block, Dh).transpose(0, 3, 1, 2, 4))
        for j in range(i + 1):
            dk_parts[j].append(dk[:, j * block : (j + 1) * block])
            dv_parts[j].append(dv[:, j * block : (j + 1) * block])

    def total(parts, like):
        return jnp.concatenate([sum(p[1:], p[0]) for p in parts], axis=1).reshape(like.shape).astype(like.dtype)

    return jnp.concatenate(dqs, axis=1), total(dk_parts, k), total(dv_parts, v), None


_blocked = jax.custom_vjp(_blocked, nondiff_argnums=(4,))
_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _pallas(q, k, v, segment_ids, *, block: int):
    from jax.experimental.pallas.ops.gpu import attention as flash

    B, T, K, G, Dh = q.shape
    qh = q.reshape(B, T, K * G, Dh)
    kh = jnp.repeat(k.transpose(0, 2, 1, 3), G, axis=2)  # [B, T, H, Dh]: head h reads kv head h // G
    vh = jnp.repeat(v.transpose(0, 2, 1, 3), G, axis=2)
    bq, b = flash_tiles(T, block)
    sizes = flash.BlockSizes(block_q=bq, block_k=bq, block_q_dkv=b, block_kv_dkv=b, block_q_dq=b, block_kv_dq=b)
    out = flash.mha(
        qh,
        kh,
        vh,
        segment_ids,
        sm_scale=Dh**-0.5,
        causal=True,
        block_sizes=sizes,
        interpret=jax.default_backend() != "gpu",
    )
    return out.reshape(B, T, K, G, Dh)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, T: int, interpret: bool):
    """The splash kernel for ``heads`` query heads of T tokens (its mask metadata is built on the host, once)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    t = splash_tile(T)
    tiles = dict(block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t, block_kv_dkv=t, block_kv_dkv_compute=t)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(heads)])
    # built as constants even when first called inside a trace (it turns its numpy mask metadata into arrays,
    # which a trace would make tracers of, and this cache would hand them to the next trace)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(
            mask,
            block_sizes=sk.BlockSizes(**tiles, block_q_dq=t, block_kv_dq=t),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _splash(q, k, v, segment_ids):
    """Splash attention: [H, T, Dh] queries (head h = kv head * G + g, the kernel's GQA order) against the
    [K, T, Dh] keys and values of each row; segment ids mask across documents (pad tokens, id 0, see only pad
    keys); the kernel does not scale the scores, so q is scaled first."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, K, G, Dh = q.shape
    kernel = _splash_kernel(K * G, T, jax.default_backend() != "tpu")
    qh = (q * jnp.asarray(Dh**-0.5, q.dtype)).reshape(B, T, K * G, Dh).transpose(0, 2, 1, 3)
    one_row = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))
    out = jax.vmap(one_row)(qh, k, v, segment_ids)  # [B, H, T, Dh]
    return out.transpose(0, 2, 1, 3).reshape(B, T, K, G, Dh)
