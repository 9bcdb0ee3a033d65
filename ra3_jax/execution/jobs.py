"""What the sandbox runs and returns: a job, its limits, its result, and the cache of results by job."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

from ra3_jax.errors import RA3Error

_VERSION = "3"  # bump when the runner's semantics change (invalidates on-disk caches)


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the whole process tree is killed past it
    cpu_s: int | None = None  # CPU seconds (RLIMIT_CPU); default: the wall limit rounded up, plus one
    memory_mb: int = 2048  # address space (RLIMIT_AS)
    nproc: int = 16  # processes/threads the job may add
    fsize_mb: int = 16  # largest file it may write
    nofile: int = 64
    tmpfs_mb: int = 64  # size of each of its private tmpfs mounts: /tmp, /dev/shm and its work dir (HOME, cwd)
    output_bytes: int = 1 << 20  # stdout + stderr; past it the job is killed

    def resolved(self) -> dict:
        d = dataclasses.asdict(self)
        d["cpu_s"] = self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 1
        return d


@dataclasses.dataclass(frozen=True)
class Job:
    program: str  # runs first (solution, imports, setup)
    test: str = ""  # runs second, in its own namespace with pristine builtins (asserts, check(...))


@dataclasses.dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | cpu_limit | memory | output_limit | killed | no_verdict | error
    detail: str  # one line: the exception, exit code, signal
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolated: bool
    cached: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class SandboxError(RA3Error, RuntimeError):
    """The sandbox itself could not run a job (not a verdict on the program)."""


def job_key(job: Job, limits: Limits, isolation: str) -> str:
    blob = json.dumps([_VERSION, job.program, job.test, limits.resolved(), isolation], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    """Results by hash(program, test, limits): in memory, and on disk when ``directory`` is given.

    Timeouts and sandbox errors are not cached (they depend on load)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._mem: dict[str, ExecResult] = {}
        self._lock = threading.Lock()
        self._dir = Path(directory) if directory else None
        if self._dir:
            self._dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> ExecResult | None:
        with self._lock:
            hit = self._mem.get(key)
        if hit is None and self._dir and (p := self._dir / key[:2] / f"{key}.json").exists():
            try:
                hit = ExecResult(**json.loads(p.read_text()))
            except (ValueError, TypeError):
                return None  # a corrupt entry is a miss; it is overwritten on the next put
            with self._lock:
                self._mem[key] = hit
        return dataclasses.replace(hit, cached=True) if hit else None

    def put(self, key: str, result: ExecResult) -> None:
        if result.status in ("timeout", "error"):
            return
        with self._lock:
            self._mem[key] = result
        if self._dir:
            d = self._dir / key[:2]
            d.mkdir(exist_ok=True)
            tmp = d / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(json.dumps(result.to_json()))
            os.replace(tmp, d / f"{key}.json")
