"""Run untrusted programs (model completions + unit tests) in isolated, resource-limited processes.

Each job is its own process in a fresh temporary directory with a scrubbed environment: forked from a
pre-started runner (``_runner.py --serve``, one per worker thread; the default) or a fresh interpreter.
With isolation on (the default where the kernel allows it: root, or unprivileged user namespaces) the job runs
in its own PID namespace (under a waiting PID 1), with no network (an empty network namespace), as an
unprivileged user (uid/gid 65534 "nobody" under a root parent) without capabilities, in its own root
filesystem: read-only ``/usr`` and interpreter prefixes (stdlib, site-packages), a minimal generated ``/etc``,
``/dev/null`` and friends, a fresh ``/proc``, and private writable tmpfs mounts on ``/tmp`` and its work
directory (its ``HOME`` and cwd, at the same path as outside); nothing else of the host is there (see
``_jail.py``). Limits: wall time (the whole process tree is killed), CPU time, address space, file size, open
files, processes, output bytes.

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
import json
import os
import secrets
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ra3_jax.execution.isolation import make_job_cgroup, pids_cgroup_base, remove_cgroup
from ra3_jax.execution.jobs import ExecResult, Job, Limits, ResultCache, SandboxError, job_key
from ra3_jax.execution.process import ForkServer, collect, run_fresh, verdict

__all__ = ["ExecResult", "Job", "Limits", "ResultCache", "Sandbox", "SandboxError"]


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
        self._servers: list[ForkServer] = []
        self._servers_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cgroup_base = pids_cgroup_base() if isolation != "none" else None
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
        key = job_key(job, limits, self.isolation)
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
        keys = [job_key(j, lim, self.isolation) for j, lim in zip(jobs, per_job)]
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
                cgroup = make_job_cgroup(self._cgroup_base, token, limits.nproc)
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
                rc, out, err, why = run_fresh(self.python, spec, limits, workdir)
            return verdict(token, rc, out, err, why, time.monotonic() - t0, limits)
        except OSError as e:
            return ExecResult(False, "error", f"sandbox could not start the job: {e}", None, "", "", time.monotonic() - t0, False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if cgroup:
                remove_cgroup(cgroup)

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

            out, err, why, rc = collect(out_r, err_r, pid, wait, limits)
            return rc, out, err, why
        except (OSError, EOFError) as e:
            server.close()  # a broken server is replaced on the next job
            self._local.server = None
            raise OSError(f"fork server failed: {e}") from None
        finally:
            os.close(out_r)
            os.close(err_r)

    def _server(self) -> ForkServer:
        server = getattr(self._local, "server", None)
        if server is None or server.proc.poll() is not None:
            server = ForkServer(self.python, self.preload, str(self.base_dir))
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
