"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ra3_jax.errors import InputError


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, of which c are correct, passes)
    = 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (n={n} samples)")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean over tasks of pass@k; ``counts`` holds (n, c) per task."""
    vals = [pass_at_k(n, c, k) for n, c in counts]
    if not vals:
        raise ValueError("no tasks")
    return float(np.mean(vals))


def resolve_ks(ks: Sequence[int] | None, n_samples: int) -> tuple[int, ...]:
    """The pass@k values to report: ``ks``, each of which needs ``n_samples >= k`` (an error otherwise, not a
    silently shorter table); by default those of 1, 10, 100 that ``n_samples`` allows."""
    ks = tuple(ks) if ks else tuple(k for k in (1, 10, 100) if k <= n_samples)
    if not ks or min(ks) < 1:
        raise InputError(f"pass@k needs k >= 1 and n-samples >= 1 (k: {list(ks)}, n-samples: {n_samples})")
    if max(ks) > n_samples:
        k = max(ks)
        raise InputError(f"pass@{k} needs at least {k} samples per task, but n-samples is {n_samples}: raise it or drop k={k}")
    return ks
