"""The pool <-> worker protocol: a 4-byte big-endian length, then UTF-8 JSON, on a pipe."""

from __future__ import annotations

import json
import math
import os
import select
import struct
import time


def send_frame(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def recv_frame(fd: int, deadline: float | None = None) -> dict:
    (n,) = struct.unpack(">I", read_exact(fd, 4, deadline))
    return json.loads(read_exact(fd, n, deadline))


def read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    poller = select.poll()  # not select(): the search process may hold descriptors past 1024
    poller.register(fd, select.POLLIN)
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
                raise TimeoutError("no answer from the sandbox worker")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError("sandbox worker closed its pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
