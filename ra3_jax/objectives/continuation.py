"""Log-likelihoods of many continuations of one shared prefix: the prefix is run once into a KV cache, every
continuation attends to it, and the LM head + log-softmax run only on the scored positions, a chunk at a time.

Conventions: n prefixes, P prefix slots, k continuations per prefix, R = n*k continuation rows (row i*k + j
continues prefix i), C continuation slots, N = R*C, D d_model, V vocab, S cache slots.

- Prefixes are LEFT-padded to P by default (as in the sampler: the last slot is real for every row), or
  right-padded with ``right_padded=True``; either way row i's real tokens get positions 0 .. len_i - 1 and
  the pad slots are marked invalid in the cache, so nothing attends to them. A prefix may be empty (len 0).
- Continuations are RIGHT-padded to C: ``cont_tokens[r, :cont_lengths[r]]`` are real, at positions
  len_i, len_i + 1, ... (continuing row r's prefix).
- ``out[r, t] = log p(targets[r, t] | prefix_r, cont_tokens[r, :t+1])``: the same inputs/targets convention as
  :func:`ra3_jax.objectives.ntp.token_logprobs`. So the FIRST token to be scored after a prefix needs an input
  before it: the caller gives the cache the document prefix WITHOUT its last token and starts the continuation
  with that last token. For a document ``x`` split after ``p`` tokens and a continuation ``y``:
  ``prefix = x[:p-1]``, ``cont_tokens = [x[p-1], y_0, ..., y_{m-2}]``, ``targets = [y_0, ..., y_{m-1}]``
  (one recomputed token per row, and no extra "last hidden state" to carry around).
- Scored positions: ``score_mask[r, t] != 0`` and ``t < cont_lengths[r]``; every other entry is 0.

Memory: the final hidden states [N, D] are computed by ``forward(..., return_hidden=True)``; the scored
positions are gathered to the front and the LM head + log-softmax run over chunks of ``chunk`` of them (a scan;
a chunk with nothing to score is skipped), so the vocabulary-sized intermediate is [chunk, V], never [N, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ra3_jax.errors import InputError
from ra3_jax.model.llama import KVCache, LlamaConfig, apply_head, forward, head_weight, prefill_cache, prefix_layout


def prefix_cache(
    params, prefix_tokens, prefix_lengths, cfg: LlamaConfig, *, cache_len: int, right_padded: bool = False
) -> KVCache:
    """Prefill the n padded prefixes [n, P] (lengths [n]) into a cache of ``cache_len`` slots (n rows).

    Size it P + C for continuations of C slots. (Scoring never writes a continuation into the cache -- the new
    keys are attended to directly -- so the numbers are the same with any cache_len >= max(P, C).) The LM head
    is not applied (the prefill's hidden states are dropped)."""
    P = prefix_tokens.shape[1]
    if cache_len < P:
        raise InputError(f"cache_len={cache_len} is shorter than the {P} prefix slots")
    return prefill_cache(params, prefix_tokens, prefix_lengths, cfg, cache_len=cache_len, right_padded=right_padded)[1]


def repeat_cache(cache: KVCache, k: int) -> KVCache:
    """Each of the n rows repeated k times along the batch: row i*k + j of the result is row i ([n*k] rows)."""
    return cache.repeat(k)


def _check_shapes(cont_tokens, targets, score_mask):
    if cont_tokens.shape != targets.shape or cont_tokens.shape != score_mask.shape:
        raise InputError(f"cont_tokens {cont_tokens.shape}, targets {targets.shape}, score_mask {score_mask.shape} differ")


def _scored(cont_lengths, score_mask):
    """[R, C] bool: the positions to score (inside the continuation and in score_mask)."""
    C = score_mask.shape[1]
    return (score_mask != 0) & (jnp.arange(C)[None, :] < jnp.asarray(cont_lengths)[:, None])


def _cached_hidden(params, cache: KVCache, cont_tokens, cont_lengths, cfg: LlamaConfig):
    """Final hidden states [R, C, D] of the continuations on top of the cache (R rows). Row r's positions
    continue from its number of valid cached slots (its prefix length)."""
    R, C = cont_tokens.shape
    if cache.valid.shape[0] != R:
        raise InputError(f"the cache has {cache.valid.shape[0]} rows, the continuations {R} (repeat_cache?)")
    written = (jnp.arange(cache.max_len)[None, :] < cache.index) & cache.valid
    start = written.sum(-1).astype(jnp.int32)
    positions = start[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    seg = (jnp.arange(C)[None, :] < jnp.asarray(cont_lengths)[:, None]).astype(jnp.int32)
    hidden, _ = forward(params, cont_tokens, positions, cfg, segment_ids=seg, cache=cache, return_hidden=True)
    return hidden


def scored_logprobs(params, hidden, targets, scored, cfg: LlamaConfig, *, chunk: int = 512, remat: bool = True):
    """log-softmax(hidden @ W_out)[target] at the scored positions, 0 elsewhere: hidden [R, C, D], targets and
    scored [R, C] -> [R, C] float32.

    The scored positions are gathered to the front of the flattened [N] (``jnp.nonzero`` with a static size),
    padded to a multiple of ``chunk`` and scanned over in chunks. remat (the default; free without a gradient):
    recompute each chunk's logits in the backward pass instead of saving them, and skip the chunks past the
    last scored position (``lax.cond``). Without it the gradient saves [N, V] worth of chunk residuals."""
    R, C, D = hidden.shape
    N = R * C
    n_chunks = -(-N // chunk)
    idx = jnp.nonzero(scored.reshape(N), size=n_chunks * chunk, fill_value=N)[0]  # scored first, then N
    count = scored.sum()
    safe = jnp.minimum(idx, N - 1)
    h = jnp.take(hidden.reshape(N, D), safe, axis=0).reshape(n_chunks, chunk, D)
    tgt = jnp.take(targets.reshape(N), safe, axis=0).reshape(n_chunks, chunk)
    w = head_weight(params, cfg)

    def head(h_c, t_c):  # [chunk, D], [chunk] -> [chunk] float32
        logits = apply_head(h_c, w, cfg).astype(jnp.float32)  # the same rounding as forward's logits
        tgt_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return tgt_logit - jax.nn.logsumexp(logits, axis=-1)

    def one(i, h_c, t_c):
        if not remat:  # every chunk: a cond's residuals would stack a copy of W per chunk
            return head(h_c, t_c)
        skip = lambda h_c, t_c: jnp.zeros((chunk,), jnp.float32)  # noqa: E731
        return jax.lax.cond(i * chunk < count, head, skip, h_c, t_c)

    if remat:  # around the cond: the residuals are the chunk's inputs (W stays a loop-invariant constant)
        one = jax.checkpoint(one)

    lp = jax.lax.map(lambda xs: one(*xs), (jnp.arange(n_chunks), h, tgt)).reshape(-1)
    return jnp.zeros((N,), jnp.float32).at[idx].set(lp, mode="drop").reshape(R, C)


def continuation_logprobs(
    params, cache: KVCache, cont_tokens, cont_lengths, targets, score_mask, cfg: LlamaConfig, *, chunk: int = 512
) -> jax.Array:
    """[R, C] float32: log p(targets[r, t] | prefix_r, cont_tokens[r, :t+1]) where scored, 0 elsewhere.

    cache: the R-row prefix cache (``repeat_cache(prefix_cache(...), k)``); cont_tokens, targets, score_mask
    [R, C]; cont_lengths [R]. See the module docstring for the first-token convention."""
    _check_shapes(cont_tokens, targets, score_mask)
    hidden = _cached_hidden(params, cache, cont_tokens, cont_lengths, cfg)
    return scored_logprobs(params, hidden, targets, _scored(cont_lengths, score_mask), cfg, chunk=chunk)


def _full_hidden(params, prefix_tokens, prefix_lengths, cont_tokens, cont_lengths, cfg: LlamaConfig, right_padded: bool):
    """Hidden states [R, C, D] of the continuation slots from ONE forward over prefix + continuation [R, P + C]
    (no cache): the exact computation, gradient through the prefix included."""
    R, C = cont_tokens.shape
    k = R // prefix_tokens.shape[0]
    valid, positions = prefix_layout(prefix_tokens, prefix_lengths, right_padded)
    lengths = jnp.asarray(prefix_lengths, jnp.int32)
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
    cont_valid = jnp.arange(C)[None, :] < jnp.asarray(cont_lengths)[:, None]
    tokens = jnp.concatenate([rep(prefix_tokens), cont_tokens], axis=1)
    seg = jnp.concatenate([rep(valid), cont_valid], axis=1).astype(jnp.int32)  # one segment; pads 0
    cont_pos = rep(lengths)[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]
    pos = jnp.concatenate([rep(positions), cont_pos], axis=1)
    hidden, _ = forward(params, tokens, pos, cfg, segment_ids=seg, return_hidden=True)
    return hidden[:, prefix_tokens.shape[1] :]


def policy_logprobs(
    params,
    prefix_tokens,
    prefix_lengths,
    cont_tokens,
    cont_lengths,
    targets,
    score_mask,
    cfg: LlamaConfig,
    *,
    exact: bool = False,
    chunk: int = 512,
    remat: bool = True,
    right_padded: bool = False,
) -> jax.Array:
    """:func:`continuation_logprobs` as a differentiable function of params (the policy's log q), [R, C].

    Takes the n prefixes [n, P] (lengths [n]) themselves, R = n*k continuation rows (row i*k + j continues
    prefix i), so a micro-batch split along axis 0 keeps prefixes and their rows together.

    exact=False: the prefix cache is computed from ``stop_gradient(params)`` and held constant; the gradient
    flows only through the continuation's own computation (its queries, keys, values, MLPs and the LM head),
    not through the prefix's keys/values. An APPROXIMATION of the exact gradient (which also moves the prefix's
    representation), at the cost of a forward-only prefill shared by the k rows of a prefix.
    exact=True: one forward over the whole sequences [R, P + C] without a cache (the prefix recomputed per
    row), so the gradient is exact; for tests and small models. Either way the LM head is chunked, and remat
    (default on) recomputes each chunk's logits in the backward pass so no [N, V] residual is kept."""
    _check_shapes(cont_tokens, targets, score_mask)
    n, P = prefix_tokens.shape
    R, C = cont_tokens.shape
    if R % n:
        raise InputError(f"{R} continuation rows are not a multiple of the {n} prefixes")
    if exact:
        hidden = _full_hidden(params, prefix_tokens, prefix_lengths, cont_tokens, cont_lengths, cfg, right_padded)
    else:
        frozen = jax.lax.stop_gradient(params)
        cache = prefix_cache(frozen, prefix_tokens, prefix_lengths, cfg, cache_len=P + C, right_padded=right_padded)
        cache = jax.lax.stop_gradient(repeat_cache(cache, R // n))
        # one attended length (the whole cache: prefix + continuation slots): under a gradient, the decode-time
        # lax.switch over attended lengths would stack every branch's residuals, zero-filled for the branches
        # not taken (SmolLM2 E-step update: ~1.8 s of zero-fill per round on 2 CPU cores)
        hidden = _cached_hidden(params, cache, cont_tokens, cont_lengths, cfg.replace(decode_buckets=1))
    return scored_logprobs(params, hidden, targets, _scored(cont_lengths, score_mask), cfg, chunk=chunk, remat=remat)
