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

A signal handler may close a cache at any instant, also while its thread is
inside ``guard`` or ``release`` (creating or closing another): as with the
tier (``reentry``), it never waits for the lock its own thread holds.
"""

from __future__ import annotations

import collections
import os
import resource
import select
import signal
import sys
import threading

from . import interpreter, stdio
from .reentry import inside_a_call

SHM_DIR = "/dev/shm"


class _Janitor:
    """The running janitor: our child, watched through a pidfd, told through the pipe on its stdin.

    Spawned with ``posix_spawn``, not ``subprocess``: a Popen still running at
    interpreter exit prints a ResourceWarning (a traceback under ``-W error``),
    and this child must outlive the exit to do its work.
    """

    def __init__(self) -> None:
        read, self.pipe = stdio.pipe()  # past 2: a host's stray print to a closed stdout would run into a word
        try:
            # Its own session: a signal to the creator's process group (systemd's stop, a shell's kill) leaves it be.
            argv = interpreter.command("mp_tier.janitor")
            self.pid = os.posix_spawn(argv[0], argv, interpreter.environment(), file_actions=[(os.POSIX_SPAWN_DUP2, read, 0)], setsid=True)
        except BaseException:
            os.close(self.pipe)
            raise
        finally:
            os.close(read)
        try:
            self.pidfd = os.pidfd_open(self.pid)  # our child, not yet waited for: the pid is still its own
        except ProcessLookupError:
            self.pidfd = -1  # reaped already (a host that ignores SIGCHLD): it died at once

    def alive(self) -> bool:
        if self.pidfd < 0:
            return False
        exited = select.poll()  # not select(): a host with a thousand fds gives fd numbers past FD_SETSIZE
        exited.register(self.pidfd, select.POLLIN)
        return not exited.poll(0)

    def write(self, text: str) -> bool:
        """Tell it ``text``; False if it has died."""
        data = text.encode()
        try:
            while data and self.alive():
                data = data[os.write(self.pipe, data) :]
        except BrokenPipeError:
            pass
        return not data

    def forget(self) -> None:
        """Let go of a dead janitor (collecting it unless the host already did) or, in a forked child, the parent's."""
        os.close(self.pipe)
        if self.pidfd >= 0:
            try:
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                pass  # not ours to collect: the host reaped it, or this is a forked child of its creator
            os.close(self.pidfd)


_lock = threading.RLock()
_janitor: _Janitor | None = None  # this process's janitor, started with its first segment
_names: set[str] = set()  # segments it guards, to tell a replacement janitor after a restart
_pending: collections.deque[str] = collections.deque()  # lines not yet told (a handler's wait here for the call it interrupted)


def _tell(line: str) -> None:
    """Record ``line`` and tell the janitor (starting one if there is none or it died).

    A signal handler (or a finalizer run by the garbage collector) that
    interrupted this very function on the same thread must not wait for the
    lock its own thread holds: it leaves the line for the interrupted call,
    which tells it before returning. Only another thread ever waits here.
    """
    _pending.append(line)
    if inside_a_call(_lock):
        return
    with _lock:  # taken even if another thread took the line meanwhile: it is told once this returns
        _flush()
    while _pending:  # left by a handler that ran as the lock was let go
        with _lock:
            _flush()


def _flush() -> None:
    """Tell the janitor every pending line; one that died (or none yet) gives way to a new one told every name."""
    global _janitor
    told = []
    while _pending:
        line = _pending.popleft()
        (_names.add if line.startswith("+") else _names.discard)(line[1:])
        told.append(f"{line}\n")
    if _janitor is not None and _janitor.write("".join(told)):
        return
    if _janitor is not None:  # it died: start another, told every name
        _janitor.forget()
    _janitor = _Janitor()
    _janitor.write("".join(f"+{name}\n" for name in _names))


def guard(name: str) -> None:
    """Have ``name`` unlinked if this process dies before it does so itself. Call before creating it."""
    _tell(f"+{name}")


def release(name: str) -> None:
    """This process unlinked ``name`` itself."""
    _tell(f"-{name}")


def _forget_in_child() -> None:
    """In a forked child: drop the parent's janitor pipe without a word, so only the parent holds it."""
    global _janitor, _lock
    _lock = threading.RLock()  # a thread of the parent may have held it; no such thread exists here
    if _janitor is not None:
        _janitor.forget()  # the parent's child, not ours: never waited for here
    _janitor = None
    _names.clear()
    _pending.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def main() -> None:
    """Read ``+name``/``-name`` lines until end-of-file, then unlink what is left."""
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # for the creator: this one cleans up after it
        signal.signal(stop, signal.SIG_IGN)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # the host's fds it left inheritable: not ours to hold
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
