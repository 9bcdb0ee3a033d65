"""One job's process: started from a fork server or a fresh interpreter, its output collected, its verdict read."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import time
import weakref
from pathlib import Path

from ra3_jax.execution.jobs import ExecResult, Limits

RUNNER = Path(__file__).with_name("_runner.py")


def scrubbed_env(home: str) -> dict:
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


def start_runner(python: str, args: list[str], cwd: str, *, output: int, **kw) -> subprocess.Popen:
    """``_runner.py`` in its own session under a scrubbed environment (isolated interpreter, no .pyc files)."""
    return subprocess.Popen(
        [python, "-I", "-B", str(RUNNER), *args],
        cwd=cwd,
        env=scrubbed_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
        **kw,
    )


class ForkServer:
    """A pre-started ``_runner.py --serve`` process; jobs are forked from it (see ``_runner.serve``)."""

    def __init__(self, python: str, preload: tuple, cwd: str):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            args = ["--serve", str(child.fileno()), *preload]
            self.proc = start_runner(python, args, cwd, output=subprocess.DEVNULL, pass_fds=(child.fileno(),))
        finally:
            child.close()
        self.sock = parent
        weakref.finalize(self, ForkServer._stop, self.sock, self.proc)

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
        ForkServer._stop(self.sock, self.proc)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def collect(out_fd: int, err_fd: int, pid: int, wait, limits: Limits):
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
        kill_group(pid)
    try:
        rc = wait(max(1.0, deadline - time.monotonic()) if not why else 10)
    except TimeoutError:  # stdout closed but the job lingers past the deadline
        why = why or "timeout"
        kill_group(pid)
        rc = wait(10)
    if not why:  # nothing of the job may outlive it (non-isolated mode: its process group)
        kill_group(pid)
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), why, rc


def run_fresh(python: str, spec: dict, limits: Limits, workdir: str):
    """A fresh interpreter for the job (fork_server=False)."""
    job_path = os.path.join(workdir, ".job.json")
    with open(job_path, "w") as f:
        json.dump(spec, f)
    proc = start_runner(python, [job_path], workdir, output=subprocess.PIPE)

    def wait(timeout):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError from None

    try:
        out, err, why, rc = collect(proc.stdout.fileno(), proc.stderr.fileno(), proc.pid, wait, limits)
    finally:
        proc.stdout.close()
        proc.stderr.close()
    return rc, out, err, why


def verdict(token, rc, out, err, why, wall, limits: Limits) -> ExecResult:
    """The job's result from the runner's output: its token lines, exit status and why it was stopped (if so)."""
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
