"""The sandbox, for real: worker processes, forked programs, limits (no mocks).

A hostile-code suite checks that each attack is contained, comes back as an error result, and
that the pool still serves afterwards. Two pools are shared by the tests (starting a sympy
worker takes a second or two).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from rstar import cli
from rstar.sandbox import ExecResult, SandboxConfig, SandboxPool, format_error, run_code

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(SandboxConfig(timeout_s=TIMEOUT_S, memory_mb=256, max_output_bytes=64_000)) as p:
        yield p


@pytest.fixture(scope="module")
def authors_pool():
    with SandboxPool(SandboxConfig(timeout_s=TIMEOUT_S, output_style="authors"), eager=False) as p:
        yield p


def assert_serving(pool: SandboxPool) -> None:
    r = pool.run("print(6 * 7)")
    assert r.ok and r.stdout == "42\n", r


def sandbox_processes(uid: int) -> list[int]:
    """Host processes running as the sandbox uid (a program's leftovers would show up here)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def wait_no_processes(uid: int, within_s: float = 3.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := sandbox_processes(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -- faithful output ---------------------------------------------------------------------------


def test_every_print_is_captured_and_big_integers_are_exact(pool):
    r = pool.run("print('a')\nx = 2 ** 200\nprint(x)\nprint(10 ** 5000 + 1)\nprint(0.1 + 0.2)")
    assert r.ok, r
    lines = r.stdout.splitlines()
    assert lines[0] == "a"
    assert lines[1] == str(2**200)
    assert lines[2] == "1" + "0" * 4999 + "1"  # past Python's default 4300-digit str() limit
    assert lines[3] == "0.30000000000000004"
    assert r.observation() == r.stdout.strip()
    assert r.error_type is None and not r.timed_out and r.duration_s > 0


def test_state_never_leaks_between_programs(pool):
    first = pool.run_many(
        ["secret = 41", "import math\nmath.pi = 3", "import decimal\ndecimal.getcontext().prec = 5"]
    )
    assert all(r.ok for r in first)
    later = pool.run_many(
        ["print(secret)", "import math\nprint(math.pi)", "import decimal\nprint(decimal.Decimal(1) / 3)"]
    )
    assert later[0].error_type == "NameError"
    assert later[1].stdout == "3.141592653589793\n"
    assert later[2].stdout == "0." + "3" * 28 + "\n"


def test_sympy_and_numpy_programs(pool):
    sym, num = pool.run_many(
        [
            "from sympy import symbols, Eq, solve\nx = symbols('x')\nprint(solve(Eq(x**2 - 5*x + 6, 0), x))",
            "import numpy as np\nprint(int(np.arange(10).sum()))",
        ]
    )
    assert sym.ok and sym.stdout == "[2, 3]\n", sym
    assert num.ok and num.stdout == "45\n", num


def test_errors_are_structured(pool):
    zero, syntax, name = pool.run_many(["print('before')\nx = 1 / 0", "x = (", "print(undefined)"])
    assert not zero.ok and zero.error_type == "ZeroDivisionError" and zero.error_message == "division by zero"
    assert zero.stdout == "before\n"  # output printed before the error is kept
    assert zero.observation() == "ZeroDivisionError: division by zero"
    assert syntax.error_type == "SyntaxError" and "line 1" in syntax.error_message
    assert name.observation() == "NameError: name 'undefined' is not defined"


def test_submit_is_non_blocking_and_thread_safe(pool):
    futures, lock = {}, threading.Lock()

    def producer(k: int) -> None:
        for i in range(5):
            f = pool.submit(f"print({k} * 100 + {i})")
            with lock:
                futures[k * 100 + i] = f

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {n: f.result(timeout=30).stdout for n, f in futures.items()} == {n: f"{n}\n" for n in futures}
    assert [r.stdout for r in pool.run_many([f"print({i})" for i in range(8)])] == [
        f"{i}\n" for i in range(8)
    ]


# -- hostile code: each contained, an error, and the pool serves afterwards ----------------------


def test_infinite_loop_times_out(pool):
    t0 = time.monotonic()
    r = pool.run("print('start')\nwhile True:\n    pass")
    assert not r.ok and r.timed_out and r.error_type == "TimeoutError"
    assert r.stdout == "start\n"
    assert time.monotonic() - t0 < TIMEOUT_S + 3
    assert_serving(pool)


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10 ** 11)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))"],
    ids=["one-huge-allocation", "growing"],
)
def test_memory_bomb(pool, code):
    r = pool.run(code)
    assert not r.ok and r.error_type in ("MemoryError", "Crash"), r
    assert not r.timed_out
    assert_serving(pool)


def test_fork_bomb_is_contained_and_cleaned_up(pool):
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(10000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print('forked', n)\n"
        "time.sleep(60)"
    )
    r = pool.run(code)
    assert not r.ok and r.timed_out, r
    forked = int(r.stdout.split()[1])
    assert forked < 16  # RLIMIT_NPROC holds, also when the sandbox runs as root
    uid = pool.isolation["uid"]
    if uid != 0:
        assert wait_no_processes(uid) == []
    assert_serving(pool)


def test_background_processes_do_not_outlive_the_program(pool):
    r = pool.run("import subprocess\nsubprocess.Popen(['sleep', '100'])\nprint('left it running')")
    assert r.ok, r
    uid = pool.isolation["uid"]
    if uid != 0:
        assert wait_no_processes(uid) == []


@pytest.mark.parametrize(
    "code", ["print('x' * 100_000_000)", "while True:\n    print(12345678901234567890)"], ids=["one", "loop"]
)
def test_print_flood_is_cut(pool, code):
    r = pool.run(code)
    assert not r.ok and r.error_type == "OutputLimitExceeded", r
    assert 64_000 <= len(r.stdout) < 64_200 and "output truncated" in r.stdout
    assert_serving(pool)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import sys\nprint('partial')\nsys.exit()", "sys.exit()"),
        ("import sys\nsys.exit(3)", "sys.exit(3)"),
        ("raise SystemExit(0)", "sys.exit(0)"),
        ("import os\nprint('partial')\nos._exit(0)", "code 0"),
        ("import os\nos._exit(7)", "code 7"),
    ],
)
def test_exits_are_errors(pool, code, message):
    r = pool.run(code)
    assert not r.ok and r.error_type == "SystemExit" and message in r.error_message, r
    if "partial" in code:
        assert r.stdout == "partial\n"
    assert_serving(pool)


@pytest.mark.parametrize(
    "code",
    [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('still here')",
        "import os, signal\nos.killpg(0, signal.SIGKILL)",
    ],
    ids=["parent", "everything", "own-group"],
)
def test_killing_the_parent(pool, code):
    r = pool.run(code)
    assert isinstance(r, ExecResult) and not r.ok, r
    if "killpg" in code:
        # the program's own group is the program alone: it killed itself, and the result says so
        assert r.error_type == "Crash" and "SIGKILL" in r.error_message, r
    elif pool.isolation["pid_namespace"]:
        # The worker is PID 1 of the program's namespace, which a signal from inside cannot kill
        # (EPERM), and kill(-1) there finds no process but the sender, which it skips (ESRCH).
        want = "PermissionError" if "getppid" in code else "ProcessLookupError"
        assert r.error_type == want and "still here" not in r.stdout, r
    else:
        # Without a PID namespace the signal is refused (the program runs as another uid or
        # under the syscall filter) or takes the program itself down: either way it is named.
        assert r.error_type in ("PermissionError", "ProcessLookupError", "Crash"), r
    assert_serving(pool)  # the worker itself survived


def test_writing_outside_the_working_directory(pool, tmp_path):
    # A directory of the host (this repository) and one under the host's /tmp.
    for target in (Path(__file__).parent / f"escaped-{uuid.uuid4().hex}.txt", tmp_path / "escaped.txt"):
        r = pool.run(f"open({str(target)!r}, 'w').write('x')")
        assert not r.ok and r.error_type in ("PermissionError", "OSError", "FileNotFoundError"), r
        assert not target.exists()
    # Inside its working directory a program may write, up to the file size limit.
    ok, big = pool.run_many(
        [
            "open('notes.txt', 'w').write('hello')\nprint(open('notes.txt').read())",
            "open('big.bin', 'wb').write(b'0' * 5_000_000)",
        ]
    )
    assert ok.ok and ok.stdout == "hello\n"
    assert not big.ok and big.error_type == "OSError" and "too large" in big.error_message.lower()
    # ... and finds nothing of the previous program's files.
    assert pool.run("import os\nprint(sorted(os.listdir('.')))").stdout == "[]\n"
    if pool.isolation["mode"] == "namespaces":
        probe = f"/tmp/rstar-sandbox-probe-{uuid.uuid4().hex}"
        r = pool.run(f"open({probe!r}, 'w').write('x')")
        assert r.ok, r  # a private /tmp
        assert not os.path.exists(probe)
        r = pool.run("import os\nprint(os.listdir('/root'))")
        assert r.ok and ".ssh" not in r.stdout
    assert_serving(pool)


@pytest.mark.parametrize(
    "code",
    [
        "def f(n):\n    return f(n + 1)\nf(0)",
        "import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)",
    ],
    ids=["default-limit", "raised-limit"],
)
def test_deep_recursion(pool, code):
    r = pool.run(code)
    # (3.11 keeps Python frames off the C stack: a raised limit runs into memory or time instead)
    assert not r.ok and r.error_type in ("RecursionError", "Crash", "MemoryError", "TimeoutError"), r
    assert_serving(pool)


def test_network_is_unreachable(pool):
    if not pool.isolation["network_isolated"]:
        pytest.skip("this platform gives the sandbox no network namespace (see docs/sandbox.md)")
    r = pool.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=5)")
    # (PermissionError: the syscall filter denies the socket before the empty namespace is reached)
    assert not r.ok and r.error_type in ("OSError", "TimeoutError", "gaierror", "PermissionError"), r
    assert r.duration_s < 5
    r = pool.run("import socket\nprint(socket.getaddrinfo('pypi.org', 443))")
    assert not r.ok, r
    assert_serving(pool)


def test_pool_survives_a_worker_death(pool):
    fut = pool.submit("import time\ntime.sleep(30)")
    deadline = time.monotonic() + 10
    busy = []
    while not busy and time.monotonic() < deadline:  # wait until a worker runs it
        time.sleep(0.1)
        busy = [w for w in pool._workers if w.kind == "light" and w.proc is not None and w.lock.locked()]
    assert busy
    os.kill(busy[0].proc.pid, signal.SIGKILL)
    r = fut.result(timeout=20)
    assert not r.ok and r.error_type == "SandboxError", r
    assert_serving(pool)
    assert all(r.ok for r in pool.run_many(["print(1)"] * 4))


def test_heavy_workers_start_at_their_first_program():
    with SandboxPool(SandboxConfig(workers=2)) as p:
        kinds = {w.kind: [] for w in p._workers}
        for w in p._workers:
            kinds[w.kind].append(w.pid)
        assert all(kinds["light"]) and not any(kinds["heavy"])  # eager: light ones only
        assert p.run("print(1)").stdout == "1\n"
        assert not any(w.pid for w in p._workers if w.kind == "heavy")
        assert p.run("import sympy\nprint(sympy.Integer(6) / 4)").stdout == "3/2\n"
        assert any(w.pid for w in p._workers if w.kind == "heavy")


def test_closed_pool_refuses_work():
    p = SandboxPool(SandboxConfig(), eager=False)
    p.close()
    with pytest.raises(RuntimeError):
        p.submit("print(1)")


# -- the fallback without namespaces (what a normal user gets, plus the root privilege drop) ------


def test_rlimits_only_mode_still_contains():
    cfg = SandboxConfig(timeout_s=TIMEOUT_S, isolation="rlimits", workers=1)
    with SandboxPool(cfg, eager=False) as p:
        assert p.isolation["mode"] == "rlimits"
        ok, loop, flood, exit_ = p.run_many(
            ["print(sum(range(10)))", "while True: pass", "print('y' * 10**7)", "import sys; sys.exit(1)"]
        )
        assert ok.ok and ok.stdout == "45\n"
        assert (
            loop.timed_out and flood.error_type == "OutputLimitExceeded" and exit_.error_type == "SystemExit"
        )
        r = p.run(
            "import subprocess, os\nsubprocess.Popen(['sleep', '100'], start_new_session=True)\nprint(1)"
        )
        assert r.ok
        uid = p.isolation["uid"]
        if uid != 0:
            assert wait_no_processes(uid) == []  # found and killed although it left the group
        assert p.run("print(2)").stdout == "2\n"


# -- the authors' output style --------------------------------------------------------------------

# The program of a released PPM pair (negative side), assembled as the authors' tree did: earlier
# steps joined by newlines, the current step appended.
INDENTATION_STEPS = [
    "\nimport math\n\n# Step 1: Calculate the midpoint M of YZ\n# Since YZ = 16, the coordinates of Y and Z"
    " can be assumed to be (-8, 0) and (8, 0) respectively\n# The midpoint M of YZ will be (0, 0)\n# The"
    " coordinates of X can be assumed to be (0, h) where h is the height from X to YZ\n",
    "\n\n# Step 2: Use the Pythagorean theorem to find the height h\n# In triangle XYM, XY = 12 and YM = 8"
    " (half of YZ)\n# So, h^2 + 8^2 = 12^2\nh_squared = 12**2 - 8**2\nh = math.sqrt(h_squared)\n",
    "\n\n# Step 3: Calculate the length of the median XM\n# The median XM is the distance from X (0, h) to"
    " M (0, 0)\n# So, XM = h\n XM = h\n",
]

ROOTS_PROGRAM = """from sympy import symbols, Eq, solve
x = symbols('x')
f_x = x**2 - 3*x + 2
f_of_f_x = f_x.subs(x, f_x)
roots_f_of_f_x = solve(Eq(f_of_f_x, 0), x)
f_of_f_of_f_x = f_x.subs(x, f_of_f_x)
roots_f_of_f_of_f_x = solve(Eq(f_of_f_of_f_x, 0), x)
print("Roots of f(f(x)) = 0:", len(roots_f_of_f_x))
print("Roots of f(f(f(x))) = 0:", len(roots_f_of_f_of_f_x))
"""


def test_authors_style_reproduces_their_recorded_observations(authors_pool):
    median, degrees, indentation, roots, integer = authors_pool.run_many(
        [
            "import math\nXM = math.sqrt((2 * 12**2 + 2 * 12**2 - 16**2) / 4)\n\n# Now print the final answer\nprint(XM)",
            "import math\nprint(math.degrees(math.acos(1 / 4)))",
            "\n".join(INDENTATION_STEPS[:-1]) + INDENTATION_STEPS[-1],
            ROOTS_PROGRAM,
            "print(2 * 20 * 12)",
        ]
    )
    # Values recorded in the authors' released data (see RSTAR_MATH.md section 7).
    assert median.ok and median.observation() == "8.9443"
    assert degrees.observation() == "75.5225"
    assert not indentation.ok
    assert indentation.observation() == "IndentationError: unexpected indent (<unknown>, line 20)"
    assert roots.observation() == (
        '"Roots of f(f(x: Roots of f(f(x)) = 0: 4\n"Roots of f(f(f(x: Roots of f(f(f(x))) = 0: 8'
    )
    assert integer.observation() == "480"


def test_authors_style_quirks_and_errors(authors_pool):
    lost, value, name, loop = authors_pool.run_many(
        [
            "print('lost')\nx = 5",  # one print, not last: their executor reported only the last statement
            "x = 3\nx * 7",  # a last expression's value is the observation
            "print(y)",
            "while True: pass",
        ]
    )
    assert lost.ok and lost.observation() == ""
    assert value.observation() == "21"
    assert name.observation() == "NameError: name 'y' is not defined"
    assert loop.timed_out
    assert (
        loop.observation()
        == "TimeoutError: 'Execution of the code snippet has timed out for exceeding 2 seconds.'"
    )
    # State does not leak between programs in this style either (theirs shared one namespace).
    assert authors_pool.run_many(["z = 4", "print(z)"])[1].error_type == "NameError"


def test_format_error():
    assert format_error("ValueError", "", "faithful") == "ValueError"
    assert format_error("ValueError", "", "authors") == "ValueError:"
    assert format_error("KeyError", "'a'", "faithful") == "KeyError: 'a'"


# -- one-shot helpers and the CLI -------------------------------------------------------------------


def test_run_code_and_cli(tmp_path: Path, capsys):
    r = run_code("print(sum(range(101)))", SandboxConfig(timeout_s=TIMEOUT_S))
    assert r.ok and r.stdout == "5050\n"
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("for i in range(3):\n    print(i)\n")
    bad.write_text("print('so far')\nraise ValueError('nope')\n")
    assert cli.main(["exec", str(good), "--timeout", "3"]) == 0
    assert capsys.readouterr().out == "0\n1\n2\n"
    assert cli.main(["exec", str(bad), "--memory-mb", "256"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "so far\n" and "ValueError: nope" in captured.err


# --- the syscall filter (sandbox.seccomp) -----------------------------------------------------


def _syscall_program(name: str, args: str) -> str:
    """A program that makes syscall `name` with `args` (Python source) and prints `ret errno`."""
    import pyseccomp

    nr = pyseccomp.resolve_syscall(pyseccomp.system_arch(), name)
    return (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "buf = ctypes.create_string_buffer(4096)\n"
        "s = ctypes.c_char_p\n"
        f"r = libc.syscall({nr}, {args})\n"
        "print(r, ctypes.get_errno())\n"
    )


EPERM, ENOSYS = "1", "38"
# (syscall, arguments): each denied with EPERM by the filter whatever the arguments
DENIED_CALLS = [
    ("socket", "2, 1, 0"),  # AF_INET
    ("socket", "10, 1, 0"),  # AF_INET6
    ("socket", "1, 1, 0"),  # AF_UNIX: host services behind socket files
    ("socket", "16, 3, 0"),  # AF_NETLINK
    ("socket", "17, 3, 0"),  # AF_PACKET
    ("socketpair", "1, 1, 0, buf"),
    ("unshare", "0x10000000"),  # CLONE_NEWUSER
    ("unshare", "0x40000000 | 0x00020000"),  # CLONE_NEWNET | CLONE_NEWNS
    ("setns", "-1, 0"),
    ("clone", "0x10000000 | 17, 0, 0, 0, 0"),  # CLONE_NEWUSER | SIGCHLD
    ("clone", "0x20000000 | 17, 0, 0, 0, 0"),  # CLONE_NEWPID | SIGCHLD
    ("ptrace", "0, 0, 0, 0"),  # PTRACE_TRACEME
    ("process_vm_readv", "1, buf, 1, buf, 1, 0"),
    ("mount", "s(b'none'), s(b'/tmp'), s(b'tmpfs'), 0, 0"),
    ("umount2", "s(b'/tmp'), 0"),
    ("pivot_root", "s(b'.'), s(b'.')"),
    ("chroot", "s(b'/')"),
    ("open_tree", "-100, s(b'/'), 0"),
    ("fsopen", "s(b'tmpfs'), 0"),
    ("bpf", "0, buf, 64"),
    ("keyctl", "0, -3, 0"),
    ("add_key", "s(b'user'), s(b'k'), s(b'v'), 1, -3"),
    ("request_key", "s(b'user'), s(b'k'), 0, 0"),
    ("perf_event_open", "buf, 0, -1, -1, 0"),
    ("kexec_load", "0, 0, 0, 0"),
    ("kexec_file_load", "-1, -1, 0, 0, 0"),
    ("init_module", "buf, 0, s(b'')"),
    ("finit_module", "-1, s(b''), 0"),
    ("delete_module", "s(b'x'), 0"),
    ("userfaultfd", "0"),
    ("io_uring_setup", "1, buf"),
]


@pytest.mark.parametrize("name,args", DENIED_CALLS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DENIED_CALLS)])
def test_syscall_filter_denies_with_eperm(pool, name, args):
    assert pool.isolation["seccomp"].startswith("on"), pool.isolation
    r = pool.run(_syscall_program(name, args))
    assert r.ok and r.stdout.split() == ["-1", EPERM], (name, r)


def test_clone3_is_unavailable_so_glibc_uses_clone(pool):
    r = pool.run(_syscall_program("clone3", "buf, 88"))
    assert r.ok and r.stdout.split() == ["-1", ENOSYS], r


def test_denied_calls_are_python_errors(pool):
    r = pool.run("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/x.sock')")
    assert not r.ok and r.error_type == "PermissionError", r
    r = pool.run("import socket\nsocket.socketpair()")
    assert not r.ok and r.error_type == "PermissionError", r
    assert_serving(pool)


def test_host_unix_socket_is_unreachable(pool):
    """Issue 21's escape: a world-writable socket file of a host service."""
    import socket

    directory = Path("/run") / f"rstar-test-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o755)
    path = directory / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        os.chmod(path, 0o777)
        server.listen(1)
        server.settimeout(0.1)
        code = (
            f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\nprint(s.recv(10))"
        )
        r = pool.run(code)
        assert not r.ok and r.error_type in ("PermissionError", "FileNotFoundError"), r
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def test_math_programs_run_under_the_filter(pool):
    code = (
        "import numpy as np, sympy as sp, threading, os\n"
        "from fractions import Fraction\n"
        "x = sp.symbols('x')\n"
        "print(sp.solve(x**2 - 4, x), np.linalg.det(np.eye(3)), Fraction(1, 3) + Fraction(1, 6))\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    os._exit(3)\n"
        "print('child', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    r = pool.run(code)
    assert r.ok and r.stdout == "[-2, 2] 1.0 1/2\nthread\nchild 3\n", r


def test_ptrace_traceme_then_crash_is_a_crash():
    """Issue 21 (9): with PTRACE_TRACEME the crash stopped the program (its tracer, the worker,
    never looked) and it ran into the wall limit; denied, the crash is a crash."""
    code = (
        "import ctypes, os, signal\n"
        "ctypes.CDLL(None).ptrace(0, 0, 0, 0)\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    with SandboxPool(SandboxConfig(timeout_s=3, light_workers=True, workers=1)) as p:
        r = p.run(code)
    assert not r.ok and r.error_type == "Crash" and "SIGSEGV" in r.error_message, r


def test_without_the_filter_these_calls_go_through():
    """What the filter stops is open without it (so the tests above test the filter)."""
    with SandboxPool(SandboxConfig(timeout_s=TIMEOUT_S, seccomp=False, workers=1)) as p:
        assert p.isolation["seccomp"] == "off"
        for name, args in [
            ("socketpair", "1, 1, 0, buf"),
            ("unshare", "0x10000000"),
            ("ptrace", "0, 0, 0, 0"),
        ]:
            r = p.run(_syscall_program(name, args))
            assert r.ok and r.stdout.split()[0] == "0", (name, r)


# --- the minimal file system (one test per row of docs/sandbox.md's table) --------------------


def test_reads_see_only_the_python_installation(pool):
    if pool.isolation["mode"] != "namespaces":
        pytest.skip("the minimal file system needs the namespace sandbox (root)")
    assert pool.isolation["filesystem"].startswith("minimal"), pool.isolation
    repo = Path(__file__).resolve().parents[1]
    hidden = [
        str(repo / "src"), str(repo / ".git"), str(repo / "tests"), str(Path(__file__).resolve()),
        "/home", "/sys/class/net", "/etc/passwd", "/etc/hostname", "/run", "/var/log", "/root/.bashrc",
        "/proc/1/root/etc/passwd",
    ]  # fmt: skip
    code = f"import os\nfor p in {hidden!r}:\n    print(p, os.path.exists(p))"
    r = pool.run(code)
    assert r.ok, r
    seen = [line for line in r.stdout.splitlines() if line.endswith("True")]
    assert seen == [], seen
    # the host's processes are not in its /proc
    r = pool.run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert r.ok and len(eval(r.stdout)) <= 3, r
    # what programs need is there, read-only
    import sys

    r = pool.run(
        "import sys, os, sqlite3, ctypes, json\n"
        "print(os.path.isdir(sys.prefix), os.path.exists(os.path.realpath(sys.executable)))\n"
        f"open({str(Path(sys.prefix) / 'escaped.txt')!r}, 'w')"
    )
    assert not r.ok and r.stdout == "True True\n" and r.error_type in ("OSError", "PermissionError"), r
    assert_serving(pool)


def test_system_v_ipc_is_private(pool):
    import ctypes

    key = 0x52535400 + (os.getpid() & 0xFF)
    r = pool.run(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"print(libc.shmget({key}, 4096, 0o1000 | 0o666) >= 0)"  # IPC_CREAT
    )
    assert r.ok and r.stdout == "True\n", r
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.shmget(key, 0, 0) == -1  # the host sees no such segment


def test_recursion_past_a_raised_limit_is_a_recursion_error():
    """Issue 21 (9): it read `SystemError: error return without exception set`."""
    code = "import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1) + 1\nf(0)"
    with SandboxPool(SandboxConfig(timeout_s=20, memory_mb=64, workers=1)) as p:
        r = p.run(code)
    assert not r.ok and r.error_type == "RecursionError" and "memory limit of 64 MB" in r.error_message, r


def test_syscalls_of_another_abi_kill_the_program(pool):
    if os.uname().machine != "x86_64":
        pytest.skip("the x32 ABI is an x86_64 matter")
    r = pool.run(
        _syscall_program("socket", "2, 1, 0").replace("libc.syscall(41,", "libc.syscall(41 | 0x40000000,")
    )
    assert not r.ok and r.error_type == "Crash" and "SIGSYS" in r.error_message, r
    assert_serving(pool)
