"""Where worker processes run: off the CPU the host's scheduler thread is on.

On a machine with few cores, a worker woken by a submit, or one still
copying, lands on the scheduler's CPU and keeps it for a time slice: the
host stalls for milliseconds in the middle of a call (issue 18 measured a
``submit_store`` p99 of 1-10 ms on 2 vCPUs). With ``worker_cpus`` left
empty, the workers may run on every CPU the host may use but the one the
thread that calls ``get_finished()`` was last seen on. That thread is not
pinned (the host's affinity is its own business), so the workers follow it:
it is looked at every ``LOOK_SECONDS`` in ``get_finished()``, and once it
has been seen on another CPU twice in a row, every thread of every ready
worker is moved off it. A host that hops back and forth (another busy
process beside it) moves nothing. A worker (a replacement too) is placed by
the host as soon as it is spawned, off the CPU avoided then. Placement is a
hint: a sandbox that refuses ``sched_setaffinity``, or a cpuset that no
longer has the CPUs, fails no call and no worker. With one CPU, or with
``worker_cpus`` given (which each worker applies itself), nothing is moved.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

LOOK_SECONDS = 0.1  # how often the scheduler thread's CPU is looked at

_sched_getcpu = ctypes.CDLL(None).sched_getcpu


def current_cpu() -> int:
    """The CPU the calling thread runs on now (-1 if the kernel cannot say)."""
    return int(_sched_getcpu())


class Placement:
    """Every CPU the host may use but the scheduler thread's; ``allowed`` empty (``worker_cpus`` given, or
    the threads engine): never moves a worker."""

    def __init__(self, allowed: set[int]):
        self.allowed = frozenset(allowed)  # the CPUs the host may use
        self.avoid = current_cpu()  # the scheduler thread's CPU, which no worker uses
        self._seen = self.avoid  # where the scheduler thread was at the last look
        self._next_look = 0.0  # monotonic time of the next look
        self._placed: dict[int, int] = {}  # pid -> the CPU avoided when its threads were last moved

    @property
    def following(self) -> bool:
        """Whether workers are placed at all: the host may use more than one CPU, and ``worker_cpus`` is empty."""
        return len(self.allowed) > 1

    @property
    def cpus(self) -> frozenset[int]:
        """The CPUs a worker may run on now."""
        return self.allowed - {self.avoid}

    def started(self, pid: int) -> None:
        """A worker process just spawned: off the scheduler thread's CPU as it is now, before its
        interpreter's start-up (tens of ms of CPU) runs; from the host, so a refusal fails nothing. Once
        ready, with all its lanes, ``follow`` moves it once more."""
        if self.following:
            _move(pid, self.cpus)

    def follow(self, ready_pids: Callable[[], list[int]], now: float) -> None:
        """Called by the scheduler thread: move the ready workers off its CPU, if it changed. ``ready_pids``
        is asked only when it is time to look: most calls are between looks, and cost only the clock."""
        if now < self._next_look or not self.following:
            return
        self._next_look = now + LOOK_SECONDS
        ready = ready_pids()
        here = current_cpu()
        if here != self.avoid and here == self._seen and here in self.allowed:
            self.avoid = here
        self._seen = here
        cpus = self.cpus
        self._placed = {pid: avoided for pid, avoided in self._placed.items() if pid in ready}
        for pid in ready:
            if self._placed.get(pid) != self.avoid:
                _move(pid, cpus)
                self._placed[pid] = self.avoid


def _move(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (affinity belongs to a thread); one gone meanwhile is skipped."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread ended, or a sandbox forbids it: placement is a hint, never a failure
