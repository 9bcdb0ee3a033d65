"""Sampling methods for the in-graph sampler: small frozen (hashable) dataclasses, passed to the jitted
``generate`` as static arguments. ``sample(logits, key) -> (tokens, processed logits)``; ``greedy`` says whether
the sampling distribution is a point mass (its logprobs are then 0)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ra3_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Greedy:
    """Argmax decoding (the sampling distribution is a point mass)."""

    @property
    def greedy(self) -> bool:
        return True

    def sample(self, logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (tokens [...], processed logits = the logits unchanged)."""
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Sampling at a temperature > 0, optionally restricted to the top-k tokens and/or the top-p nucleus."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0 (got {self.temperature}); use Greedy() for argmax decoding")

    @property
    def greedy(self) -> bool:
        return False

    def process(self, logits: jax.Array) -> jax.Array:
        """Filtered, temperature-scaled logits ([..., V] float32); disallowed tokens get -inf."""
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
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32), x


SamplingMethod = Greedy | Temperature


def sampling_method(temperature: float, top_k: int = 0, top_p: float = 1.0) -> SamplingMethod:
    """``Greedy()`` at temperature 0, else ``Temperature(temperature, top_k, top_p)``."""
    if temperature == 0:
        return Greedy()
    return Temperature(temperature=temperature, top_k=top_k, top_p=top_p)
