"""Starting, watching, replacing and stopping the workers; owning their pipes.

The pool owns every pipe end the host holds: the write ends of the two task
pipes, the read end of the result pipe, and the ends it hands to new workers.
Workers run as processes of an explicit start method (forkserver by default:
fork is unsafe in a host that runs threads, spawn is ten times slower to
start) or as threads of the host (the ``threads`` engine).

Death detection costs no thread: each worker process's sentinel sits in the
same ``poll`` set as the result pipe, which the host polls in the calls it
already makes. The tier decides what to do with a dead worker's task; the
pool tells it what every live worker holds and starts the replacement.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import multiprocess
import multiprocess.connection
from multiprocess import reduction

from .channels import ResultReader, TaskPipe, WorkerEnds, encode_frame, make_pipe
from .messages import READ_OPS, Completion, Task
from .shared_cache import PrimaryCache
from .worker import CLAIMING, IDLE, SLOTS_PER_WORKER, STARTING, WorkerSpec, process_main, run_worker


class _InheritedFd:
    """Pickles as a duplicate of ``fd`` for the child being started."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_detach, (reduction.DupFd(self.fd),))


def _detach(dup: Any) -> int:
    return dup.detach()


class WorkerPool:
    """The read-priority and write-priority workers of one tier."""

    def __init__(self, specs: list[WorkerSpec], cache: PrimaryCache, engine: str, start_method: str):
        self.specs = specs
        self.engine = engine
        self.loads = TaskPipe()
        self.stores = TaskPipe()
        self.results = ResultReader()
        self._bell = make_pipe()
        self._cache = cache
        self._ctx = multiprocess.get_context(start_method)
        if engine == "processes" and start_method == "forkserver":
            self._ctx.set_forkserver_preload(["mp_tier.worker"])
        self.slots = self._ctx.RawArray("q", SLOTS_PER_WORKER * len(specs))
        self._workers: list[Any] = [None] * len(specs)
        self._poller = select.poll()
        self._poller.register(self.results.read_fd, select.POLLIN)
        self._by_sentinel: dict[int, int] = {}
        try:
            for spec in specs:
                self.start(spec.index)
        except BaseException:
            self.stop(timeout=1.0, on_result=lambda c: None)
            self.close()
            raise

    def start(self, index: int) -> None:
        """Start (or restart) the worker in slot ``index``."""
        spec = self.specs[index]
        first = SLOTS_PER_WORKER * index
        self.slots[first : first + SLOTS_PER_WORKER] = [STARTING] + [IDLE] * (SLOTS_PER_WORKER - 1)
        name = f"mp_tier-{'r' if spec.read_priority else 'w'}{index}"
        ends = WorkerEnds(self.loads.read_fd, self.stores.read_fd, *self._bell, self.results.write_fd)
        if self.engine == "threads":
            worker = threading.Thread(target=run_worker, args=(spec, self._cache.view, ends, self.slots), name=name, daemon=True)
        else:
            worker = self._ctx.Process(
                target=process_main,
                args=(spec, self._cache.name, self._cache.num_blocks, WorkerEnds(*map(_InheritedFd, ends)), self.slots),
                name=name,
                daemon=True,
            )
        worker.start()
        if self._workers[index] is not None:
            self._forget(index)
        self._workers[index] = worker
        if self.engine == "processes":
            self._by_sentinel[worker.sentinel] = index
            self._poller.register(worker.sentinel, select.POLLIN)

    def _forget(self, index: int) -> None:
        old = self._workers[index]
        self._workers[index] = None
        if self.engine == "processes":
            self._poller.unregister(old.sentinel)
            del self._by_sentinel[old.sentinel]
            old.join()
            old.close()

    def _pipe_for(self, op: int) -> TaskPipe:
        return self.loads if op in READ_OPS else self.stores

    def submit(self, op: int, frames: bytearray) -> None:
        self._pipe_for(op).put(frames)

    def requeue(self, tasks: list[Task]) -> None:
        """Put tasks back in order; the pipes were just reclaimed, so nothing jumps them."""
        frames = {self.loads: bytearray(), self.stores: bytearray()}
        for task in tasks:
            encode_frame(task, frames[self._pipe_for(task.op)])
        for pipe, pending in frames.items():
            if pending:
                pipe.put(pending)

    def backlog(self, op: int) -> int:
        """Tasks of ``op``'s pipe held on the host side."""
        return self._pipe_for(op).backlog

    def flush(self) -> None:
        """Push held-back frames into the pipes, as far as they fit."""
        self.loads.flush()
        self.stores.flush()

    def poll(self) -> tuple[list[Completion], list[int]]:
        """Completions that have arrived and indexes of workers that died; never blocks."""
        completions: list[Completion] = []
        dead: list[int] = []
        for fd, _ in self._poller.poll(0):
            if fd == self.results.read_fd:
                completions = self.results.read()
            else:
                dead.append(self._by_sentinel[fd])
        return completions, dead

    def exit_reason(self, index: int) -> str:
        worker = self._workers[index]
        worker.join()
        code = worker.exitcode
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return f"worker {index} (pid {worker.pid}) died: {how}"

    def _slots_of(self, index: int) -> list[int]:
        first = SLOTS_PER_WORKER * index
        return self.slots[first : first + SLOTS_PER_WORKER]

    def starting(self, index: int) -> bool:
        """Not ready yet (or died before it was)."""
        return self._slots_of(index)[0] == STARTING

    def _live(self) -> list[int]:
        return [i for i, w in enumerate(self._workers) if w is not None and w.is_alive()]

    def held(self) -> set[int]:
        """Seqs of the tasks live workers hold right now."""
        return {seq for i in self._live() for seq in self._slots_of(i) if seq >= 0}

    def settle_claims(self, timeout: float) -> list[int]:
        """Wait until no live worker is between reading a task and naming it.

        Called with the task pipes emptied, so every claim ends in a moment
        (the worker names its task, or found nothing). A worker still claiming
        at ``timeout`` (stopped, say) is killed; its index is returned, so that
        what it held counts as a dead worker's.
        """
        deadline = time.monotonic() + timeout
        while claiming := [i for i in self._live() if CLAIMING in self._slots_of(i)]:
            if time.monotonic() >= deadline:
                for index in claiming:
                    self._workers[index].kill()
                    self._workers[index].join()
                return claiming
            os.sched_yield()
        return []

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w is not None] if self.engine == "processes" else []

    def alive(self) -> int:
        return sum(w is not None and w.is_alive() for w in self._workers)

    def wait(self, timeout: float | None) -> None:
        """Sleep until a completion or a death arrives, a held-back frame fits, or ``timeout``."""
        backlog = [pipe.write_fd for pipe in (self.loads, self.stores) if pipe.backlog]
        for fd in backlog:
            self._poller.register(fd, select.POLLOUT)
        try:
            self._poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        finally:
            for fd in backlog:
                self._poller.unregister(fd)

    def reclaim(self) -> list[Task]:
        """Every task no worker has taken yet, removed from the queues."""
        return self.loads.reclaim() + self.stores.reclaim()

    def stop(self, timeout: float, on_result: Any) -> None:
        """Close the task pipes and wait for the workers to finish what they hold.

        Completions keep being read (and handed to ``on_result``) while
        waiting, so a worker blocked on a full result pipe can still finish.
        Workers still running at ``timeout`` are killed.
        """
        self.loads.close_writer()
        self.stores.close_writer()
        deadline = time.monotonic() + timeout
        while True:
            for completion in self.results.read():
                on_result(completion)
            live = [w for w in self._workers if w is not None and w.is_alive()]
            remaining = deadline - time.monotonic()
            if not live or remaining <= 0:
                break
            if self.engine == "processes":
                multiprocess.connection.wait([w.sentinel for w in live] + [self.results.read_fd], remaining)
            else:
                live[0].join(min(remaining, 0.05))  # threads have no sentinel to wait on
        for worker in live:
            if self.engine == "processes":
                worker.kill()
                worker.join()
        for completion in self.results.read():
            on_result(completion)

    def close(self) -> None:
        """Release every pipe end; call after ``stop``."""
        for index, worker in enumerate(self._workers):
            if worker is not None:
                self._forget(index)
        self.loads.close()
        self.stores.close()
        self.results.close()
        for fd in self._bell:
            os.close(fd)

