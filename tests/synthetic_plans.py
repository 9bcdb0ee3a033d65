"""A synthetic corpus where a hidden plan generates the code (RA3's acceptance test).

Each program is one function. Its name reveals the plan's family (4 families); the plan is uniform over the
family's 8 sub-plans. The body is a single `return pipeline(x, [...])` whose 8 list items are fixed balanced
random functions of the plan. Without the plan, each item's probability is a posterior predictive over the
sub-plans still consistent with the items so far (fractional, a function of many earlier tokens); a rationale
that names the plan (`# thought: plan <word>`) makes every item a deterministic single-key lookup. The plan is
uniform within its family, so a rationale costs exactly what the code's hidden information costs (log 8 nats):
any gain comes from easier learning, not from free information.
"""

from __future__ import annotations

import os

import numpy as np

FAMILIES = ["red", "green", "blue", "gold"]
PLANS = [
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "grove",
    "haze",
    "iris",
    "jade",
    "kelp",
    "lotus",
    "maple",
    "nova",
    "onyx",
    "pearl",
    "quartz",
    "raven",
    "sage",
    "tulip",
    "umber",
    "violet",
    "willow",
    "xenon",
    "yarrow",
    "zinc",
    "acorn",
    "birch",
    "coral",
    "dune",
    "elm",
    "fern",
]
N_SUB = 8  # plans per family
OPS = [
    ("scale", "shift"),
    ("clip", "wrap"),
    ("sort", "flip"),
    ("sum", "max"),
    ("absv", "sqr"),
    ("logv", "expv"),
    ("minv", "mean"),
    ("inc", "dec"),
]


def _tables(seed: int = 1234) -> np.ndarray:
    """bits[p, i] for the 32 plans and 8 items: within each family, every item is a balanced random function of
    the sub-plan, and the 8 items identify the sub-plan (the code determines its plan)."""
    rng = np.random.default_rng(seed)
    bits = np.zeros((len(FAMILIES) * N_SUB, 8), np.int64)
    for f in range(len(FAMILIES)):
        while True:
            block = np.stack([rng.permutation([0] * (N_SUB // 2) + [1] * (N_SUB // 2)) for _ in range(8)], axis=1)
            if len({tuple(r) for r in block}) == N_SUB:
                break
        bits[f * N_SUB : (f + 1) * N_SUB] = block
    return bits


BITS = _tables()


def program(plan: int, with_rationale: bool) -> str:
    fam = plan // N_SUB
    items = ", ".join(OPS[i][BITS[plan, i]] for i in range(8))
    lines = [f"def f_{FAMILIES[fam]}(x):\n"]
    if with_rationale:
        lines.append(f"    # thought: plan {PLANS[plan]}\n")
    lines.append(f"    return pipeline(x, [{items}])\n")
    return "".join(lines)


def write_corpus(directory: str, n: int, *, rationale_fraction: float, seed: int) -> list[str]:
    """n files, one program each; returns their texts."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = []
    for j in range(n):
        text = program(int(rng.integers(len(PLANS))), bool(rng.random() < rationale_fraction))
        with open(os.path.join(directory, f"prog_{j:05d}.py"), "w", encoding="utf-8") as f:
            f.write(text)
        texts.append(text)
    return texts
