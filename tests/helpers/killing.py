"""Kill -9 a real subprocess at a chosen moment: the resume tests' shared first half."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable


def run_until_then_kill(
    cmd: list[str],
    ready: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.05,
    started: list | None = None,
    **popen: object,
) -> None:
    """Start `cmd`, wait until `ready()` holds (the process must still be running, and it
    must happen within `timeout_s`), then SIGKILL it. The process never outlives the call;
    it is appended to `started` if given (a caller in another thread can kill it early)."""
    proc = subprocess.Popen(cmd, **popen)
    if started is not None:
        started.append(proc)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, "the process ended before it could be killed"
            assert time.monotonic() < deadline, f"not ready to be killed after {timeout_s} s"
            time.sleep(poll_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
