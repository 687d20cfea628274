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
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

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
    """New PID, network, mount and IPC namespaces, and a minimal file system: a fresh root that
    holds only the Python installation (read-only) and a private tmpfs on /tmp, /var/tmp and
    /dev/shm (`_enter_minimal_root`); where that cannot be built, a read-only view of the host
    (`_read_only_host`). Forks: the caller continues as PID 1 of the new PID namespace, while the
    original process only waits for it (and passes on its exit status)."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
    if libc.unshare(flags) != 0:
        report["namespace_error"] = os.strerror(ctypes.get_errno())
        return False
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    try:
        _enter_minimal_root(spec, report)
    except OSError as e:
        report["minimal_root_error"] = str(e)
        with contextlib.suppress(OSError):
            _check_libc(libc.umount2(STAGING.encode(), MNT_DETACH), "umount staging")
        _read_only_host(spec, report)
    pid = os.fork()
    if pid:  # the original process: wait for PID 1 and exit with it
        os.closerange(3, 1 << 16)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):  # a /proc that shows only this namespace's processes
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    report["network_isolated"] = True
    return True


# Where the new root is assembled (a mount point of this namespace only, hidden by the pivot).
STAGING = "/tmp"
MNT_DETACH = 2
# Top-level entries of / that are the system's programs and libraries (merged-/usr systems have
# symlinks for all but /usr); the Python installation needs them (libc, libffi, ... for modules
# imported later), and they hold no user data.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Files of /etc the dynamic loader and the time functions read (not /etc/passwd and the rest).
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}


def _source_tree() -> str | None:
    """The directory rstar is imported from when it is a source checkout (an editable install),
    not an installed package: programs have no use for it."""
    root = Path(__file__).resolve().parents[2]
    return None if root.name in ("site-packages", "dist-packages") else str(root)


def minimal_root_exposures() -> tuple[list[str], list[str]]:
    """(directories, files) of the host that the minimal root shows, read-only: the system
    directories, the interpreter's prefixes and import path (without rstar's own source tree),
    a few files of /etc and the harmless devices."""
    skip = _source_tree()
    dirs = [p for p in SYSTEM_DIRS if os.path.isdir(p) and not os.path.islink(p)]
    dirs += [p for p in _interpreter_dirs() if p != skip]
    files = [p for p in (*ETC_FILES, *DEVICES) if os.path.exists(p)]
    return _topmost(dirs), files


def _enter_minimal_root(spec: dict, report: dict) -> None:
    """Assemble a new root on a tmpfs and pivot into it; the host's tree is then unmounted."""
    dirs, files = minimal_root_exposures()
    links = {p: os.readlink(p) for p in (*SYSTEM_DIRS, *ETC_FILES) if os.path.islink(p)}
    fds = {p: os.open(p, os.O_PATH) for p in [*dirs, *files]}  # before the staging tmpfs hides /tmp
    root = STAGING
    try:
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
        size = f"size={spec['tmpfs_mb']}m,nr_inodes=8192,mode=1777"
        os.makedirs(f"{root}/tmp", mode=0o755)
        _mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
        os.makedirs(f"{root}/dev", mode=0o755)
        _mount("tmpfs", f"{root}/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
        for path in ("proc", "var/tmp", "dev/shm", "etc", ".old"):
            os.makedirs(f"{root}/{path}", mode=0o755, exist_ok=True)
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "fd/0"),
            ("stdout", "fd/1"),
            ("stderr", "fd/2"),
        ):
            os.symlink(target, f"{root}/dev/{name}")
        for path, target in links.items():
            os.makedirs(os.path.dirname(f"{root}{path}"), mode=0o755, exist_ok=True)
            os.symlink(target, f"{root}{path}")
        for path in sorted([*dirs, *files]):  # parents before children
            target = f"{root}{path}"
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            if path in files:
                if not os.path.lexists(target):
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            else:
                os.makedirs(target, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fds[path]}", target, None, MS_BIND | MS_REC)
            keep = MS_NOSUID | (0 if path.startswith("/dev/") else MS_NODEV)
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    finally:
        for fd in fds.values():
            os.close(fd)
    # Scratch directories for /var/tmp and /dev/shm live in the private /tmp (one size limit).
    for path, host in (("/var/tmp", "/tmp/.vartmp"), ("/dev/shm", "/tmp/.shm")):
        os.makedirs(f"{root}{host}", exist_ok=True)
        os.chmod(f"{root}{host}", 0o1777)
        _mount(f"{root}{host}", f"{root}{path}", None, MS_BIND)
    PRESERVED[:] = [p for p in dirs if p == "/tmp" or p.startswith("/tmp/")]
    _pivot(root)
    try:  # (past the pivot nothing may fall back to the host's tree: a failure here is reported)
        _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except OSError as e:  # the root tmpfs is root's, mode 755: programs cannot write it anyway
        report["minimal_root_error"] = f"the new root stays writable by root: {e}"
    report["filesystem"] = (
        f"minimal: a fresh root with only {', '.join(dirs)} and {', '.join(files)} (read-only); private "
        f"tmpfs on /tmp, /var/tmp, /dev/shm ({spec['tmpfs_mb']} MB), emptied after each program"
    )


def _pivot(root: str) -> None:
    """Make `root` the root of this mount namespace and detach the old one."""
    nr = _PIVOT_ROOT.get(os.uname().machine)
    os.chdir(root)
    if nr is None:  # (no syscall number known: move the mount and chroot instead)
        _mount(root, "/", None, 1 << 13)  # MS_MOVE
        os.chroot(".")
    else:
        _check_libc(libc.syscall(nr, root.encode(), f"{root}/.old".encode()), "pivot_root")
        os.chdir("/")
        try:
            _check_libc(libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
        except OSError as e:  # fail closed: never fall back with the host's tree under /.old
            raise RuntimeError(f"sandbox: {e}") from e
        os.rmdir("/.old")
    os.chdir("/")


def _read_only_host(spec: dict, report: dict) -> None:
    """The fallback view: the host file system read-only, a private tmpfs on /tmp, /var/tmp and
    /dev/shm, and directories others cannot enter (/root) covered but for the interpreter."""
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
    report["filesystem"] = (
        "host file system read-only; private tmpfs on /tmp, /var/tmp, /dev/shm "
        f"({spec['tmpfs_mb']} MB), emptied after each program"
    )
    if not_ro:
        report["filesystem"] += f"; could not make read-only: {', '.join(not_ro)}"


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
