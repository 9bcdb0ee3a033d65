"""Run untrusted programs (model completions + unit tests) in isolated, resource-limited processes.

Each job is its own process in a fresh temporary directory with a scrubbed environment: forked from a
pre-started runner (``_runner.py --serve``, one per worker thread; the default) or a fresh interpreter.
With isolation on (the default where the kernel allows it: root, or unprivileged user namespaces) the job runs
in its own PID namespace (under a waiting PID 1), with no network (an empty network namespace), a read-only filesystem except
its work directory and private tmpfs ``/tmp``, a fresh ``/proc`` and no capabilities. Limits: wall time (the
whole process tree is killed), CPU time, address space, file size, open files, processes, output bytes.

Without namespaces (``isolation="none"`` or ``"auto"`` on a kernel that refuses them) the rlimits, the scrubbed
environment, the fresh directory and the process-group kill still apply, but the network and the filesystem
are reachable: run such a machine's evaluations inside a container without network.

A verdict needs the runner's secret token line and exit status 0, so early exits never count as passes.
The threat model is programs written by a model, not programs crafted against this harness: a program that
inspects the runner's own memory (``gc``, frame objects) can read the token, and an object whose ``__eq__``
always returns True fools ``==`` based tests, as in every reference harness.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

RUNNER = Path(__file__).with_name("_runner.py")
_VERSION = "2"  # bump when the runner's semantics change (invalidates on-disk caches)


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock; the whole process tree is killed past it
    cpu_s: int | None = None  # CPU seconds (RLIMIT_CPU); default: the wall limit rounded up, plus one
    memory_mb: int = 2048  # address space (RLIMIT_AS)
    nproc: int = 16  # processes/threads the job may add
    fsize_mb: int = 16  # largest file it may write
    nofile: int = 64
    tmpfs_mb: int = 64  # size of its private /tmp
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


class SandboxError(RuntimeError):
    """The sandbox itself could not run a job (not a verdict on the program)."""


def _job_key(job: Job, limits: Limits, isolation: str) -> str:
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


def _pids_cgroup_base() -> Path | None:
    """A writable cgroup directory with the pids controller (v1 mount or v2 unified), or None.

    RLIMIT_NPROC does not bind processes of real uid 0, so as root a per-job pids cgroup is what caps a fork
    bomb. Without one (and as root) the job's process count is bounded only by time: its PID namespace takes
    every process down when the job ends."""
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        base = root / "ra3-sandbox"
        try:
            if root.name == "cgroup" and "pids" not in (root / "cgroup.controllers").read_text().split():
                continue
            base.mkdir(exist_ok=True)
            if root.name == "cgroup":  # v2: children of base need the controller enabled in base
                (base / "cgroup.subtree_control").write_text("+pids")
            probe = base / f"probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.mkdir()
            ok = (probe / "pids.max").exists()
            probe.rmdir()
            if ok:
                for stale in base.glob("job-*"):  # left by killed parents (job-<parent pid>-<token>)
                    try:
                        os.kill(int(stale.name.split("-")[1]), 0)
                        continue  # its parent lives (another sandbox on this machine): not ours to remove
                    except (ValueError, IndexError, ProcessLookupError):
                        pass
                    except PermissionError:
                        continue
                    try:
                        stale.rmdir()
                    except OSError:
                        pass
                return base
        except OSError:
            continue
    return None


def _remove_cgroup(path: Path) -> None:
    for _ in range(50):  # processes of a killed namespace take a moment to be reaped
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


class _ForkServer:
    """A pre-started ``_runner.py --serve`` process; jobs are forked from it (see ``_runner.serve``)."""

    def __init__(self, python: str, preload: tuple, cwd: str):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [python, "-I", "-B", str(RUNNER), "--serve", str(child.fileno()), *preload],
                pass_fds=(child.fileno(),),
                cwd=cwd,
                env=_scrubbed_env(cwd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            child.close()
        self.sock = parent
        weakref.finalize(self, _ForkServer._stop, self.sock, self.proc)

    def recv_int(self, timeout: float) -> int:
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            buf = b""
            while len(buf) < 8:
                chunk = self.sock.recv(8 - len(buf))
                if not chunk:
                    raise EOFError("the fork server closed its socket")
                buf += chunk
        except TimeoutError:
            raise TimeoutError from None
        finally:
            self.sock.settimeout(None)
        return struct.unpack("<q", buf)[0]

    @staticmethod
    def _stop(sock, proc):
        sock.close()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self):
        _ForkServer._stop(self.sock, self.proc)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(out_fd: int, err_fd: int, pid: int, wait, limits: Limits):
    """Reads the job's stdout/stderr until both close, the wall deadline, or the output cap; kills the job's
    process group when needed. -> (stdout, stderr, why or None, exit status)."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    deadline = time.monotonic() + limits.timeout_s
    why = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
            if sum(len(b) for b in bufs.values()) > limits.output_bytes:
                why = "output_limit"
                break
    if why:
        _kill_group(pid)
    try:
        rc = wait(max(1.0, deadline - time.monotonic()) if not why else 10)
    except TimeoutError:  # stdout closed but the job lingers past the deadline
        why = why or "timeout"
        _kill_group(pid)
        rc = wait(10)
    if not why:  # nothing of the job may outlive it (non-isolated mode: its process group)
        _kill_group(pid)
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), why, rc


def _scrubbed_env(home: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": "/tmp",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


class Sandbox:
    """Runs jobs; ``run_many`` runs them on a pool of ``workers`` concurrent processes.

    isolation: "auto" (namespaces when available, checked once), "required" (error without them), "none".
    fork_server: jobs fork from a pre-started runner per worker thread (``preload`` modules already imported)
    instead of starting an interpreter each; the isolation and limits are the same either way.
    """

    def __init__(
        self,
        limits: Limits = Limits(),
        *,
        workers: int = 2,
        isolation: str = "auto",
        cache: ResultCache | None = None,
        base_dir: str | os.PathLike | None = None,
        python: str = sys.executable,
        fork_server: bool = True,
        preload: Sequence[str] = ("numpy",),
    ):
        if isolation not in ("auto", "required", "none"):
            raise ValueError(f"isolation must be auto|required|none, got {isolation!r}")
        self.limits, self.workers, self.python = limits, max(1, int(workers)), python
        self.cache = cache if cache is not None else ResultCache()
        self.base_dir = Path(base_dir or tempfile.gettempdir())
        self.isolation = isolation
        self.fork_server, self.preload = bool(fork_server), tuple(preload)
        self._local = threading.local()
        self._servers: list[_ForkServer] = []
        self._servers_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cgroup_base = _pids_cgroup_base() if isolation != "none" else None
        if isolation != "none":
            probe = self._execute(Job("pass"), Limits(timeout_s=30), isolation)
            if isolation == "required" and not probe.isolated:
                raise SandboxError(f"sandbox isolation required but unavailable: {probe.stderr.strip()}")
            self.isolation = "required" if probe.isolated else "none"
            if not probe.passed:
                raise SandboxError(f"sandbox self-test failed ({probe.status}): {probe.detail} {probe.stderr}")

    @property
    def process_cap(self) -> str:
        """How the per-job process limit is enforced: "cgroup", "rlimit" (non-root) or "none"."""
        if self._cgroup_base:
            return "cgroup"
        return "rlimit" if os.getuid() != 0 else "none"

    @property
    def isolated(self) -> bool:
        return self.isolation == "required"

    def run(self, job: Job | str, test: str = "", limits: Limits | None = None) -> ExecResult:
        job = Job(job, test) if isinstance(job, str) else job
        limits = limits or self.limits
        key = _job_key(job, limits, self.isolation)
        if (hit := self.cache.get(key)) is not None:
            return hit
        result = self._execute(job, limits, self.isolation)
        self.cache.put(key, result)
        return result

    def run_many(
        self, jobs: Sequence[Job], limits: Limits | Sequence[Limits | None] | None = None, progress: str | None = None
    ) -> list[ExecResult]:
        """Runs ``jobs`` concurrently (identical jobs under identical limits run once); results in input order.

        ``limits``: one ``Limits`` for every job, or one per job (None: the sandbox's)."""
        if limits is None or isinstance(limits, Limits):
            per_job = [limits or self.limits] * len(jobs)
        else:
            per_job = [lim or self.limits for lim in limits]
            if len(per_job) != len(jobs):
                raise ValueError(f"run_many: {len(jobs)} jobs but {len(per_job)} limits")
        keys = [_job_key(j, lim, self.isolation) for j, lim in zip(jobs, per_job)]
        unique = {k: (j, lim) for k, j, lim in zip(keys, jobs, per_job)}
        done: dict[str, ExecResult] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(unique), desc=progress, unit="prog", leave=False)
        ex = self._executor()
        futs = {ex.submit(self.run, j, "", lim): k for k, (j, lim) in unique.items()}
        for fut in concurrent.futures.as_completed(futs):
            done[futs[fut]] = fut.result()
            if bar:
                bar.update()
        if bar:
            bar.close()
        return [done[k] for k in keys]

    # -- one process ---------------------------------------------------------------------------------------
    def _execute(self, job: Job, limits: Limits, isolation: str) -> ExecResult:
        token = secrets.token_hex(16)
        workdir = tempfile.mkdtemp(prefix="ra3-sbx-", dir=self.base_dir)
        t0 = time.monotonic()
        cgroup = None
        try:
            if self._cgroup_base:
                cgroup = self._cgroup_base / f"job-{os.getpid()}-{token[:16]}"
                cgroup.mkdir()
                (cgroup / "pids.max").write_text(str(limits.nproc + 3))  # + the runner, PID 1 and the job
            os.chmod(workdir, 0o700)
            spec = {
                "program": job.program,
                "test": job.test,
                "limits": limits.resolved(),
                "workdir": workdir,
                "isolate": isolation if isolation != "none" else False,
                "token": token,
                "cgroup": str(cgroup) if cgroup else None,
            }
            if self.fork_server:
                rc, out, err, why = self._via_server(spec, limits)
            else:
                rc, out, err, why = self._via_exec(spec, limits, workdir)
            return self._verdict(token, rc, out, err, why, time.monotonic() - t0, limits)
        except OSError as e:
            return ExecResult(False, "error", f"sandbox could not start the job: {e}", None, "", "", time.monotonic() - t0, False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if cgroup:
                _remove_cgroup(cgroup)

    def _via_exec(self, spec: dict, limits: Limits, workdir: str):
        """A fresh interpreter for the job (fork_server=False)."""
        job_path = os.path.join(workdir, ".job.json")
        with open(job_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.Popen(
            [self.python, "-I", "-B", str(RUNNER), job_path],
            cwd=workdir,
            env=_scrubbed_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

        def wait(timeout):
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError from None

        try:
            out, err, why, rc = _collect(proc.stdout.fileno(), proc.stderr.fileno(), proc.pid, wait, limits)
        finally:
            proc.stdout.close()
            proc.stderr.close()
        return rc, out, err, why

    def _via_server(self, spec: dict, limits: Limits):
        """The job forked from this worker thread's pre-started runner (one round trip, no interpreter start)."""
        server = self._server()
        payload = json.dumps(spec).encode()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            try:
                socket.send_fds(server.sock, [struct.pack("<Q", len(payload))], [out_w, err_w])
                server.sock.sendall(payload)
            finally:
                os.close(out_w)
                os.close(err_w)
            pid = server.recv_int(timeout=30)

            def wait(timeout):
                return server.recv_int(timeout=timeout)

            out, err, why, rc = _collect(out_r, err_r, pid, wait, limits)
            return rc, out, err, why
        except (OSError, EOFError) as e:
            server.close()  # a broken server is replaced on the next job
            self._local.server = None
            raise OSError(f"fork server failed: {e}") from None
        finally:
            os.close(out_r)
            os.close(err_r)

    def _server(self) -> _ForkServer:
        server = getattr(self._local, "server", None)
        if server is None or server.proc.poll() is not None:
            server = _ForkServer(self.python, self.preload, str(self.base_dir))
            self._local.server = server
            with self._servers_lock:
                self._servers.append(server)
        return server

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # One long-lived pool: its threads keep their fork servers from batch to batch.
        with self._servers_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
            return self._pool

    def close(self) -> None:
        """Stops the worker threads and the fork servers (both also stop when this process exits)."""
        with self._servers_lock:  # the pool is shut down outside the lock: its threads take it to add servers
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._servers_lock:
            servers, self._servers = self._servers, []
        for s in servers:
            s.close()

    @staticmethod
    def _verdict(token, rc, out, err, why, wall, limits) -> ExecResult:
        text = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        isolated = f"{token}:isolated=1" in text
        status_line = None
        lines = []
        for line in text.splitlines():
            if line.startswith(token + ":"):
                tag = line[len(token) + 1 :]
                if not tag.startswith("isolated="):
                    status_line = tag
                continue
            lines.append(line)
        stdout = "\n".join(lines).strip("\n")
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if why == "timeout":
            status, detail = "timeout", f"wall time limit {limits.timeout_s:g}s exceeded"
        elif why == "output_limit":
            status, detail = "output_limit", f"output exceeded {limits.output_bytes} bytes"
        elif rc == 97:
            status, detail = "error", "isolation required but unavailable"
        elif rc == 98:
            status, detail = "error", tail or "sandbox setup failed"
        elif rc is not None and rc < 0 or (rc or 0) > 128:
            sig = -rc if rc < 0 else rc - 128
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            status = "cpu_limit" if sig == signal.SIGXCPU else "killed"
            detail = f"killed by {name}"
        elif status_line == "ok" and rc == 0:
            status, detail = "passed", ""
        elif status_line is None:
            status, detail = "no_verdict", f"exited with status {rc} before the tests finished"
        elif status_line.startswith("exit:"):
            status, detail = "failed", f"called exit({status_line[5:]}) before the tests finished"
        else:
            status, detail = "failed", tail or status_line
        if status == "failed" and "MemoryError" in tail:
            status = "memory"
        return ExecResult(status == "passed", status, detail, rc, stdout[:4096], stderr[-4096:], wall, isolated)
