"""The chains benchmark (``../shared/design/CHAINS.md``, followed to the character): code whose one constant is
the result of a k-step mod-10 computation stated in the docstring.

A task: start s in 0..9, k ops ``+d`` / ``-d`` / ``*d`` (d in 1..9), v_i = op_i(v_{i-1}) % 10, K = v_k.
Prompt ``def f(x):\\n    \"\"\"start S; ops OP1 ... OPk (mod 10)\"\"\"\\n``; expert solution
``    return (x + K) % 10\\n``; worked solution: ``    # thought: 4+7=1 1*3=3 ...\\n`` before it.

Splits, all deterministic from ``chains.seed``: ``eval`` (``eval_per_k`` distinct tasks per k, generated first),
then ``pretrain`` (a ``thought_fraction`` of the programs carry the worked thought), ``midtrain`` (no thoughts),
``rlvr`` (tasks), and a validation split of each corpus. No (s, ops) of an eval task appears in any other split
(:func:`check_disjoint`, by hashing). :class:`Chains` is the tensorflow-datasets builder of all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds

from ra3_jax.errors import InputError

OPS = ("+", "-", "*")
MARKER = "# thought:"
FORCED_PREFIXES = {"free": "", "forced": "    # thought:", "banned": "    return (x +"}
CORPORA = ("pretrain", "midtrain")
SPLITS = ("pretrain", "pretrain_validation", "midtrain", "midtrain_validation", "rlvr", "eval")


@dataclasses.dataclass(frozen=True)
class Chain:
    s: int
    ops: tuple[tuple[str, int], ...]

    @property
    def k(self) -> int:
        return len(self.ops)

    def values(self) -> list[int]:
        v = [self.s]
        for op, d in self.ops:
            a = v[-1]
            v.append((a + d if op == "+" else a - d if op == "-" else a * d) % 10)
        return v

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def key(self) -> str:
        """The (s, ops) identity, hashed for the disjointness check."""
        spec = f"{self.s};" + " ".join(f"{op}{d}" for op, d in self.ops)
        return hashlib.sha256(spec.encode()).hexdigest()[:20]

    def prompt(self) -> str:
        ops = " ".join(f"{op}{d}" for op, d in self.ops)
        return f'def f(x):\n    """start {self.s}; ops {ops} (mod 10)"""\n'

    def thought(self) -> str:
        v = self.values()
        return " ".join(f"{v[i]}{op}{d}={v[i + 1]}" for i, (op, d) in enumerate(self.ops))

    def expert_solution(self) -> str:
        return f"    return (x + {self.answer}) % 10\n"

    def worked_solution(self) -> str:
        return f"    {MARKER} {self.thought()}\n" + self.expert_solution()

    def test(self) -> str:
        return f"def check(candidate):\n    for x in range(10):\n        assert candidate(x) == (x + {self.answer}) % 10\n"

    def task(self, task_id: str) -> dict:
        """HumanEval fields (task_id, prompt, canonical_solution, test, entry_point) plus k."""
        return {
            "task_id": task_id,
            "prompt": self.prompt(),
            "canonical_solution": self.expert_solution(),
            "test": self.test(),
            "entry_point": "f",
            "k": self.k,
        }


def parse_prompt(prompt: str) -> Chain:
    """The chain a prompt states (inverse of :meth:`Chain.prompt`)."""
    try:
        doc = prompt.split('"""')[1]
        start, ops = doc.split(";")
        s = int(start.split()[1])
        toks = ops.split()[1:-2]
        return Chain(s, tuple((t[0], int(t[1:])) for t in toks))
    except (IndexError, ValueError):
        raise InputError(f"not a chains prompt: {prompt[:80]!r}") from None


@dataclasses.dataclass(frozen=True)
class ChainsSpec:
    """Sizes and seed of every split (the ``chains`` config section carries the same fields)."""

    seed: int = 0
    k_max: int = 6
    eval_per_k: int = 100
    thought_fraction: float = 0.4
    pretrain_docs: int = 60000
    midtrain_docs: int = 4096
    validation_docs: int = 512
    rlvr_tasks: int = 2048

    @classmethod
    def of(cls, section) -> ChainsSpec:
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def random_chain(rng: np.random.Generator, k: int) -> Chain:
    s = int(rng.integers(10))
    ops = tuple((OPS[int(rng.integers(3))], int(rng.integers(1, 10))) for _ in range(k))
    return Chain(s, ops)


def eval_chains(spec: ChainsSpec) -> list[Chain]:
    """``eval_per_k`` distinct chains for each k in 1..k_max (k = 1 has only 270 distinct chains)."""
    rng = np.random.default_rng([spec.seed, 1000])
    out = []
    for k in range(1, spec.k_max + 1):
        seen: dict[str, Chain] = {}
        if spec.eval_per_k > 10 * 27**k // 2:
            raise InputError(f"chains.eval_per_k={spec.eval_per_k} leaves too few k={k} chains for training")
        while len(seen) < spec.eval_per_k:
            c = random_chain(rng, k)
            seen.setdefault(c.key, c)
        out.extend(seen.values())
    return out


def sample_chains(spec: ChainsSpec, n: int, stream: int, banned: set[str]) -> list[Chain]:
    """``n`` chains, k uniform in 1..k_max, none of whose keys is in ``banned``."""
    rng = np.random.default_rng([spec.seed, stream])
    out = []
    while len(out) < n:
        c = random_chain(rng, int(rng.integers(1, spec.k_max + 1)))
        if c.key not in banned:
            out.append(c)
    return out


def generate_splits(spec: ChainsSpec) -> dict[str, list[dict]]:
    """Every split as rows: corpora {text, path, k, thought}, task splits HumanEval fields + k."""
    ev = eval_chains(spec)
    banned = {c.key for c in ev}
    rows: dict[str, list[dict]] = {"eval": [c.task(f"chains/k{c.k}/{i:04d}") for i, c in enumerate(ev)]}
    sizes = {"pretrain": spec.pretrain_docs, "midtrain": spec.midtrain_docs}
    for j, corpus in enumerate(CORPORA):
        for suffix, n, stream in (("", sizes[corpus], 2 * j), ("_validation", spec.validation_docs, 2 * j + 1)):
            chains = sample_chains(spec, n, stream, banned)
            think = np.random.default_rng([spec.seed, 100 + 2 * j + (suffix != "")]).random(n) < spec.thought_fraction
            think &= corpus == "pretrain"
            rows[corpus + suffix] = [
                {
                    "text": c.prompt() + (c.worked_solution() if t else c.expert_solution()),
                    "path": f"chains/{corpus}{suffix}/{i:06d}.py",
                    "k": c.k,
                    "thought": bool(t),
                }
                for i, (c, t) in enumerate(zip(chains, think))
            ]
    rows["rlvr"] = [c.task(f"chains-rlvr/{i:05d}") for i, c in enumerate(sample_chains(spec, spec.rlvr_tasks, 10, banned))]
    check_disjoint(rows)
    return rows


def row_key(row: dict) -> str:
    return parse_prompt(row.get("prompt") or row["text"]).key


def check_disjoint(rows: dict[str, list[dict]]) -> None:
    """No (s, ops) of an eval task in any other split (raises with the first offender)."""
    ev = {row_key(r) for r in rows["eval"]}
    for name, split in rows.items():
        if name == "eval":
            continue
        for r in split:
            if row_key(r) in ev:
                raise InputError(f"chains: {r.get('path') or r['task_id']} repeats an eval task's (start, ops)")


class ChainsConfig(tfds.core.BuilderConfig):
    def __init__(self, spec: ChainsSpec, **kw):
        super().__init__(name=f"chains_{spec.digest}", version="1.0.0", **kw)
        self.spec = spec


_FEATURES = ("text", "path", "task_id", "prompt", "canonical_solution", "test", "entry_point")


class Chains(tfds.core.GeneratorBasedBuilder):
    """All chains splits (CHAINS.md) as one dataset; the config name is a digest of the spec."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        feats = {k: tfds.features.Text() for k in _FEATURES}
        feats |= {"k": tfds.features.Scalar(np.int32), "thought": tfds.features.Scalar(np.bool_)}
        return tfds.core.DatasetInfo(builder=self, description="CHAINS.md benchmark", features=tfds.features.FeaturesDict(feats))

    def _split_generators(self, dl_manager):
        rows = generate_splits(self.builder_config.spec)
        return {name: self._generate_examples(name, rows[name]) for name in SPLITS}

    def _generate_examples(self, name, rows):
        for i, r in enumerate(rows):
            ex = {k: str(r.get(k, "")) for k in _FEATURES}
            if not ex["text"]:
                ex["text"] = r["prompt"] + r["canonical_solution"]
            if not ex["path"]:
                ex["path"] = r["task_id"]
            yield f"{name}-{i}", {**ex, "k": int(r["k"]), "thought": bool(r.get("thought", False))}


def build_chains(spec: ChainsSpec, tfds_dir: str) -> dict:
    """Prepare (once, cached under ``tfds_dir``) and return {split: array-record data source}."""
    import os

    from ra3_jax.data.corpus import tfds_build

    data_dir = os.path.expanduser(tfds_dir)
    cfg = ChainsConfig(spec)
    with tfds_build(data_dir, f"chains-{cfg.name}"):
        builder = Chains(config=cfg, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    return builder.as_data_source()


def corpus_sources(spec: ChainsSpec, tfds_dir: str, corpus: str) -> dict:
    """{'train', 'validation'} sources of the chains ``pretrain`` or ``midtrain`` corpus (data.source_dirs
    ``[chains:pretrain]`` / ``[chains:midtrain]``)."""
    if corpus not in CORPORA:
        raise InputError(f"unknown chains corpus {corpus!r}; use chains:pretrain or chains:midtrain")
    src = build_chains(spec, tfds_dir)
    return {"train": src[corpus], "validation": src[corpus + "_validation"]}


def task_rows(spec: ChainsSpec, tfds_dir: str, split: str) -> list[dict]:
    """The HumanEval-format tasks of the ``eval`` or ``rlvr`` split (task_id, prompt, canonical_solution, test,
    entry_point, k)."""
    if split not in ("eval", "rlvr"):
        raise InputError(f"chains tasks come from split eval or rlvr, not {split!r}")
    src = build_chains(spec, tfds_dir)[split]
    out = []
    for i in range(len(src)):
        ex = src[i]
        row = {k: (ex[k].decode("utf-8") if isinstance(ex[k], bytes) else ex[k]) for k in _FEATURES[2:]}
        out.append({**row, "k": int(ex["k"])})
    return sorted(out, key=lambda t: t["task_id"])  # the generator's order (tfds stores by key hash)


def export_jsonl(rows: list[dict], path: str) -> None:
    import os

    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
