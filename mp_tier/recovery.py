"""What follows a worker death: which tasks to retry or fail, when to replace the worker, when to give up.

Pure bookkeeping: the coordinator reports facts (a worker died, while
starting or not; these tasks were lost; this task completed) and applies the
answers. A lost task is sent again once; lost a second time, its job fails.
A worker that dies before it is ready is replaced after a back-off that
doubles each time; the tier breaks only when workers keep dying at start for
a whole window and no worker is left to serve, so a few unlucky kills never
break it and a host that cannot start workers at all learns so in seconds.

A worker that cannot even be spawned for lack of a resource (fds,
processes, memory) did not die: that shortage passes. It is retried with
the same back-off for as long as it lasts, never breaking the tier, while
the workers alive serve; only when no worker process has been up for
``start_timeout`` do the jobs waiting fail, with the shortage's errno.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

from .codes import ErrorCode
from .messages import Task

MAX_STARTUP_DEATHS = 5  # in a row, and
STARTUP_WINDOW_SECONDS = 2.0  # for at least this long, before the tier breaks
BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 1.0
# Replacements boot at most this many at once. A boot is ~50 ms of CPU, and a spawn returns
# only once its child has exec'd: 32 replaced at once on 2 cores held one get_finished() for
# 0.8 s. A worker counts as booting for BOOT_SECONDS at most, so a stopped one blocks no others.
BOOTING_AT_ONCE = 2
BOOT_SECONDS = 5.0
RESTART_RECHECK_SECONDS = 0.01
# A spawn that failed with one of these may work once the resource is back (RLIMIT_NOFILE,
# RLIMIT_NPROC or a pid/cgroup limit, memory); any other failure (no interpreter) is a death at start.
SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
# A claim takes microseconds; a worker still claiming after this is stopped, and is killed.
CLAIM_SETTLE_SECONDS = 0.2


class Settling(NamedTuple):
    """A death being settled: the tasks taken back from the pipes, and the ones a dead worker may have held."""

    queued: list[Task]  # taken back from the pipes; sent again once settled
    suspects: set[int]  # seqs that had left the pipes when the death was seen
    deadline: float  # when a worker still claiming is killed
    reasons: list[str]  # why each worker died, for the failed results
    overdue: list[bool]  # per death: whether the tier killed that worker for a deadline (task_timeout, start_timeout)


class Verdict(NamedTuple):
    retry: list[int]
    fail: list[int]


class Recovery:
    """Retries, replacements and the broken state of one tier."""

    def __init__(self) -> None:
        self.retried: set[int] = set()  # seqs lost once and sent again: a second loss fails them
        self.timed_out: set[int] = set()  # seqs whose worker was killed for outliving task_timeout
        self.overdue_kills: set[int] = set()  # worker indices killed for outliving task_timeout, deaths not yet seen
        self.stalled_starts: set[int] = set()  # worker indices killed for not starting within start_timeout, deaths not yet seen
        self.restart_at: dict[int, float] = {}  # worker index -> monotonic time its replacement may start
        self.startup_deaths = 0  # workers in a row that died before they were ready (or could not start)
        self.first_startup_death = 0.0  # monotonic time of the first of them
        self.broken: str | None = None  # why the tier gave up, once it has
        self.shortage: OSError | None = None  # the last spawn that failed for lack of a resource, until one succeeds
        self.failed_spawns = 0  # in a row, for lack of a resource
        self.unserved_since: float | None = None  # when the tier was first seen with no worker process in a shortage

    def died(self, index: int, while_starting: bool, now: float, reason: str, serving: bool) -> float:
        """Schedule the replacement of worker ``index``; return its delay. May break the tier, if no worker is ``serving``."""
        if not while_starting:
            self.startup_deaths = 0
            self.restart_at[index] = now
            return 0.0
        if self.startup_deaths == 0:
            self.first_startup_death = now
        self.startup_deaths += 1
        window = now - self.first_startup_death
        if self.startup_deaths >= MAX_STARTUP_DEATHS and window >= STARTUP_WINDOW_SECONDS and not serving:
            self.broken = f"{self.startup_deaths} workers in a row died while starting over {window:.1f} s; last: {reason}"
        return self._retry(index, now, self.startup_deaths)

    def spawn_failed(self, index: int, error: OSError, now: float, reason: str, serving: bool) -> float:
        """Worker ``index`` could not be spawned: retry it after a back-off; a cause that does not pass is a death at start."""
        if error.errno not in SHORTAGES:
            return self.died(index, True, now, reason, serving)
        self.shortage = error
        self.failed_spawns += 1
        return self._retry(index, now, self.failed_spawns)

    def spawned(self) -> int:
        """A worker was spawned: any shortage is over; returns how many spawns in a row it had failed."""
        failed, self.failed_spawns, self.shortage = self.failed_spawns, 0, None
        return failed

    def unserved(self, now: float, workers_up: bool, limit: float) -> OSError | None:
        """The shortage that has left the tier without any worker process for ``limit`` seconds, if one has."""
        if workers_up or self.shortage is None:
            self.unserved_since = None
            return None
        if self.unserved_since is None:
            self.unserved_since = now
        return self.shortage if now - self.unserved_since >= limit else None

    def _retry(self, index: int, now: float, tries: int) -> float:
        delay = min(BACKOFF_FIRST_SECONDS * 2.0 ** (tries - 1), BACKOFF_MAX_SECONDS)
        self.restart_at[index] = now + delay
        return delay

    def due(self, now: float, room: int) -> list[int]:
        """Up to ``room`` workers whose replacement may start now (taken off the schedule)."""
        ready = [index for index, at in self.restart_at.items() if at <= now][: max(room, 0)]
        for index in ready:
            del self.restart_at[index]
        return ready

    def next_restart(self) -> float | None:
        return min(self.restart_at.values(), default=None)

    def lost(self, seqs: list[int]) -> Verdict:
        """Tasks a dead worker held: the ones lost for the first time are retried, the others fail."""
        retry = [seq for seq in seqs if seq not in self.retried]
        self.retried.update(retry)
        return Verdict(retry, [seq for seq in seqs if seq in self.retried and seq not in retry])

    def completed(self, seq: int) -> None:
        self.retried.discard(seq)
        self.timed_out.discard(seq)

    def failure_code(self, seq: int) -> ErrorCode:
        """Why a task lost twice failed: its deadline passed, or its worker died."""
        return "ETIMEDOUT" if seq in self.timed_out else "EOWNERDEAD"
