"""What each worker holds: a small shared array the host reads when a worker dies.

Per worker two slots for each of its lanes (a worker process runs
``io_depth`` lanes, threads that each serve tasks, so several tasks' I/O is in
flight at once): ``MAIN`` for the task the lane's loop took, ``NESTED`` for a
load it serves in the middle of a store. Lane 0's ``MAIN`` slot also says
whether the worker is ready. A slot holds a task's seq, or
``STARTING`` (the worker is not ready yet), ``IDLE``, or ``CLAIMING``; beside
it, the CLOCK_MONOTONIC time (ns, the same clock in every process) at which
the seq was named (or its claim began, or the host started the worker), for
``task_timeout`` and for pacing restarts.

The claim protocol: a worker writes ``CLAIMING`` before it reads a task
pipe, and after the read writes, in one store, the seq it got or ``IDLE``.
A pipe read removes a frame under the pipe's lock, which orders it with the
host's own reads of the pipe. So once the host has emptied the pipes and no
live worker is ``CLAIMING``, every task that left a pipe is named in a live
worker's slot, done, or was held by a dead one: nothing is guessed. A slot
never reads ``IDLE`` while its worker holds a task it has not named.

Each value is one aligned 8-byte store, which no reader sees half-written.
"""

from __future__ import annotations

import mmap
import os
import time

IDLE = -1
STARTING = -2
CLAIMING = -3
MAIN = 0
NESTED = 1
_PER_LANE = 2
_FIELDS = 2  # seq, named-at ns
_ITEM = 8


class Slots:
    """The slots of ``n_workers`` workers of ``lanes`` lanes each, in a memfd the workers map through ``fd``."""

    def __init__(self, n_workers: int, lanes: int = 1, fd: int | None = None):
        self._per_worker = lanes * _PER_LANE
        size = n_workers * self._per_worker * _FIELDS * _ITEM
        self.n_workers = n_workers
        self.fd = os.memfd_create("mp_tier-slots", os.MFD_CLOEXEC) if fd is None else fd
        try:
            if fd is None:
                os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            if fd is None:
                os.close(self.fd)
            raise
        self._words = memoryview(self._map).cast("q")

    def _at(self, worker: int, slot: int) -> int:
        return (worker * self._per_worker + slot) * _FIELDS

    def _all(self, worker: int) -> list[int]:
        return [self._at(worker, slot) for slot in range(self._per_worker)]

    # -- the worker's side ---------------------------------------------------

    def set(self, worker: int, slot: int, value: int, lane: int = 0) -> None:
        """Name ``value`` (a seq, IDLE, STARTING or CLAIMING) in a lane's slot; all but IDLE also record when."""
        at = self._at(worker, lane * _PER_LANE + slot)
        if value != IDLE:
            self._words[at + 1] = time.monotonic_ns()
        self._words[at] = value

    # -- the host's side -----------------------------------------------------

    def reset(self, worker: int) -> None:
        """A worker about to start: STARTING until it says it is ready."""
        for at in self._all(worker):
            self._words[at] = IDLE
        self.set(worker, MAIN, STARTING)

    def starting(self, worker: int) -> bool:
        return self._words[self._at(worker, MAIN)] == STARTING

    def starting_since(self, worker: int) -> int | None:
        """When (monotonic ns) ``worker`` was started, if it is not ready yet."""
        at = self._at(worker, MAIN)
        return self._words[at + 1] if self._words[at] == STARTING else None

    def claiming(self, worker: int) -> bool:
        return any(self._words[at] == CLAIMING for at in self._all(worker))

    def claimed_since(self, worker: int) -> int | None:
        """When (monotonic ns) ``worker`` began the claim it is in, if it is in one."""
        times = [self._words[at + 1] for at in self._all(worker) if self._words[at] == CLAIMING]
        return min(times, default=None)

    def held(self, worker: int) -> list[tuple[int, int]]:
        """(seq, named-at ns) of the tasks ``worker`` holds."""
        return [(self._words[at], self._words[at + 1]) for at in self._all(worker) if self._words[at] >= 0]

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # marked closed before it is: see channels.close_fds
        if fd < 0:
            return
        self._words.release()
        self._map.close()
        os.close(fd)
