"""Host malloc on transparent huge pages (ra3_jax/hostmem.py): when the tunable is added, and that re-executing
with it keeps the command line and really cuts page faults (counted by the kernel, ``ru_minflt``)."""

import json
import os
import subprocess
import sys

import pytest

from ra3_jax import hostmem

LINUX = dict(platform_name="linux", glibc=(2, 36), thp="madvise")


def test_tunable_added_only_where_it_helps():
    want = {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "RA3_HUGEPAGE_REEXEC": "1"}
    assert hostmem.hugepage_environ({"A": "1"}, **LINUX) == want
    # the re-executed process never execs again, even where the loader dropped the tunable (secure execution)
    assert hostmem.hugepage_environ({"RA3_HUGEPAGE_REEXEC": "1"}, **LINUX) is None
    # other tunables are kept, ours appended
    env = hostmem.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # already set (also the re-executed process itself: no exec loop), or opted out of
    assert hostmem.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, **LINUX) is None
    assert hostmem.hugepage_environ({"RA3_HUGEPAGE_MALLOC": "0"}, **LINUX) is None
    # of no use: too old a glibc, another C library, THP always or never, not Linux
    assert hostmem.hugepage_environ({}, **{**LINUX, "glibc": (2, 34)}) is None
    assert hostmem.hugepage_environ({}, **{**LINUX, "thp": "always"}) is None
    assert hostmem.hugepage_environ({}, **{**LINUX, "thp": "never"}) is None
    assert hostmem.hugepage_environ({}, **{**LINUX, "platform_name": "darwin"}) is None


def test_without_hugepage_takes_out_ours_only():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "B": "2", "RA3_HUGEPAGE_REEXEC": "1"}
    assert hostmem.without_hugepage(env) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
        "B": "2",
        "RA3_HUGEPAGE_MALLOC": "0",
    }
    assert hostmem.without_hugepage({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == {"RA3_HUGEPAGE_MALLOC": "0"}


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hostmem.thp_mode(str(f)) == "always"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


# The child re-executes itself, then allocates, touches and frees a 64 MiB block (above malloc's mmap
# threshold, so each round is a fresh mapping) 20 times and reports its argv, tunables and minor page faults.
CHILD = """
import ctypes, json, os, resource, sys
from ra3_jax import hostmem
hostmem.reexec_with_hugepage_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"argv": sys.argv[1:], "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
"""


def _child(env):
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "one", "two words"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(hostmem.hugepage_environ({}) is None, reason="no glibc >= 2.35 with THP in madvise mode here")
def test_reexec_keeps_the_command_line_and_cuts_page_faults():
    plain = hostmem.without_hugepage(os.environ)  # opted out: the child runs on glibc's default
    off = _child(plain)
    on = _child({k: v for k, v in plain.items() if k != hostmem.OPT_OUT})
    assert off["argv"] == on["argv"] == ["one", "two words"]
    assert "glibc.malloc.hugetlb" not in (off["tunables"] or "")
    assert "glibc.malloc.hugetlb=1" in on["tunables"]
    assert off["faults"] >= 20 * (64 << 20) // 4096 * 0.9  # every 4 KiB page, every round
    assert on["faults"] * 8 < off["faults"], (on, off)


def test_reexec_failure_goes_on_with_the_default(monkeypatch, caplog):
    monkeypatch.setattr(hostmem, "hugepage_environ", lambda environ: {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    monkeypatch.setattr(hostmem.os, "execve", lambda *a: (_ for _ in ()).throw(PermissionError("denied")))
    hostmem.reexec_with_hugepage_malloc()  # returns instead of raising
    assert "could not re-execute" in caplog.text and "denied" in caplog.text


def test_only_the_process_entry_point_reexecutes(monkeypatch):
    """``cli.run`` (the `ra3` script) re-executes; ``cli.main`` never does, even without argv (a notebook or a
    wrapper that set sys.argv keeps its process)."""
    from ra3_jax import cli

    calls = []
    monkeypatch.setattr(hostmem, "reexec_with_hugepage_malloc", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["ra3", "--help"])
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == []
    with pytest.raises(SystemExit):
        cli.run()
    assert calls == [1]
