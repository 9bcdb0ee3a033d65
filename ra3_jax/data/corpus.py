"""Code corpus from local source trees as a tensorflow-datasets builder (ArrayRecord shards).

Default source: the running interpreter's standard library, test packages excluded. Files are split into
train/validation deterministically by a hash of their path relative to the source root, so adding files never
moves an existing file between splits. The builder config name is a digest of the file list (paths, sizes,
mtimes) and options, so a changed tree builds a new version instead of reusing a stale one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import glob
import hashlib
import io
import logging
import os
import sysconfig
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from ra3_jax.errors import RA3Error

TEST_DIRS = {"test", "tests", "idle_test", "testing", "unittest_tests"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"}


class CorpusError(RA3Error, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SourceFile:
    root: str
    relpath: str

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.relpath)


def resolve_source_dir(d: str) -> str:
    if d == "stdlib":
        return sysconfig.get_paths()["stdlib"]
    return os.path.abspath(os.path.expanduser(d))


def _is_test_path(rel: str) -> bool:
    parts = Path(rel).parts
    name = parts[-1]
    return any(p in TEST_DIRS for p in parts[:-1]) or name.startswith("test_") or name.endswith("_test.py")


def list_source_files(source_dirs, include_glob="*.py", exclude_tests=True, max_files=0) -> list[SourceFile]:
    files: list[SourceFile] = []
    for d in source_dirs:
        root = resolve_source_dir(d)
        if not os.path.isdir(root):
            raise CorpusError(f"corpus source directory not found: {root} (data.source_dirs)")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(x for x in dirnames if x not in SKIP_DIRS and not x.startswith("."))
            for fn in sorted(filenames):
                if not fnmatch.fnmatch(fn, include_glob):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), root)
                if exclude_tests and _is_test_path(rel):
                    continue
                files.append(SourceFile(root, rel))
    if max_files:
        files = files[:max_files]
    if not files:
        raise CorpusError(
            f"empty corpus: no files matching {include_glob!r} under {list(source_dirs)}"
            + (" (test files excluded; set data.exclude_tests=false to include them)" if exclude_tests else "")
        )
    return files


def split_of(relpath: str, validation_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "validation" if h < validation_fraction else "train"


def read_source(f: SourceFile, skip_non_utf8: bool) -> str | None:
    try:
        with open(f.path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {f.path}: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if skip_non_utf8:
            return None
        raise CorpusError(
            f"corpus file is not valid UTF-8: {f.path} (byte {e.start}: {e.reason}). Convert it to UTF-8, "
            "remove it from data.source_dirs, or set data.skip_non_utf8=true to skip such files."
        ) from None


class CodeCorpusConfig(tfds.core.BuilderConfig):
    def __init__(self, *, files: list[SourceFile], validation_fraction: float, skip_non_utf8: bool, **kw):
        digest = hashlib.sha256()
        for f in files:
            st = os.stat(f.path)
            digest.update(f"{f.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        digest.update(f"{validation_fraction}|{skip_non_utf8}".encode())
        super().__init__(name="src_" + digest.hexdigest()[:16], version="1.0.0", **kw)
        self.files = files
        self.validation_fraction = validation_fraction
        self.skip_non_utf8 = skip_non_utf8


class CodeCorpus(tfds.core.GeneratorBasedBuilder):
    """Source files as examples {text, path}; splits train/validation by path hash."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Source files from local trees (ra3_jax code corpus).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        by_split = {"train": [], "validation": []}
        for f in self.builder_config.files:
            by_split[split_of(f.relpath, self.builder_config.validation_fraction)].append(f)
        return {name: self._generate_examples(files) for name, files in by_split.items() if files}

    def _generate_examples(self, files):
        for f in files:
            yield f.path, {"text": read_source(f, self.builder_config.skip_non_utf8), "path": f.relpath}


@contextlib.contextmanager
def tfds_lock(data_dir: str, key: str):
    """Exclusive lock while a tfds dataset is built (several processes of one run, or parallel test workers,
    may build the same dataset into one data_dir; the first builds it, the others then read it)."""
    os.makedirs(data_dir, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    with open(os.path.join(data_dir, f".{safe}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def tfds_build(data_dir: str, key: str):
    """Around a tfds builder's construction and ``download_and_prepare``: ``tfds_lock``, and quiet: no progress
    bar, no "Downloading and preparing dataset" print for local files, no absl INFO lines, and no empty
    ``tmp*tfds`` dir left in the temp dir (tfds' DatasetInfo makes one per new builder to look on GCS)."""
    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        with tfds_lock(data_dir, key), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for d in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only empty dirs go


def build_corpus(data_cfg, chains=None) -> dict:
    """Prepare (once, cached under data.tfds_dir) and return {'train': source, 'validation': source}.
    ``data.source_dirs: [chains:pretrain]`` / ``[chains:midtrain]``: the chains corpora of the ``chains`` section."""
    if any(str(d).startswith("chains:") for d in data_cfg.source_dirs):
        return _chains_corpus(data_cfg, chains)
    listed = list_source_files(data_cfg.source_dirs, data_cfg.include_glob, data_cfg.exclude_tests, data_cfg.max_files)
    # Validate every file up front (clear error on non-UTF-8) and drop empty ones, so the builder only sees
    # documents it can write and an all-empty tree is reported as such.
    files = [f for f in listed if (t := read_source(f, data_cfg.skip_non_utf8)) is not None and t.strip()]
    if not files:
        raise CorpusError(
            f"empty corpus: the {len(listed)} source files under {list(data_cfg.source_dirs)} hold no non-empty UTF-8 text"
        )
    config = CodeCorpusConfig(files=files, validation_fraction=data_cfg.validation_fraction, skip_non_utf8=data_cfg.skip_non_utf8)
    data_dir = os.path.expanduser(data_cfg.tfds_dir)
    with tfds_build(data_dir, f"code_corpus-{config.name}"):
        builder = CodeCorpus(config=config, data_dir=data_dir, file_format="array_record")
        try:
            builder.download_and_prepare()
        except UnicodeDecodeError as e:  # pragma: no cover - read_source converts these
            raise CorpusError(str(e)) from None
    sources = builder.as_data_source()
    if "train" not in sources:
        raise CorpusError(f"empty corpus: all {len(files)} files fell into the validation split; lower data.validation_fraction")
    return {"train": sources["train"], "validation": sources.get("validation")}


def _chains_corpus(data_cfg, chains) -> dict:
    from ra3_jax.data.chains import ChainsSpec, corpus_sources

    if len(data_cfg.source_dirs) != 1 or chains is None:
        raise CorpusError(
            "a chains corpus is the only source of its run: data.source_dirs=[chains:pretrain] or [chains:midtrain]"
        )
    return corpus_sources(ChainsSpec.of(chains), data_cfg.tfds_dir, str(data_cfg.source_dirs[0]).split(":", 1)[1])
