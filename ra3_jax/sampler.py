"""In-graph sampler: prefill + decode over a KV cache in ONE jitted function (lax.while_loop, no per-token host
round trip). Serves every rollout (RA3 E-step, RLVR, RLPT) and evaluation completions.

The sampler is stateless: :class:`Sampler` holds the model config and the tokenizer, and the params are the first
argument of every call (``sampler.generate_tokens(params, prompts, ...)``), so one Sampler serves any weights.

Conventions: prompts are LEFT-padded to a bucketed length P (right-padded input is converted in-graph), so the
last prompt slot is real for every row and row b's positions are ``slot - (P - len_b)``. G samples per prompt
share one prefill: the cache is computed for the B prompts and repeated G times along the batch.
Stop strings are matched exactly at the byte level in-graph (:mod:`ra3_jax.stop_strings`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ra3_jax.distributed import fetch
from ra3_jax.errors import InputError
from ra3_jax.model.llama import KVCache, LlamaConfig, apply_head, forward, head_weight, prefill_cache
from ra3_jax.sampling import Greedy, SamplingMethod, Temperature, sampling_method  # noqa: F401  (re-exported)
from ra3_jax.stop_strings import advance_stops, build_stop_automata, token_byte_table, trim_at_stop

STOP_LENGTH, STOP_EOS, STOP_STRING = 0, 1, 2
STOP_REASONS = {STOP_LENGTH: "length", STOP_EOS: "eos", STOP_STRING: "stop_string"}


# ----------------------------------------------------------------------------------------------- the loop
@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [B*G, N] generated tokens (pad_id after the end)
    lengths: jax.Array  # [B*G] number of generated tokens (the stop token / string included)
    logprobs: jax.Array  # [B*G, N] log p of each token under the model (temperature 1, no filtering)
    logprobs_processed: jax.Array  # [B*G, N] log p under the sampling distribution (temperature, top-k/p)
    stop_reason: jax.Array  # [B*G] STOP_LENGTH | STOP_EOS | STOP_STRING


@flax.struct.dataclass
class DecodeState:
    """The while-loop carry, BG = B * G rows."""

    step: jax.Array
    logits: jax.Array  # [BG, V] next-token logits
    cache: KVCache
    pos: jax.Array  # [BG] position of the next token
    done: jax.Array
    reason: jax.Array
    lengths: jax.Array
    tokens: jax.Array
    lp: jax.Array
    lp_proc: jax.Array
    stop_state: jax.Array  # [BG, n_stop]
    key: jax.Array


@flax.struct.dataclass
class DecodeContext:
    """Per-call constants of the decode loop (BG rows)."""

    forced_prefix: jax.Array  # [BG, F] tokens row r must emit first
    forced_lengths: jax.Array  # [BG]
    eos: jax.Array  # [n_eos] int32 (-1 when none)
    stop_dfa: jax.Array  # [n_stop, M+1, 256]
    stop_accept: jax.Array  # [n_stop]
    tok_bytes: jax.Array  # [V, Lmax]
    tok_len: jax.Array  # [V]


def _to_left_padded(tokens, lengths):
    """Right-padded [B, P] -> left-padded (per-row roll)."""
    P = tokens.shape[1]
    return jax.vmap(lambda t, n: jnp.roll(t, P - n))(tokens, lengths)


def prefill(
    params,
    prompt_tokens,
    prompt_lengths,
    key,
    *,
    cfg: LlamaConfig,
    max_new_tokens: int,
    num_samples: int = 1,
    n_stops: int = 0,
    pad_id: int = 0,
    cache_len: int | None = None,
) -> DecodeState:
    """Run the B left-padded prompts [B, P] through the model once into a KV cache, repeat it G = num_samples
    times along the batch and return the initial decode state (the next-token logits of every row)."""
    B, P = prompt_tokens.shape
    G, N = num_samples, max_new_tokens
    hidden, cache = prefill_cache(params, prompt_tokens, prompt_lengths, cfg, cache_len=cache_len or (P + N))
    # the LM head on the last slot only (left padding: every row's last prompt token), never [B, P, V] logits
    last = apply_head(hidden[:, -1, :], head_weight(params, cfg), cfg).astype(jnp.float32)  # as forward rounds
    rep = lambda x: jnp.repeat(x, G, axis=0)  # noqa: E731  prefill shared by the G samples of a prompt
    cache = cache.repeat(G)
    BG = B * G
    return DecodeState(
        step=jnp.zeros((), jnp.int32),
        logits=rep(last),
        cache=cache,
        pos=rep(prompt_lengths).astype(jnp.int32),
        done=jnp.zeros((BG,), bool),
        reason=jnp.full((BG,), STOP_LENGTH, jnp.int32),
        lengths=jnp.zeros((BG,), jnp.int32),
        tokens=jnp.full((BG, N), pad_id, jnp.int32),
        lp=jnp.zeros((BG, N), jnp.float32),
        lp_proc=jnp.zeros((BG, N), jnp.float32),
        stop_state=jnp.zeros((BG, n_stops), jnp.int32),
        key=key,
    )


def _next_token(s: DecodeState, ctx: DecodeContext, key, sampling: SamplingMethod, valid_vocab: int | None):
    """-> (token [BG], forced [BG], log p under the model, log p under the sampling distribution)."""
    allowed = s.logits
    if valid_vocab is not None and valid_vocab < s.logits.shape[-1]:
        allowed = jnp.where(jnp.arange(s.logits.shape[-1]) < valid_vocab, s.logits, -jnp.inf)
    tok, proc = sampling.sample(allowed, key)
    F = ctx.forced_prefix.shape[1]
    forced_tok = ctx.forced_prefix[:, jnp.minimum(s.step, F - 1)] if F else tok
    is_forced = s.step < ctx.forced_lengths
    tok = jnp.where(is_forced, forced_tok, tok)
    tok_lp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    if sampling.greedy:  # the sampling distribution is a point mass
        tok_lpp = jnp.zeros_like(tok_lp)
    else:
        tok_lpp = jnp.take_along_axis(jax.nn.log_softmax(proc, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, is_forced, tok_lp, tok_lpp


def decode_step(
    params,
    s: DecodeState,
    ctx: DecodeContext,
    *,
    cfg: LlamaConfig,
    sampling: SamplingMethod,
    pad_id: int = 0,
    valid_vocab: int | None = None,
) -> DecodeState:
    """One loop body: pick every row's next token, record it, check EOS / stop strings, run the model on it."""
    key, sub = jax.random.split(s.key)
    tok, is_forced, tok_lp, tok_lpp = _next_token(s, ctx, sub, sampling, valid_vocab)
    active = ~s.done
    tok = jnp.where(active, tok, pad_id)
    tok_len = jnp.where(active, ctx.tok_len[tok], 0)
    stop_state, hit = advance_stops(s.stop_state, ctx.tok_bytes[tok], tok_len, ctx.stop_dfa, ctx.stop_accept)
    hit_eos = active & ~is_forced & jnp.any(tok[:, None] == ctx.eos[None, :], axis=-1)
    hit_str = active & ~is_forced & hit & ~hit_eos
    # one decode step for every row; finished rows feed a pad that nobody attends to
    logits, cache = forward(
        params, tok[:, None], s.pos[:, None], cfg, segment_ids=active[:, None].astype(jnp.int32), cache=s.cache
    )
    return DecodeState(
        step=s.step + 1,
        logits=logits[:, 0],
        cache=cache,
        pos=s.pos + active.astype(jnp.int32),
        done=s.done | hit_eos | hit_str,
        reason=jnp.where(hit_eos, STOP_EOS, jnp.where(hit_str, STOP_STRING, s.reason)),
        lengths=s.lengths + active.astype(jnp.int32),
        tokens=s.tokens.at[:, s.step].set(tok),
        lp=s.lp.at[:, s.step].set(jnp.where(active, tok_lp, 0.0)),
        lp_proc=s.lp_proc.at[:, s.step].set(jnp.where(active, tok_lpp, 0.0)),
        stop_state=stop_state,
        key=key,
    )


_STATIC = ("cfg", "sampling", "max_new_tokens", "num_samples", "eos_ids", "pad_id", "right_padded", "cache_len", "valid_vocab")


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate(
    params,
    prompt_tokens,
    prompt_lengths,
    key,
    forced_prefix,
    forced_lengths,
    stop_dfa,
    stop_accept,
    tok_bytes,
    tok_len,
    *,
    cfg: LlamaConfig,
    sampling: SamplingMethod,
    max_new_tokens: int,
    num_samples: int = 1,
    eos_ids: tuple = (),
    pad_id: int = 0,
    right_padded: bool = False,
    cache_len: int | None = None,
    valid_vocab: int | None = None,
    max_steps=None,
) -> SampleOutput:
    """Prefill B prompts once, then decode G = num_samples continuations each, all in one XLA program.

    prompt_tokens [B, P] (left-padded unless right_padded), prompt_lengths [B]; forced_prefix [B, F] tokens that
    row b must emit first (forced_lengths [B] of them; used by RA3 to start a rationale with its marker).
    valid_vocab: ids >= this are never sampled (a model vocabulary padded past the tokenizer's); the logprobs
    under the model stay full-vocabulary, as the trainer computes them.
    max_steps: a traced int (<= max_new_tokens): the loop stops after this many tokens. ``max_new_tokens`` is the
    (bucketed) width of the output buffers and a compile-time shape; ``max_steps`` is the caller's exact limit, so
    rows that run to the limit do not keep decoding to the bucket's end (the same tokens, fewer steps).
    """
    G, N = num_samples, max_new_tokens
    if right_padded:
        prompt_tokens = _to_left_padded(prompt_tokens, prompt_lengths)
    n_stops = stop_dfa.shape[0]
    kw = dict(cfg=cfg, max_new_tokens=N, num_samples=G, n_stops=n_stops, pad_id=pad_id, cache_len=cache_len)
    state = prefill(params, prompt_tokens, prompt_lengths, key, **kw)
    ctx = DecodeContext(
        forced_prefix=jnp.repeat(forced_prefix, G, axis=0),
        forced_lengths=jnp.repeat(forced_lengths, G, axis=0),
        eos=jnp.array(eos_ids if eos_ids else (-1,), jnp.int32),
        stop_dfa=stop_dfa,
        stop_accept=stop_accept,
        tok_bytes=tok_bytes,
        tok_len=tok_len,
    )
    step = functools.partial(decode_step, params, ctx=ctx, cfg=cfg, sampling=sampling, pad_id=pad_id, valid_vocab=valid_vocab)
    limit = N if max_steps is None else jnp.minimum(jnp.asarray(max_steps, jnp.int32), N)
    s = jax.lax.while_loop(lambda s: (s.step < limit) & ~jnp.all(s.done), step, state)
    return SampleOutput(tokens=s.tokens, lengths=s.lengths, logprobs=s.lp, logprobs_processed=s.lp_proc, stop_reason=s.reason)


# ------------------------------------------------------------------------------------------- host wrapper
def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (>= minimum) so repeated calls reuse compiled programs."""
    b = minimum
    while b < n:
        b *= 2
    return b


def round_up(n: int, multiple: int) -> int:
    """Round up to a multiple of ``multiple`` (>= multiple): less padding than a power of two, more shapes."""
    return max(multiple, -(-n // multiple) * multiple)


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    logprobs: list[float]
    logprobs_processed: list[float]
    stop_reason: str


def _pad_rows(rows: Sequence[Sequence[int]], width: int, pad: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids -> ([len(rows), width] int32 padded on the left or the right, lengths [len(rows)])."""
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, width - len(r) :] = r
        else:
            out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def _trim(out: SampleOutput, max_new_tokens: int) -> SampleOutput:
    """Host output of a bucketed generation cut back to max_new_tokens (a row cut short stopped for length)."""
    if out.tokens.shape[1] == max_new_tokens:
        return out
    over = out.lengths > max_new_tokens
    return SampleOutput(
        tokens=out.tokens[:, :max_new_tokens],
        lengths=np.minimum(out.lengths, max_new_tokens),
        logprobs=out.logprobs[:, :max_new_tokens],
        logprobs_processed=out.logprobs_processed[:, :max_new_tokens],
        stop_reason=np.where(over, STOP_LENGTH, out.stop_reason),
    )


class Sampler:
    """Tokenize, left-pad to buckets, call :func:`generate`, detokenize and trim at the stop string.

    Stateless in the weights: ``params`` is the first argument of every call."""

    def __init__(self, cfg: LlamaConfig, tokenizer, *, eos_ids: Sequence[int] | None = None, prompt_multiple: int | None = None):
        """prompt_multiple: pad prompts to a multiple of this many slots instead of a power of two (less prefill
        padding, more compiled shapes; the RA3 E-step's prompts are document prefixes of every length)."""
        self.cfg, self.tokenizer, self.prompt_multiple = cfg, tokenizer, prompt_multiple
        # By default every end-of-document / end-of-turn id the tokenizer declares ends a row (<|im_end|> too).
        default = getattr(tokenizer, "end_ids", None) or [tokenizer.eos_id]
        self.eos_ids = tuple(int(i) for i in (eos_ids if eos_ids is not None else default))
        self.tok_bytes, self.tok_len = token_byte_table(tokenizer, cfg.vocab_size)
        # Model rows past the tokenizer's vocabulary (padding) can never be decoded: never sample them.
        self.valid_vocab = int(tokenizer.vocab_size) if tokenizer.vocab_size < cfg.vocab_size else None

    def generate_tokens(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingMethod,
        key=None,
        num_samples: int = 1,
        stop_strings: Sequence[str] = (),
        forced_prefix: Sequence[Sequence[int]] | None = None,
    ) -> SampleOutput:
        if len(prompts) == 0:
            raise InputError("no prompts")
        if any(len(p) == 0 for p in prompts):
            raise InputError("empty prompt: every prompt needs at least one token (e.g. the BOS token)")
        longest = max(len(p) for p in prompts)
        P = bucket(longest) if self.prompt_multiple is None else round_up(longest, self.prompt_multiple)
        N = bucket(max_new_tokens)
        if P + N > self.cfg.max_seq_len:
            raise InputError(f"prompt ({P}) + new tokens ({N}) exceed the model's max_seq_len {self.cfg.max_seq_len}")
        pad = self.tokenizer.pad_id
        toks, lens = _pad_rows(prompts, P, pad, left=True)
        fp = forced_prefix or [[] for _ in prompts]
        ftoks, flens = _pad_rows(fp, bucket(max(1, max(len(f) for f in fp)), 1), pad, left=False)
        dfa, accept = build_stop_automata(stop_strings)
        key = jax.random.key(0) if key is None else key
        arrays = (params, toks, lens, key, ftoks, flens, dfa, accept, self.tok_bytes, self.tok_len)
        kw = dict(cfg=self.cfg, sampling=sampling, max_new_tokens=N, num_samples=num_samples, eos_ids=self.eos_ids)
        # the loop stops at max_new_tokens exactly; N (a power of two) only sizes the buffers
        out = generate(*arrays, **kw, pad_id=pad, valid_vocab=self.valid_vocab, max_steps=np.int32(max_new_tokens))
        # host copies (in a multi-process run, gathered from every process), the bucket trimmed back
        return _trim(fetch(out), max_new_tokens)

    def complete(
        self,
        params,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingMethod = Temperature(),
        key=None,
        num_samples: int = 1,
        stop_strings: Sequence[str] = (),
    ) -> list[Completion]:
        ids = [self._encode_prompt(p) for p in prompts]
        kw = dict(max_new_tokens=max_new_tokens, sampling=sampling, key=key, num_samples=num_samples, stop_strings=stop_strings)
        out = self.generate_tokens(params, ids, **kw)
        results = []
        for r in range(len(prompts) * num_samples):
            n = int(out.lengths[r])
            toks = [int(t) for t in out.tokens[r, :n]]
            reason = int(out.stop_reason[r])
            text = self.tokenizer.decode([t for t in toks if t not in self.eos_ids] if reason == STOP_EOS else toks)
            if reason == STOP_STRING:
                text = trim_at_stop(text, stop_strings)
            results.append(
                Completion(
                    prompt=prompts[r // num_samples],
                    text=text,
                    tokens=toks,
                    logprobs=out.logprobs[r, :n].tolist(),
                    logprobs_processed=out.logprobs_processed[r, :n].tolist(),
                    stop_reason=STOP_REASONS[reason],
                )
            )
        return results

    def _encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        return ids
