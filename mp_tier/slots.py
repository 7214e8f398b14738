"""What each worker holds: a small shared array the host reads when a worker dies.

Per worker two slots: ``MAIN`` for the task its loop took, ``NESTED`` for a
load it serves in the middle of a store. A slot holds a task's seq, or
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
_SLOTS = 2
_FIELDS = 2  # seq, named-at ns
_ITEM = 8


class Slots:
    """The slots of ``n_workers`` workers, in a memfd the workers map through ``fd``."""

    def __init__(self, n_workers: int, fd: int | None = None):
        size = n_workers * _SLOTS * _FIELDS * _ITEM
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
        return (worker * _SLOTS + slot) * _FIELDS

    # -- the worker's side ---------------------------------------------------

    def set(self, worker: int, slot: int, value: int) -> None:
        """Name ``value`` (a seq, IDLE, STARTING or CLAIMING) in a slot; all but IDLE also record when."""
        at = self._at(worker, slot)
        if value != IDLE:
            self._words[at + 1] = time.monotonic_ns()
        self._words[at] = value

    # -- the host's side -----------------------------------------------------

    def reset(self, worker: int) -> None:
        """A worker about to start: STARTING until it says it is ready."""
        self.set(worker, NESTED, IDLE)
        self.set(worker, MAIN, STARTING)

    def starting(self, worker: int) -> bool:
        return self._words[self._at(worker, MAIN)] == STARTING

    def starting_since(self, worker: int) -> int | None:
        """When (monotonic ns) ``worker`` was started, if it is not ready yet."""
        at = self._at(worker, MAIN)
        return self._words[at + 1] if self._words[at] == STARTING else None

    def claiming(self, worker: int) -> bool:
        return any(self._words[self._at(worker, slot)] == CLAIMING for slot in (MAIN, NESTED))

    def claimed_since(self, worker: int) -> int | None:
        """When (monotonic ns) ``worker`` began the claim it is in, if it is in one."""
        times = [self._words[at + 1] for at in (self._at(worker, slot) for slot in (MAIN, NESTED)) if self._words[at] == CLAIMING]
        return min(times, default=None)

    def held(self, worker: int) -> list[tuple[int, int]]:
        """(seq, named-at ns) of the tasks ``worker`` holds."""
        return [
            (self._words[at], self._words[at + 1])
            for at in (self._at(worker, slot) for slot in (MAIN, NESTED))
            if self._words[at] >= 0
        ]

    def close(self) -> None:
        if self.fd < 0:
            return
        self._words.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
