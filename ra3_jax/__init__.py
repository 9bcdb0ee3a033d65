"""ra3_jax: RA3 mid-training (Reasoning as Action Abstractions), RLVR and RLPT in JAX."""

__version__ = "0.1.0"


def enable_compilation_cache(path: str | None = None) -> None:
    """Turn on JAX's persistent compilation cache (default ~/.cache/ra3_jax/jax_cache, or $RA3_JAX_CACHE)."""
    import os

    import jax

    path = path or os.environ.get("RA3_JAX_CACHE") or os.path.expanduser("~/.cache/ra3_jax/jax_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
