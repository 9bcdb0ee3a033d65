"""Per-job process caps from the pids cgroup controller (the namespaces themselves are set up in ``_jail.py``)."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def pids_cgroup_base() -> Path | None:
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


def make_job_cgroup(base: Path, token: str, nproc: int) -> Path:
    """A pids cgroup for one job under ``base``, named job-<parent pid>-<token>; its pids.max is ``nproc`` plus
    three (the runner, PID 1 and the job)."""
    cgroup = base / f"job-{os.getpid()}-{token[:16]}"
    cgroup.mkdir()
    (cgroup / "pids.max").write_text(str(nproc + 3))
    return cgroup


def remove_cgroup(path: Path) -> None:
    for _ in range(50):  # processes of a killed namespace take a moment to be reaped
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
