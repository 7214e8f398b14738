"""The janitor: a small process that unlinks the segments of a creator that died.

A creator killed by SIGKILL cannot unlink its /dev/shm segments, so each
creating process has one janitor child that learns the name of every segment
before it is created (``+name``) and forgets it once the creator unlinked it
(``-name``). When the pipe from its creator reaches end-of-file, the creator
is gone, and the janitor unlinks what is left and exits.

It plays the part of multiprocessing's resource tracker with one difference
that matters here: only the creating process holds the pipe. It runs in a
session of its own and ignores the signals a service manager sends a whole
group, so it outlives its creator long enough to clean up; one killed on its
own is replaced when the creator next creates or closes a segment. A forked child
closes its copy at once (``os.register_at_fork``), so a child that outlives
its parent never keeps the parent's segments alive, and it never unlinks
anything itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from . import interpreter

SHM_DIR = "/dev/shm"

_lock = threading.Lock()
_janitor: subprocess.Popen[bytes] | None = None  # this process's janitor, started with its first segment
_pipe = -1  # the write end of its stdin; only the process that started it holds it
_names: set[str] = set()  # segments it guards, to tell a replacement janitor after a restart


def _start() -> None:
    global _janitor, _pipe
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        # Its own session: a signal to the creator's process group (systemd's stop, a shell's kill) leaves it be.
        _janitor = subprocess.Popen(
            interpreter.command("mp_tier.janitor"), stdin=read, close_fds=True, env=interpreter.environment(), start_new_session=True
        )
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    _pipe = write
    _write("".join(f"+{name}\n" for name in _names))


def _write(text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(_pipe, data) :]


def _tell(line: str) -> None:
    global _janitor, _pipe
    with _lock:
        (_names.add if line.startswith("+") else _names.discard)(line[1:])
        if _janitor is not None and _janitor.poll() is not None:  # it died: start another, told every name
            os.close(_pipe)
            _janitor = None
        if _janitor is None:
            _start()  # tells it every name, this one included
        else:
            _write(f"{line}\n")


def guard(name: str) -> None:
    """Have ``name`` unlinked if this process dies before it does so itself. Call before creating it."""
    _tell(f"+{name}")


def release(name: str) -> None:
    """This process unlinked ``name`` itself."""
    _tell(f"-{name}")


def _forget_in_child() -> None:
    """In a forked child: drop the parent's janitor pipe without a word, so only the parent holds it."""
    global _janitor, _pipe, _lock
    _lock = threading.Lock()  # a thread of the parent may have held it; no such thread exists here
    if _janitor is not None:
        os.close(_pipe)
        _janitor.returncode = 0  # the parent's child, not ours: never wait for it
    _janitor, _pipe = None, -1
    _names.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def main() -> None:
    """Read ``+name``/``-name`` lines until end-of-file, then unlink what is left."""
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # for the creator: this one cleans up after it
        signal.signal(stop, signal.SIG_IGN)
    names: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.decode().rstrip("\n")
        if line.startswith("+"):
            names.add(line[1:])
        elif line.startswith("-"):
            names.discard(line[1:])
    for name in names:
        try:
            os.unlink(f"{SHM_DIR}/{name}")
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
