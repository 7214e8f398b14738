"""The host's fds 0-2, which none of the tier's fds may take.

A daemon may close its stdin, stdout and stderr and go on printing:
``sys.stdout`` and ``sys.stderr`` still write to fds 1 and 2. The tier's
next fds would take those numbers, the lowest free ones: a stray write to
stderr landed in block 0 of the KV cache, one to stdout in the janitor's
pipe, running into its next word. A worker process is also given
``/dev/null`` as its stdin (fd 0), in place of whatever was passed there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


def above(fd: int) -> int:
    """``fd``, moved past 2 (and closed there) if it took one of those numbers."""
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose two ends are past 2; nothing is left open if it cannot be made."""
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        read = above(read)
    except OSError:
        os.close(write)
        raise
    try:
        return read, above(write)
    except OSError:
        os.close(read)
        raise


def hold(fds: list[int]) -> list[int]:
    """``/dev/null`` on each of fds 0-2 the host has closed, also listed in ``fds``, for the caller to close
    once it has made its own fds (or a child forked meanwhile, with ``fds``): none of those takes such a number."""
    held = []
    while (fd := os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)) < 3:
        fds.append(fd)
        held.append(fd)
    os.close(fd)
    return held


@contextlib.contextmanager
def held() -> Iterator[None]:
    """``hold`` while the ``with`` makes fds it cannot move itself (``mmap`` keeps a copy of the file's fd)."""
    fds: list[int] = []
    try:
        hold(fds)
        yield
    finally:
        for fd in fds:
            os.close(fd)
