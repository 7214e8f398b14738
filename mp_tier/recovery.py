"""What follows a worker death: which tasks to retry or fail, when to replace the worker, when to give up.

Pure bookkeeping: the coordinator reports facts (a worker died, while
starting or not; these tasks were lost; this task completed) and applies the
answers. A lost task is sent again once; lost a second time, its job fails.
A worker that dies before it is ready is replaced after a back-off that
doubles each time; the tier breaks only when workers keep dying at start for
a whole window, so a few unlucky kills never break it and a host that cannot
start workers at all learns so in seconds.
"""

from __future__ import annotations

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

    def died(self, index: int, while_starting: bool, now: float, reason: str) -> float:
        """Schedule the replacement of worker ``index``; return its delay. May break the tier."""
        if not while_starting:
            self.startup_deaths = 0
            self.restart_at[index] = now
            return 0.0
        if self.startup_deaths == 0:
            self.first_startup_death = now
        self.startup_deaths += 1
        if self.startup_deaths >= MAX_STARTUP_DEATHS and now - self.first_startup_death >= STARTUP_WINDOW_SECONDS:
            self.broken = (
                f"{self.startup_deaths} workers in a row died while starting over "
                f"{now - self.first_startup_death:.1f} s; last: {reason}"
            )
        delay = min(BACKOFF_FIRST_SECONDS * 2.0 ** (self.startup_deaths - 1), BACKOFF_MAX_SECONDS)
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
