"""In-sandbox runner: the first code a sandboxed job executes (stdlib only, no ra3_jax imports).

Started by ``ra3_jax.execution`` (``process.py``) either as a fork server (``python -I -B _runner.py --serve FD
[modules to preload]``, which forks one process per job received on the socket FD) or once per job
(``python -I -B _runner.py JOB_JSON``, which reads and deletes the job file). For each job (program, test,
limits, verdict token, work directory), when isolation is on:

1. ``unshare`` new mount, network, PID, IPC and UTS namespaces (plus a user namespace when not root);
2. forks: the child is PID 1 of the new PID namespace, so killing it kills every process the program made;
3. in the child: builds the job's own root (``_jail.py``: read-only ``/usr`` and interpreter prefixes, a minimal
   ``/etc``, ``/dev``, a fresh ``/proc``, private tmpfs on ``/tmp`` and the work directory; nothing else of the
   host), pivots into it, then becomes uid/gid 65534 (when root), drops all capabilities and sets
   ``no_new_privs``; then forks the job as PID 2 and only waits for it (a namespace's init never receives a
   signal it has no handler for, such as SIGXCPU at the CPU limit);
4. in the job: sets resource limits (address space, CPU, file size, open files, processes, no core dumps);
5. executes the program in one namespace and the test code in a *second* namespace whose builtins are a copy
   taken before the program ran (a program that monkey-patches ``builtins`` does not change the checker);
6. writes ``<token>:ok`` on a private duplicate of stdout only if both ran to the end. The parent counts a
   pass only when it sees that line and exit status 0, so ``sys.exit(0)``, ``os._exit(0)``, closing stdout,
   or killing itself all read as failures.
"""

import builtins
import json
import os
import resource
import sys
import traceback


def _load_jail():
    """``_jail.py`` from this file's directory (``-I`` keeps it off ``sys.path``; this runner imports no ra3_jax)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_ra3_jail", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jail.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jail = _load_jail()


def _set_limits(lim):
    def setl(res, value, grace=0):
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        top = value + grace if hard == resource.RLIM_INFINITY else min(value + grace, hard)
        resource.setrlimit(res, (value, top))

    setl(resource.RLIMIT_CORE, 0)
    # SIGXCPU at the budget (verdict cpu_limit), SIGKILL a second later for a program that catches it.
    setl(resource.RLIMIT_CPU, int(lim["cpu_s"]), grace=1)
    setl(resource.RLIMIT_FSIZE, int(lim["fsize_mb"]) << 20)
    setl(resource.RLIMIT_NOFILE, int(lim["nofile"]))
    setl(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)
    # RLIMIT_NPROC counts every task of this user: allow what exists now plus the job's own budget.
    with open("/proc/loadavg") as f:
        tasks_now = int(f.read().split()[3].split("/")[1])
    setl(resource.RLIMIT_NPROC, tasks_now + int(lim["nproc"]))


def _run_job(job, verdict_fd):
    pristine = dict(builtins.__dict__)

    def restore_builtins():
        builtins.__dict__.clear()
        builtins.__dict__.update(pristine)

    program_ns = {"__name__": "__main__", "__builtins__": builtins}
    status = "ok"
    try:
        exec(compile(job["program"], "<program>", "exec"), program_ns)
        restore_builtins()
        if job["test"]:
            test_ns = dict(program_ns)
            test_ns["__builtins__"] = dict(pristine)
            exec(compile(job["test"], "<test>", "exec"), test_ns)
    except SystemExit as e:
        status = f"exit:{e.code!r}"
    except BaseException:  # noqa: BLE001 - the verdict is the point
        status = "exception"
        restore_builtins()
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os.write(verdict_fd, f"\n{job['token']}:{status}\n".encode())
    return 0 if status == "ok" else 1


def _relay(pid):
    """Waits for ``pid`` and ends this process the same way (a signal as 128 + its number)."""
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def run(job):
    """Everything after the job is known; never returns (the process ends with the job's status)."""
    workdir = os.getcwd()
    root = os.getuid() == 0
    if job.get("cgroup"):  # the parent's per-job pids cgroup: every process we make is counted there
        try:
            with open(os.path.join(job["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            sys.stderr.write(f"sandbox setup failed: cannot join {job['cgroup']}: {e}\n")
            os._exit(98)
    isolated = False
    if job["isolate"]:
        try:
            jail.unshare(root)
            isolated = True
        except OSError as e:
            if job["isolate"] == "required":
                sys.stderr.write(f"sandbox isolation unavailable: {e}\n")
                os._exit(97)
    pid = os.fork() if isolated else 0
    if pid:  # the runner outside: wait for PID 1 of the namespace and relay how it ended
        jail.die_with_parent()
        _relay(pid)
    try:
        if isolated:
            uid, gid = jail.job_ids(root)
            jail.build_root(workdir, job["limits"]["tmpfs_mb"], uid, gid)
            jail.drop_privileges(root, uid, gid)
        os.environ["HOME"] = workdir
        os.write(1, f"{job['token']}:isolated={int(isolated)}\n".encode())
        if isolated:
            # PID 1 of the namespace only waits: the kernel never delivers a signal without a handler (SIGXCPU
            # at the CPU limit) to a namespace's init, so the job runs as PID 2. Its exit ends the namespace.
            child = os.fork()
            if child:
                _relay(child)
        _set_limits(job["limits"])
    except OSError as e:
        sys.stderr.write(f"sandbox setup failed: {e}\n")
        os._exit(98)
    verdict_fd = os.dup(1)
    os.set_inheritable(verdict_fd, False)
    os._exit(_run_job(job, verdict_fd))


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def serve(fd):
    """Fork server: one job at a time from the parent over a UNIX socket.

    Request: 8-byte length (with the job's stdout and stderr pipe ends attached as SCM_RIGHTS) + the job JSON.
    Replies: the job process's pid (8 bytes) right after the fork, then its exit status (8 bytes). The job
    process starts from this already-initialised interpreter, which is what makes a job cheap."""
    import socket
    import struct

    sock = socket.socket(fileno=fd)
    null = os.open(os.devnull, os.O_RDWR)
    jail.host_view()  # read once here, not in every forked job
    while True:
        try:
            head, fds, _, _ = socket.recv_fds(sock, 8, 2)
        except OSError:
            return
        if len(head) < 8 or len(fds) != 2:
            return
        payload = _recv_exact(sock, struct.unpack("<Q", head)[0])
        if payload is None:
            return
        job = json.loads(payload)
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                os.setsid()
                os.dup2(null, 0)
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                for f in (*fds, null):
                    os.close(f)
                os.chdir(job["workdir"])
                os.environ["HOME"] = job["workdir"]
                run(job)
            finally:
                os._exit(99)
        for f in fds:
            os.close(f)
        sock.sendall(struct.pack("<q", pid))
        _, status = os.waitpid(pid, 0)
        sock.sendall(struct.pack("<q", os.waitstatus_to_exitcode(status)))


def main():
    if sys.argv[1] == "--serve":
        for mod in sys.argv[3:]:  # preloaded for every job (e.g. numpy, imported by MBPP+ checks)
            try:
                __import__(mod)
            except ImportError:
                pass
        serve(int(sys.argv[2]))
        return
    job_path = sys.argv[1]
    with open(job_path) as f:
        job = json.load(f)
    os.unlink(job_path)
    run(job)


if __name__ == "__main__":
    main()
