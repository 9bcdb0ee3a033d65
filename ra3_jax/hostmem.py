"""Host memory: glibc malloc on transparent huge pages for the processes that compute on the CPU.

XLA:CPU allocates each step's temporaries (activations, residuals, gradients) with glibc malloc. Blocks over
malloc's mmap threshold are fresh ``mmap`` regions, returned to the kernel on free, so every step page-faults
its whole working set again, 4 KiB at a time: 4.5 million minor faults in 12 steps of the issue #2 f32 train step,
20 million in ``make demo``. glibc >= 2.35 can ask for transparent huge pages for its blocks
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: ``madvise(MADV_HUGEPAGE)`` on each mapping): ~30x fewer faults measured.
Measured on the 2-core CI VM (benchmarks/train_step.py, same run): f32 +8-11%, bf16 +13%, the SmolLM2 shape
+5%, peak RSS unchanged. (HF transformers on torch runs *slower* with it, 720-752 vs 882-921 tokens/s, so the
benchmark leaves HF's process on glibc's default.)

A tunable is read once, at process start, so ``ra3`` re-executes itself with it (``reexec_with_hugepage_malloc``,
from its entry point ``cli.run``) unless ``RA3_HUGEPAGE_MALLOC=0``, ``GLIBC_TUNABLES`` already sets it, the C
library is not glibc >= 2.35, or the kernel's THP mode is not ``madvise`` (``always`` needs no tunable; ``never``
cannot use one); never twice (a marker in the environment: a secure-execution process whose loader drops the
tunable must not exec again), nor from a frozen executable or a set-uid one.
"""

from __future__ import annotations

import logging
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "RA3_HUGEPAGE_MALLOC"
MARKER = "RA3_HUGEPAGE_REEXEC"  # set in the re-executed process's environment
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    """glibc's version as a tuple, None for another C library (musl, macOS, Windows)."""
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return None


def hugepage_environ(environ, *, platform_name: str = sys.platform, glibc=None, thp=None) -> dict | None:
    """``environ`` with the huge-page malloc tunable added, or None where it is set, opted out of or of no use.
    ``glibc`` / ``thp`` default to this machine's (``glibc_version()``, ``thp_mode()``)."""
    if platform_name != "linux" or environ.get(OPT_OUT, "1") == "0" or environ.get(MARKER):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    glibc = glibc_version() if glibc is None else glibc
    thp = thp_mode() if thp is None else thp
    if glibc is None or glibc < (2, 35) or thp != "madvise":
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, f"{TUNABLE}=1"])), MARKER: "1"}


def reexec_with_hugepage_malloc() -> None:
    """Replace this process by the same command line with the huge-page malloc tunable (same pid, stdio and
    arguments); returns without doing anything where ``hugepage_environ`` says there is nothing to do. Call it
    first thing in a process entry point, before JAX (or anything else that allocates much) is imported."""
    env = hugepage_environ(os.environ)
    if env is None or not sys.executable or not sys.orig_argv or getattr(sys, "frozen", False):
        return
    if os.getuid() != os.geteuid() or os.getgid() != os.getegid():
        return  # set-uid / set-gid: the loader ignores GLIBC_TUNABLES there
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # (None when the process started with that descriptor closed)
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # e.g. the interpreter's file replaced under a running process: go on as we are
        logging.getLogger(__name__).warning("could not re-execute with %s=1 (%s); glibc's default malloc", TUNABLE, e)


def without_hugepage(environ) -> dict:
    """``environ`` with the huge-page malloc tunable taken out of ``GLIBC_TUNABLES`` (for a child that runs
    slower with it) and re-execution opted out of."""
    rest = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE + "=")]
    env = {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", MARKER)}
    return {**env, **({"GLIBC_TUNABLES": ":".join(rest)} if rest else {}), OPT_OUT: "0"}
