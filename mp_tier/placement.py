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
process beside it) moves nothing. With one CPU, or with ``worker_cpus``
given, nothing is ever moved.
"""

from __future__ import annotations

import ctypes
import os

LOOK_SECONDS = 0.1  # how often the scheduler thread's CPU is looked at

_sched_getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu


def current_cpu() -> int:
    """The CPU the calling thread runs on now (-1 if the kernel cannot say)."""
    return int(_sched_getcpu())


class Placement:
    """The workers' CPUs: fixed, or every allowed CPU but the scheduler thread's."""

    def __init__(self, fixed: list[int], allowed: set[int]):
        self.fixed = tuple(sorted(fixed))  # worker_cpus as configured: never moved
        self.allowed = frozenset(allowed)  # the CPUs the host may use
        self.avoid = current_cpu()  # the scheduler thread's CPU, which no worker uses
        self._seen = self.avoid  # where the scheduler thread was at the last look
        self._next_look = 0.0  # monotonic time of the next look
        self._placed: dict[int, int] = {}  # pid -> the CPU avoided when its threads were last moved

    @property
    def following(self) -> bool:
        return not self.fixed and len(self.allowed) > 1 and self.avoid in self.allowed

    def cpus(self) -> tuple[int, ...]:
        """The CPUs a worker may run on now."""
        if not self.following:
            return self.fixed
        return tuple(sorted(self.allowed - {self.avoid}))

    def follow(self, ready: list[int], now: float) -> None:
        """Called by the scheduler thread: move the workers (pids ``ready``) off its CPU, if it changed."""
        if now < self._next_look or not self.following:
            return
        self._next_look = now + LOOK_SECONDS
        here = current_cpu()
        if here != self.avoid and here == self._seen and here in self.allowed:
            self.avoid = here
        self._seen = here
        cpus = set(self.cpus())
        self._placed = {pid: avoided for pid, avoided in self._placed.items() if pid in ready}
        for pid in ready:
            if self._placed.get(pid) != self.avoid:
                _move(pid, cpus)
                self._placed[pid] = self.avoid


def _move(pid: int, cpus: set[int]) -> None:
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
