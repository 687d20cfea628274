"""Linux isolation of a sandbox worker: namespaces, mounts and the uid/limits bookkeeping, through
libc (ctypes). Called by the worker (`worker._worker_setup`) before it imports anything heavy;
what each mode isolates and what it does not: docs/sandbox.md."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys
from pathlib import Path

# Without a mount namespace, a worker that drops root cannot read an interpreter installed under
# a private directory (/root, mode 700) any more: it imports these and every codec up front.
FALLBACK_PRELOAD: tuple[str, ...] = (
    "numbers", "array", "copy", "textwrap", "unicodedata", "calendar", "time", "_strptime", "json",
    "typing", "dataclasses", "enum", "pprint", "struct", "hashlib", "base64", "binascii", "zlib",
    "pickle", "traceback", "warnings", "contextlib", "socket", "subprocess", "threading", "signal",
    "locale", "io", "timeit", "secrets", "inspect", "tokenize", "keyword", "ast", "glob", "tempfile",
    "shutil", "csv", "gc", "weakref", "abc", "platform", "difflib", "fnmatch",
)  # fmt: skip


libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38


def _check_libc(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _cstr(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    ret = libc.mount(_cstr(source), _cstr(target), _cstr(fstype), flags, _cstr(data))
    _check_libc(ret, f"mount {target}")


def import_all_encodings() -> None:
    import encodings
    import pkgutil

    for mod in pkgutil.iter_modules(encodings.__path__):
        with contextlib.suppress(Exception):
            __import__(f"encodings.{mod.name}")


def enter_root_namespaces(spec: dict, report: dict) -> bool:
    """New PID, network, mount and IPC namespaces; a read-only view of the host with a private
    tmpfs on /tmp, /var/tmp and /dev/shm. Forks: the caller continues as PID 1 of the new PID
    namespace, while the original process only waits for it (and passes on its exit status)."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
    if libc.unshare(flags) != 0:
        report["namespace_error"] = os.strerror(ctypes.get_errno())
        return False
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    exposures = interpreter_exposures()
    sources = {path: os.open(path, os.O_PATH) for paths in exposures.values() for path in paths}
    not_ro = []
    for mount_point, opts in _mount_points():
        if mount_point == "/proc" or mount_point.startswith("/proc/"):
            continue
        keep = sum(
            f for o, f in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC)) if o in opts
        )
        try:
            _mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            not_ro.append(mount_point)
    # The interpreter may live under a directory the sandbox uid cannot enter (/root, mode 700):
    # cover that directory with an empty tmpfs holding bind mounts of just the interpreter's
    # directories, so lazy imports work after the privilege drop and the rest stays hidden.
    for hidden, paths in exposures.items():
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for path in paths:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{sources[path]}", path, None, MS_BIND | MS_REC)
            with contextlib.suppress(OSError):
                _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        _mount(None, hidden, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        report["hidden"] = report.get("hidden", []) + [hidden]
    for fd in sources.values():
        os.close(fd)
    # The private /tmp below would hide an interpreter or virtual environment that lives
    # under it (a checkout in /tmp, as CI may use): keep handles on those directories and
    # bind them back, read-only, into the new tmpfs.
    private = ("/tmp", "/var/tmp", "/dev/shm")
    below = _topmost(
        [p for p in _interpreter_dirs() if any(p == d or p.startswith(d + "/") for d in private)]
    )
    kept = {path: os.open(path, os.O_PATH) for path in below}
    PRESERVED[:] = below  # the scratch cleaner must leave them (and the directories above them) alone
    size = f"size={spec['tmpfs_mb']}m,nr_inodes=8192,mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            host = "/tmp/.shm" if path == "/dev/shm" else "/tmp/.vartmp"
            os.makedirs(host, exist_ok=True)
            os.chmod(host, 0o1777)
            with contextlib.suppress(OSError):
                _mount(host, path, None, MS_BIND)
    for path, fd in kept.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        with contextlib.suppress(OSError):
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(fd)
    pid = os.fork()
    if pid:  # the original process: wait for PID 1 and exit with it
        os.closerange(3, 1 << 16)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):  # a /proc that shows only this namespace's processes
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    report["network_isolated"] = True
    report["filesystem"] = (
        "host file system read-only; private tmpfs on /tmp, /var/tmp, /dev/shm "
        f"({spec['tmpfs_mb']} MB), emptied after each program"
    )
    if not_ro:
        report["filesystem"] += f"; could not make read-only: {', '.join(not_ro)}"
    return True


# Interpreter directories bound back into the private /tmp (set in the worker's namespace).
PRESERVED: list[str] = []


def _interpreter_dirs() -> list[str]:
    """The real paths of the interpreter's prefixes and import path (what programs import from)."""
    wanted = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix}
    wanted |= {p for p in sys.path if p and os.path.isdir(p)}
    return sorted({os.path.realpath(p) for p in wanted})


def _topmost(paths: list[str]) -> list[str]:
    """Drop the paths that lie inside another one (a bind mount of /a/b already holds /a/b/c)."""
    return [p for p in sorted(paths) if not any(p != q and p.startswith(q + "/") for q in paths)]


def interpreter_exposures() -> dict[str, list[str]]:
    """{directory others cannot enter: [the interpreter's directories below it]}."""
    out: dict[str, set[str]] = {}
    for path in _interpreter_dirs():
        parts = Path(path).parts
        for i in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:i]))
            if os.stat(ancestor).st_mode & 0o005 != 0o005:
                if ancestor != path:
                    out.setdefault(ancestor, set()).add(path)
                break
    return {hidden: _topmost(list(paths)) for hidden, paths in out.items()}


def enter_user_network_namespace(report: dict) -> None:
    """Not root: an unprivileged user namespace, if the kernel allows one, gives an empty
    network namespace (identity-mapped, so files keep their owner)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        report["namespace_error"] = os.strerror(ctypes.get_errno())
        return
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        report["network_isolated"] = True
    except OSError as e:
        report["namespace_error"] = str(e)


def _mount_points() -> list[tuple[str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
            out.append((mp, parts[5]))
    return out


def usable_uid(uid: int) -> int:
    """The per-worker uid if this user namespace maps it, else nobody."""
    try:
        for line in Path("/proc/self/uid_map").read_text().splitlines():
            inside, _, count = (int(x) for x in line.split())
            if inside <= uid < inside + count:
                return uid
    except (OSError, ValueError):
        pass
    return 65534


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def count_user_processes(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    n += 1
    return n
