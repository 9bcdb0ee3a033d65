"""In-graph sampler: prefill + decode over a KV cache in ONE jitted function (lax.while_loop, no per-token host
round trip). Serves every rollout (RA3 E-step, RLVR, RLPT) and evaluation completions.

Conventions: prompts are LEFT-padded to a bucketed length P (right-padded input is converted in-graph), so the
last prompt slot is real for every row and row b's positions are ``slot - (P - len_b)``. G samples per prompt
share one prefill: the cache is computed for the B prompts and repeated G times along the batch.
Stop strings are matched EXACTLY at the byte level in-graph: every sampled token's bytes are fed through a
KMP automaton per stop string, so a stop string is found whatever tokens spell it.
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
from ra3_jax.model.llama import KVCache, LlamaConfig, forward

STOP_LENGTH, STOP_EOS, STOP_STRING = 0, 1, 2
STOP_REASONS = {STOP_LENGTH: "length", STOP_EOS: "eos", STOP_STRING: "stop_string"}


# ------------------------------------------------------------------------------------------ sampling methods
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One interface for greedy / temperature / top-k / top-p (combinable). temperature 0 = greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def process(self, logits: jax.Array) -> jax.Array:
        """Filtered, temperature-scaled logits ([..., V] float32); disallowed tokens get -inf."""
        if self.greedy:
            return logits
        x = logits / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
            x = jnp.where(x < kth, -jnp.inf, x)
        if self.top_p < 1.0:
            srt = jnp.sort(x, axis=-1)[..., ::-1]
            probs = jax.nn.softmax(srt, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
            keep = before < self.top_p  # always keeps the top token
            thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
            x = jnp.where(x < thresh, -jnp.inf, x)
        return x

    def sample(self, logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (tokens [...], processed logits)."""
        x = self.process(logits)
        if self.greedy:
            return jnp.argmax(x, axis=-1).astype(jnp.int32), x
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32), x


# ------------------------------------------------------------------------------------------- stop strings
def build_stop_automata(stop_strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """KMP DFAs, one per stop string: (dfa [n, M+1, 256] int32, accept_state [n] int32)."""
    pats = [s.encode("utf-8") for s in stop_strings if s]
    if not pats:
        return np.zeros((0, 1, 256), np.int32), np.zeros((0,), np.int32)
    M = max(len(p) for p in pats)
    dfa = np.zeros((len(pats), M + 1, 256), np.int32)
    for i, p in enumerate(pats):
        m = len(p)
        dfa[i, 0, p[0]] = 1
        x = 0
        for j in range(1, m):
            dfa[i, j] = dfa[i, x]
            dfa[i, j, p[j]] = j + 1
            x = dfa[i, x, p[j]]
        dfa[i, m:] = m  # absorbing accept state
    return dfa, np.array([len(p) for p in pats], np.int32)


def token_byte_table(tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes [V, Lmax] uint8-as-int32, lengths [V]) for in-graph stop matching; special tokens are empty."""
    strings = tokenizer.token_byte_strings()
    L = max(1, max(len(b) for b in strings))
    table = np.zeros((vocab_size, L), np.int32)
    lens = np.zeros((vocab_size,), np.int32)
    for i, b in enumerate(strings[:vocab_size]):
        table[i, : len(b)] = list(b)
        lens[i] = len(b)
    return table, lens


def _advance_stops(states, tok_bytes, tok_len, dfa, accept):
    """states [B, n]; tok_bytes [B, L]; tok_len [B] -> (new states, matched [B])."""
    n = dfa.shape[0]

    def step(j, st):
        byte = tok_bytes[:, j]  # [B]
        nxt = dfa[jnp.arange(n)[None, :], st, byte[:, None]]  # [B, n]
        return jnp.where((j < tok_len)[:, None], nxt, st)

    states = jax.lax.fori_loop(0, tok_bytes.shape[1], step, states)
    return states, jnp.any(states == accept[None, :], axis=-1)


# ----------------------------------------------------------------------------------------------- the loop
@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [B*G, N] generated tokens (pad_id after the end)
    lengths: jax.Array  # [B*G] number of generated tokens (the stop token / string included)
    logprobs: jax.Array  # [B*G, N] log p of each token under the model (temperature 1, no filtering)
    logprobs_processed: jax.Array  # [B*G, N] log p under the sampling distribution (temperature, top-k/p)
    stop_reason: jax.Array  # [B*G] STOP_LENGTH | STOP_EOS | STOP_STRING


@flax.struct.dataclass
class _State:
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


def _to_left_padded(tokens, lengths):
    """Right-padded [B, P] -> left-padded (per-row roll)."""
    P = tokens.shape[1]
    return jax.vmap(lambda t, n: jnp.roll(t, P - n))(tokens, lengths)


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "sampling",
        "max_new_tokens",
        "num_samples",
        "eos_ids",
        "pad_id",
        "right_padded",
        "cache_len",
        "valid_vocab",
    ),
)
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
    sampling: SamplingParams,
    max_new_tokens: int,
    num_samples: int = 1,
    eos_ids: tuple = (),
    pad_id: int = 0,
    right_padded: bool = False,
    cache_len: int | None = None,
    valid_vocab: int | None = None,
) -> SampleOutput:
    """Prefill B prompts once, then decode G = num_samples continuations each, all in one XLA program.

    prompt_tokens [B, P] (left-padded unless right_padded), prompt_lengths [B]; forced_prefix [B, F] tokens that
    row b must emit first (forced_lengths [B] of them; used by RA3 to start a rationale with its marker).
    valid_vocab: ids >= this are never sampled (a model vocabulary padded past the tokenizer's); the logprobs
    under the model stay full-vocabulary, as the trainer computes them.
    """
    B, P = prompt_tokens.shape
    G, N = num_samples, max_new_tokens
    if right_padded:
        prompt_tokens = _to_left_padded(prompt_tokens, prompt_lengths)
    slot = jnp.arange(P)[None, :]
    offset = (P - prompt_lengths)[:, None]
    valid = slot >= offset
    positions = jnp.where(valid, slot - offset, 0)
    S = cache_len or (P + N)
    cache = KVCache.init(cfg, B, S)
    logits, cache = forward(
        params, prompt_tokens, positions, cfg, segment_ids=valid.astype(jnp.int32), cache=cache, empty_cache=True
    )
    last = logits[:, -1, :]

    rep = lambda x: jnp.repeat(x, G, axis=0)  # noqa: E731  prefill shared by the G samples of a prompt
    cache = KVCache(k=jnp.repeat(cache.k, G, axis=1), v=jnp.repeat(cache.v, G, axis=1), valid=rep(cache.valid), index=cache.index)
    BG = B * G
    forced_prefix, forced_lengths = rep(forced_prefix), rep(forced_lengths)
    eos = jnp.array(eos_ids if eos_ids else (-1,), jnp.int32)
    state = _State(
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
        stop_state=jnp.zeros((BG, stop_dfa.shape[0]), jnp.int32),
        key=key,
    )

    def cond(s: _State):
        return (s.step < N) & ~jnp.all(s.done)

    def body(s: _State):
        key, sub = jax.random.split(s.key)
        allowed = s.logits
        if valid_vocab is not None and valid_vocab < s.logits.shape[-1]:
            allowed = jnp.where(jnp.arange(s.logits.shape[-1]) < valid_vocab, s.logits, -jnp.inf)
        tok, proc = sampling.sample(allowed, sub)
        F = forced_prefix.shape[1]
        forced_tok = forced_prefix[:, jnp.minimum(s.step, F - 1)] if F else tok
        is_forced = s.step < forced_lengths
        tok = jnp.where(is_forced, forced_tok, tok)
        tok_lp = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        if sampling.greedy:  # the sampling distribution is a point mass
            tok_lpp = jnp.zeros_like(tok_lp)
        else:
            tok_lpp = jnp.take_along_axis(jax.nn.log_softmax(proc, axis=-1), tok[:, None], axis=-1)[:, 0]
        active = ~s.done
        tok = jnp.where(active, tok, pad_id)
        tokens = s.tokens.at[:, s.step].set(tok)
        lps = s.lp.at[:, s.step].set(jnp.where(active, tok_lp, 0.0))
        lpps = s.lp_proc.at[:, s.step].set(jnp.where(active, tok_lpp, 0.0))
        lengths = s.lengths + active.astype(jnp.int32)
        stop_state, hit = _advance_stops(s.stop_state, tok_bytes[tok], jnp.where(active, tok_len[tok], 0), stop_dfa, stop_accept)
        hit_eos = active & ~is_forced & jnp.any(tok[:, None] == eos[None, :], axis=-1)
        hit_str = active & ~is_forced & hit & ~hit_eos
        reason = jnp.where(hit_eos, STOP_EOS, jnp.where(hit_str, STOP_STRING, s.reason))
        done = s.done | hit_eos | hit_str
        # one decode step for every row; finished rows feed a pad that nobody attends to
        logits, cache = forward(
            params, tok[:, None], s.pos[:, None], cfg, segment_ids=active[:, None].astype(jnp.int32), cache=s.cache
        )
        return _State(
            step=s.step + 1,
            logits=logits[:, 0],
            cache=cache,
            pos=s.pos + active.astype(jnp.int32),
            done=done,
            reason=reason,
            lengths=lengths,
            tokens=tokens,
            lp=lps,
            lp_proc=lpps,
            stop_state=stop_state,
            key=key,
        )

    s = jax.lax.while_loop(cond, body, state)
    return SampleOutput(tokens=s.tokens, lengths=s.lengths, logprobs=s.lp, logprobs_processed=s.lp_proc, stop_reason=s.reason)


# ------------------------------------------------------------------------------------------- host wrapper
def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (>= minimum) so repeated calls reuse compiled programs."""
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    tokens: list[int]
    logprobs: list[float]
    logprobs_processed: list[float]
    stop_reason: str


class Sampler:
    """Tokenize, left-pad to buckets, call :func:`generate`, detokenize and trim at the stop string."""

    def __init__(self, params, cfg: LlamaConfig, tokenizer, *, eos_ids: Sequence[int] | None = None):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.eos_ids = tuple(int(i) for i in (eos_ids if eos_ids is not None else [tokenizer.eos_id]))
        self.tok_bytes, self.tok_len = token_byte_table(tokenizer, cfg.vocab_size)
        # Model rows past the tokenizer's vocabulary (padding) can never be decoded: never sample them.
        self.valid_vocab = int(tokenizer.vocab_size) if tokenizer.vocab_size < cfg.vocab_size else None

    def generate_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
        key=None,
        num_samples: int = 1,
        stop_strings: Sequence[str] = (),
        forced_prefix: Sequence[Sequence[int]] | None = None,
    ) -> SampleOutput:
        B = len(prompts)
        if B == 0:
            raise ValueError("no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token (e.g. the BOS token)")
        P = bucket(max(len(p) for p in prompts))
        N = bucket(max_new_tokens)
        if P + N > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({P}) + new tokens ({N}) exceed the model's max_seq_len {self.cfg.max_seq_len}")
        pad = self.tokenizer.pad_id
        toks = np.full((B, P), pad, np.int32)
        for i, p in enumerate(prompts):
            toks[i, P - len(p) :] = p
        lens = np.array([len(p) for p in prompts], np.int32)
        fp = forced_prefix or [[] for _ in prompts]
        F = bucket(max(1, max(len(f) for f in fp)), 1)
        ftoks = np.full((B, F), pad, np.int32)
        for i, f in enumerate(fp):
            ftoks[i, : len(f)] = f
        flens = np.array([len(f) for f in fp], np.int32)
        dfa, accept = build_stop_automata(stop_strings)
        key = jax.random.key(0) if key is None else key
        out = generate(
            self.params,
            toks,
            lens,
            key,
            ftoks,
            flens,
            dfa,
            accept,
            self.tok_bytes,
            self.tok_len,
            cfg=self.cfg,
            sampling=sampling,
            max_new_tokens=N,
            num_samples=num_samples,
            eos_ids=self.eos_ids,
            pad_id=pad,
            valid_vocab=self.valid_vocab,
        )
        out = fetch(out)  # host copies (in a multi-process run, gathered from every process)
        if N != max_new_tokens:  # trim the bucket back to what was asked for
            over = out.lengths > max_new_tokens
            out = SampleOutput(
                tokens=out.tokens[:, :max_new_tokens],
                lengths=np.minimum(out.lengths, max_new_tokens),
                logprobs=out.logprobs[:, :max_new_tokens],
                logprobs_processed=out.logprobs_processed[:, :max_new_tokens],
                stop_reason=np.where(over, STOP_LENGTH, out.stop_reason),
            )
        return out

    def complete(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        key=None,
        num_samples: int = 1,
        stop_strings: Sequence[str] = (),
    ) -> list[Completion]:
        ids = [self._encode_prompt(p) for p in prompts]
        out = self.generate_tokens(
            ids, max_new_tokens=max_new_tokens, sampling=sampling, key=key, num_samples=num_samples, stop_strings=stop_strings
        )
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


def trim_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut after the earliest-ending stop string (the stop string is kept)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return text[: min(ends)] if ends else text
