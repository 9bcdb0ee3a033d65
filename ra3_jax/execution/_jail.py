"""The job's namespaces and filesystem view (stdlib only, no ra3_jax imports; loaded by ``_runner.py`` by path).

A job sees a new root: a small read-only tmpfs holding

- read-only bind mounts of ``/usr`` (and ``/bin``, ``/lib``, ... where the distro has them as directories; as
  symlinks where it links them into ``/usr``) and of the interpreter's prefixes (``sys.prefix``, the venv, and
  ``sys.base_prefix``, the installation: stdlib and site-packages), each at its own path;
- a minimal ``/etc``: generated ``passwd``/``group``/``nsswitch.conf``/``hosts`` and copies of the loader's and
  the clock's files (``ld.so.cache``, ``ld.so.conf(.d)``, ``localtime``, ...); nothing root-only (no ``shadow``);
- ``/dev`` with ``null``, ``zero``, ``full``, ``random``, ``urandom`` and a private ``/dev/shm``;
- a fresh ``/proc`` (only the job's PID namespace);
- private writable tmpfs mounts on ``/tmp`` (``/var/tmp`` links to it) and on the job's work directory, at the
  same path as on the host: its ``HOME`` and current directory.

Everything else of the host (home directories, other checkouts, the host's ``/tmp``) is absent. The view is
the same wherever the checkout and the interpreter live. The job then runs as an unprivileged user (uid/gid
65534 when the runner is root; the caller's own uid in a user namespace otherwise) with no capabilities.
"""

import ctypes
import errno
import os
import platform
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
SYS_MOUNT_SETATTR = 442  # same number on every architecture (added in Linux 5.12)
SYS_CAPSET, SYS_PIVOT_ROOT = {"x86_64": (126, 155), "aarch64": (91, 41)}.get(platform.machine(), (None, None))
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV = 0x1, 0x2, 0x4
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
NOBODY = 65534  # uid and gid of jobs started by a root runner

TOP_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
ETC_COPIED = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "os-release")
ETC_BOUND = ("alternatives",)  # symlink farms (/usr/bin/awk -> /etc/alternatives/awk -> ...)
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))

_libc = ctypes.CDLL(None, use_errno=True)
_view = None


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _tmpfs(target, size_mb, mode, uid=None, gid=None):
    owner = f",uid={uid},gid={gid}" if uid is not None else ""
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode={mode}{owner}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _read_only(path, recursive=True):
    """``path``'s mount (and, recursive, every mount below it) read-only, nosuid, nodev."""
    attr = _MountAttr(ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    # Kernels before 5.12: remount each mount point read-only, one by one.
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in points:
        if mp == path or recursive and mp.startswith(path.rstrip("/") + "/"):
            try:
                _mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
            except OSError:
                if mp == path:
                    raise


def _outermost(paths):
    kept = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(q + "/") for q in kept):
            kept.append(p)
    return kept


def _etc_entry(path):
    """A host /etc file's bytes, a symlink's target (str), or None (absent, unreadable, or not a small file)."""
    try:
        if os.path.islink(path):
            return os.readlink(path)
        if os.path.isfile(path) and os.path.getsize(path) < (4 << 20):
            with open(path, "rb") as f:
                return f.read()
    except OSError:
        pass
    return None


def host_view():
    """What every job sees of the host, read once per runner (the fork server: before its first job).

    -> (read-only roots, top-level symlinks {path: target}, /etc entries {name: bytes (a file), str (a link's
    target) or None (a directory)})."""
    global _view
    if _view is not None:
        return _view
    roots, links = [], {}
    for name in TOP_DIRS:
        path = "/" + name
        if os.path.islink(path):
            links[path] = os.readlink(path)
        elif os.path.isdir(path):
            roots.append(path)
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        real = os.path.realpath(prefix)
        if real != "/" and os.path.isdir(real):
            roots.append(real)
    etc = {}
    for name in ETC_COPIED:
        rel_paths = [name]
        if os.path.isdir("/etc/" + name) and not os.path.islink("/etc/" + name):
            etc[name] = None  # a directory: its files follow
            rel_paths = [f"{name}/{entry}" for entry in sorted(os.listdir("/etc/" + name))]
        for rel in rel_paths:
            if (content := _etc_entry("/etc/" + rel)) is not None:
                etc[rel] = content
    _view = (_outermost(roots), links, etc)
    return _view


def _write_etc(new, etc, uid, gid, home):
    os.mkdir(new + "/etc")
    users = {0: "root", NOBODY: "nobody"}
    users.setdefault(uid, "sandbox")
    groups = {0: "root", NOBODY: "nogroup"}
    groups.setdefault(gid, "sandbox")
    generated = {
        "passwd": "".join(
            f"{n}:x:{u}:{gid if u == uid else u}:{n}:{home if u == uid else '/nonexistent'}:/usr/sbin/nologin\n"
            for u, n in users.items()
        ),
        "group": "".join(f"{n}:x:{g}:\n" for g, n in groups.items()),
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    }
    for rel, content in [*etc.items(), *((k, v.encode()) for k, v in generated.items())]:
        path = os.path.join(new, "etc", rel)
        if content is None:
            os.mkdir(path)
        elif isinstance(content, str):
            os.symlink(content, path)
        else:
            with open(path, "wb") as f:
                f.write(content)
    for name in ETC_BOUND:
        if os.path.isdir("/etc/" + name) and not os.path.islink("/etc/" + name):
            os.mkdir(f"{new}/etc/{name}")
            _mount("/etc/" + name, f"{new}/etc/{name}", None, MS_BIND)
            _read_only(f"{new}/etc/{name}", recursive=False)


def _make_dev(new, tmpfs_mb):
    os.mkdir(new + "/dev")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            open(f"{new}/dev/{name}", "w").close()
            _mount("/dev/" + name, f"{new}/dev/{name}", None, MS_BIND)
    for name, target in DEV_LINKS:
        os.symlink(target, f"{new}/dev/{name}")
    os.mkdir(new + "/dev/shm")
    _tmpfs(new + "/dev/shm", tmpfs_mb, "1777")


def _enter(new):
    """Makes ``new`` (a mount point) this mount namespace's root and this process's root and cwd; the old root
    is detached (pivot_root) or covered (where pivot_root is unavailable: moved over ``/`` and chrooted; the job,
    without capabilities, cannot chroot back out)."""
    os.chdir(new)
    if SYS_PIVOT_ROOT is not None and _libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
        _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")  # the old root sits on top of the new one
    else:
        _mount(new, "/", None, MS_MOVE)
        os.chroot(".")
    os.chdir("/")


def build_root(workdir, tmpfs_mb, uid, gid):
    """Builds the job's root on a tmpfs mounted over ``workdir`` (fresh, private, never one of the roots) and
    enters it; the cwd is then ``workdir`` inside it (a private writable tmpfs owned by ``uid``)."""
    roots, links, etc = host_view()
    for r in roots:
        if workdir == r or workdir.startswith(r + "/"):
            raise OSError(errno.EINVAL, f"the work dir {workdir} lies inside {r}, which jobs see read-only")
    umask = os.umask(0o022)
    try:
        new = workdir
        _tmpfs(new, 16, "0755")
        os.mkdir(new + "/tmp")
        _tmpfs(new + "/tmp", tmpfs_mb, "1777")
        for r in roots:
            os.makedirs(new + r, exist_ok=True)
            _mount(r, new + r, None, MS_BIND | MS_REC)
            _read_only(new + r)
        os.makedirs(new + workdir, exist_ok=True)  # before any symlink below: nothing is created through one
        _tmpfs(new + workdir, tmpfs_mb, "0700", uid, gid)
        _write_etc(new, etc, uid, gid, workdir)
        _make_dev(new, tmpfs_mb)
        os.mkdir(new + "/proc")
        _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for link, target in [*links.items(), ("/var/tmp", "/tmp")]:
            if not os.path.lexists(new + link):  # (/var/tmp stays a directory when the work dir lies under it)
                os.makedirs(os.path.dirname(new + link), exist_ok=True)
                os.symlink(target, new + link)
        _enter(new)
        _read_only("/", recursive=False)  # the skeleton; /tmp, /dev/shm and the work dir stay writable
    finally:
        os.umask(umask)
    os.chdir(workdir)


def unshare(root):
    """New mount, network, PID, IPC and UTS namespaces (plus a user namespace mapping our own ids when not root)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if not root:
        flags |= CLONE_NEWUSER
    _check(_libc.unshare(flags), "unshare")
    if not root:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)


def die_with_parent():
    """SIGKILL for this process when its parent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


def job_ids(root):
    """The uid and gid the job runs as: nobody for a root runner, else the caller's own (mapped) ids."""
    return (NOBODY, NOBODY) if root else (os.getuid(), os.getgid())


def drop_privileges(root, uid, gid):
    """No capabilities (bounding set, effective, permitted, inheritable), ``no_new_privs``, and (root) ``uid``."""
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly past the last capability
    if root:  # in a user namespace setgroups is denied and the ids are already the caller's own
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if SYS_CAPSET is None:
        return
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words, all zero
    _check(_libc.syscall(SYS_CAPSET, header, data), "capset")
