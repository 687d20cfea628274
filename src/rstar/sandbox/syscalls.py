"""The syscall filter (seccomp) on model code: the kernel surface a math program never needs.

Denied with EPERM (so the program gets a Python `PermissionError`, not a kill): sockets of every
family (`socket`, `socketpair`: also Unix-socket connects to host services, which a network
namespace does not stop), new namespaces (`unshare`, `setns`, `clone` with any CLONE_NEW* flag),
`ptrace`, `process_vm_readv/writev`, mounts (`mount`, `umount2`, `pivot_root`, `chroot` and the
new mount API), `bpf`, keyrings (`keyctl`, `add_key`, `request_key`), `perf_event_open`,
`kexec_load`/`kexec_file_load`, module loading (`init_module`, `finit_module`, `delete_module`),
`userfaultfd` and io_uring (whose operations bypass syscall filters). `clone3` answers ENOSYS:
its flags live in memory a filter cannot read, and ENOSYS makes glibc fall back to `clone`,
whose flags it can. Syscalls of another ABI (32-bit `int 0x80`, x32) kill the program.

The filter is built once per worker with libseccomp (through `pyseccomp`, a ctypes binding:
libseccomp knows each architecture's syscall numbers and writes the BPF program) and exported as
a BPF program; each program's process installs that program with one `prctl(PR_SET_SECCOMP)`
just before the model code runs (after the interpreter and the preloaded modules are set up),
which costs microseconds. It relies on `no_new_privs`, which the worker sets before forking.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import functools
import os
import tempfile

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2

DENIED: tuple[str, ...] = (
    "socket", "socketpair",
    "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "keyctl", "add_key", "request_key", "perf_event_open",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip

# clone flags that make new namespaces (CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
# NEWPID, NEWNET)
CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    0x80, 0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
)  # fmt: skip


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def build_bpf() -> bytes:
    """The filter as a classic BPF program (8 bytes an instruction)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in DENIED:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except OSError:  # a syscall this kernel/libseccomp does not know: nothing to deny
            pass
    for flag in CLONE_NAMESPACE_FLAGS:
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    try:
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    except OSError:
        pass
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


class Filter:
    """A BPF program ready to install (buffers made in the worker; the child only calls prctl)."""

    def __init__(self, bpf: bytes):
        if not bpf or len(bpf) % 8:
            raise ValueError("not a BPF program")
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]

    def install(self) -> None:
        """Apply to the calling thread (its later children inherit it); raise OSError if refused."""
        if self._prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._prog), 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp filter: {os.strerror(err)}")


@functools.lru_cache(maxsize=1)
def bpf_for_workers() -> str:
    """The program, built once in the pool's process, for the worker's spec (base64). Workers do
    not load libseccomp themselves: a library mapped into the worker makes every fork of it
    slower, and the program is the same for all of them."""
    try:
        return base64.b64encode(build_bpf()).decode()
    except Exception as e:  # fail closed: no program runs unfiltered unless asked to
        from rstar import RstarError  # (a one-line error for the CLI: the machine lacks a library)

        raise RstarError(
            f"the sandbox's syscall filter cannot be built ({type(e).__name__}: {e}); install libseccomp "
            "(Debian: libseccomp2) and pyseccomp, or set sandbox.seccomp=false"
        ) from e


def make_filter() -> Filter:
    return Filter(build_bpf())
