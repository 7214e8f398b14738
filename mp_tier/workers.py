"""One worker as the host sees it: started, watched through an fd, stopped, and explained when it dies.

A process worker is the host's own child, spawned as a fresh interpreter
with ``posix_spawn`` (vfork+exec, so even a host of many GiB starts one
cheaply, and no error pipe that a child forked meanwhile by another host
thread could hold open: ``subprocess`` waits on one). Its liveness is judged
by the process itself, through a pidfd, never by a forkserver or a poll that a
third process could answer wrongly. A host may reap its children itself
(SIGCHLD set to SIG_IGN, or a handler that calls ``waitpid(-1)``): the
pidfd still says when the worker ended, and a worker someone else reaped
is simply gone, its exit status unknown. A thread worker signals its end by writing to a pipe, so the host
watches both kinds in the same ``poll`` set. A thread cannot be killed: one the host gives up on (stuck on a
hung mount) may run on, so what it uses stays open until it has ended (``abandon``, ``Users``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import threading
from collections.abc import Callable

from . import interpreter, stdio
from .channels import close_fds

log = logging.getLogger(__name__)


def _named_limit(e: OSError, highest_fd: int) -> OSError:
    """A spawn's failure, naming the limit a shortage of fds or processes hit and how to raise it."""
    if e.errno == errno.EBADF and highest_fd >= (limit := resource.getrlimit(resource.RLIMIT_NOFILE)[0]):
        # the child cannot have fds past the limit
        return OSError(errno.EMFILE, f"too many open files: RLIMIT_NOFILE {limit} is below the worker's fds; raise it (ulimit -n)")
    if e.errno == errno.EMFILE:
        return OSError(e.errno, f"too many open files: RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; raise it (ulimit -n)")
    if e.errno == errno.EAGAIN:
        return _out_of_tasks("process")
    return e


def _out_of_tasks(what: str) -> OSError:
    """EAGAIN for a process or a thread that could not start: both count against the same limits."""
    limit = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    return OSError(
        errno.EAGAIN,
        f"cannot start another {what}: this user's RLIMIT_NPROC is {'unlimited' if limit < 0 else limit} (raise it: "
        "ulimit -u), or the system's or the cgroup's process limit is reached",
    )


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    if code == 1:
        return "exit status 1 (an uncaught Python error: its traceback is on the host's stderr)"
    return f"exit status {code}"


class ProcessWorker:
    """A worker process; ``death_fd`` becomes readable once it has exited."""

    killable = True

    def __init__(self, index: int, argv: list[str], pass_fds: tuple[int, ...]):
        """Start the command line ``argv`` with ``pass_fds`` inherited (the worker closes any other fd it finds open)."""
        inherit = [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in pass_fds]  # dup2 onto itself clears close-on-exec
        stdin = (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
        self.index = index
        try:
            self.pid = os.posix_spawn(argv[0], argv, interpreter.environment(), file_actions=[*inherit, stdin])
        except OSError as e:
            raise _named_limit(e, max(pass_fds)) from None
        try:
            # A child reaped this soon was one that could not even start; its pid cannot be reused this soon.
            self.death_fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise OSError(errno.ESRCH, f"worker {index} (pid {self.pid}) exited at once, and the host reaped it") from None
        except OSError:
            os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):  # the host reaps its children itself
                os.waitpid(self.pid, 0)
            raise
        log.debug("worker %d started: pid %d", index, self.pid)

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.death_fd, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it has exited already

    def reap(self) -> str:
        """Collect the exited worker; returns why it exited.

        Waits on the pidfd, not the pid: a pid another reaper freed may
        already name another child of the host.
        """
        try:
            info = os.waitid(os.P_PIDFD, self.death_fd, os.WEXITED)
            assert info is not None  # without WNOHANG
            why = _describe_exit(info.si_status if info.si_code == os.CLD_EXITED else -info.si_status)
        except ChildProcessError:
            why = "exit status unknown (the host reaped it: SIGCHLD ignored, or a handler that waits for every child)"
        finally:
            self._close()
        return f"worker {self.index} (pid {self.pid}) died: {why}"

    def abandon(self) -> tuple[int, ...]:
        """Forget the worker without touching it (a forked child of the host does this); nothing of it stays open."""
        self._close()
        return ()

    def _close(self) -> None:
        fd, self.death_fd = self.death_fd, -1  # marked closed before it is: see channels.close_fds
        close_fds(fd)


class Users:
    """Who still uses the fds a pool shares with its worker threads: the pool, and each thread begun and not
    yet ended. The last to let go runs ``last`` (the fds close), then whatever waits for that (``after``)."""

    def __init__(self, last: Callable[[], None]):
        self._count = 1  # the pool, and each worker thread begun and not yet ended
        self._lock = threading.Lock()
        self._last = last
        self._after: list[Callable[[], None]] = []  # run once the last user has let go

    def enter(self) -> bool:
        """A worker thread as it begins: one more user, unless all let go (it was given up on before it
        began): it touches nothing then."""
        with self._lock:
            if self._count:
                self._count += 1
            return self._count > 0

    def let_go(self) -> None:
        with self._lock:
            self._count -= 1
            last = self._count == 0
        if last:
            self._last()
            with self._lock:
                after, self._after = self._after, []
            for run in after:
                run()

    def after(self, run: Callable[[], None]) -> None:
        """Run ``run`` once every user has let go (now, if all have)."""
        with self._lock:
            if self._count:
                self._after.append(run)
                return
        run()


class ThreadWorker:
    """A worker thread of the host (the ``threads`` engine); ``death_fd`` becomes readable once it has ended.

    ``enter`` runs first in the thread and ``on_exit`` last: the fds it was given (the pool's) must stay open
    from one to the other, since a thread the host stopped waiting for still uses them, and a number closed
    under it could be the host's next file or pipe. ``enter`` False: they are closed already, and it ends.
    A ``target`` that raises BrokenPipeError ends quietly: nobody reads what it would report (``run_worker``).
    """

    killable = False
    pid = None

    def __init__(self, index: int, target: Callable[[], None], name: str, enter: Callable[[], bool], on_exit: Callable[[], None]):
        self.index = index
        try:  # past 2: a host's stray print to a closed stdout must not read as the thread's end
            self.death_fd, self._end = stdio.pipe()
        except OSError as e:  # EMFILE names the limit, as a worker process's spawn does
            raise _named_limit(e, -1) from None
        self._enter = enter
        self._on_exit = on_exit
        # its end passed in: the attribute is marked closed (-1) once the thread is abandoned, the fd stays open
        self._thread = threading.Thread(target=self._run, args=(target, self._end), name=name, daemon=True)

    def start(self) -> None:
        """OSError (EAGAIN, as a worker process's spawn): the thread could not start (its pipe is closed). After
        any other exception (a signal handler's, while ``Thread.start`` waits for the thread to begin) it may
        run, as if started."""
        try:
            self._thread.start()
        except RuntimeError:  # "can't start new thread": no errno, for the same limits a spawn hits
            self._close()
            raise _out_of_tasks("thread") from None

    def _run(self, target: Callable[[], None], end: int) -> None:
        if not self._enter():
            return
        try:
            target()
        except BrokenPipeError:
            log.debug("worker thread %d ends: the tier shut down, and reads no more of its completions", self.index)
        except BaseException:
            log.exception("worker thread %d failed", self.index)
            raise
        finally:
            os.write(end, b"\0")  # never closed here: a reader is open until whoever outlives the thread closes both
            self._on_exit()

    def kill(self) -> None:
        raise NotImplementedError("a worker thread cannot be killed")

    def reap(self) -> str:
        self._thread.join()
        self._close()
        return f"worker thread {self.index} ended"

    def _close(self) -> None:
        """One at a time, each marked closed before it is: see channels.close_fds."""
        fd, self.death_fd = self.death_fd, -1
        close_fds(fd)
        fd, self._end = self._end, -1
        close_fds(fd)

    def abandon(self) -> tuple[int, ...]:
        """Forget the thread without waiting: it may still run, and write its end to the pipe it returns, which
        the caller closes once ``on_exit`` has run."""
        fds, self.death_fd, self._end = (self.death_fd, self._end), -1, -1
        return fds


Worker = ProcessWorker | ThreadWorker
