"""Stop strings matched EXACTLY at the byte level in-graph: every sampled token's bytes are fed through a KMP
automaton per stop string, so a stop string is found whatever tokens spell it. Host side: the automata, the
token -> bytes table, and trimming a decoded completion after its stop string."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def advance_stops(states, tok_bytes, tok_len, dfa, accept):
    """In-graph: states [B, n]; tok_bytes [B, L]; tok_len [B] -> (new states, matched [B])."""
    n = dfa.shape[0]

    def step(j, st):
        byte = tok_bytes[:, j]  # [B]
        nxt = dfa[jnp.arange(n)[None, :], st, byte[:, None]]  # [B, n]
        return jnp.where((j < tok_len)[:, None], nxt, st)

    states = jax.lax.fori_loop(0, tok_bytes.shape[1], step, states)
    return states, jnp.any(states == accept[None, :], axis=-1)


def trim_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut after the earliest-ending stop string (the stop string is kept)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return text[: min(ends)] if ends else text
