"""Starting, watching and stopping the workers, and owning their pipes.

The pool owns every pipe end the host holds: the write ends of the two task
pipes, the read end of the result pipe, and the ends it hands to new workers.
Workers run as processes of an explicit start method (forkserver by default:
fork is unsafe in a host that runs threads, spawn is ten times slower to
start) or as threads of the host (the ``threads`` engine).
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

import multiprocess
from multiprocess import reduction

from .channels import ResultReader, TaskPipe
from .messages import LOAD, Task
from .shared_cache import PrimaryCache
from .worker import WorkerSpec, process_main, run_worker


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
        self._cache = cache
        self._workers: list[Any] = []
        if engine == "processes":
            self._ctx = multiprocess.get_context(start_method)
            if start_method == "forkserver":
                self._ctx.set_forkserver_preload(["mp_tier.worker"])
        try:
            for spec in specs:
                self._workers.append(self._start(spec))
        except BaseException:
            self.stop(timeout=1.0, on_result=lambda c: None)
            raise

    def _start(self, spec: WorkerSpec) -> Any:
        kind = "r" if spec.read_priority else "w"
        name = f"mp_tier-{kind}{spec.index}"
        if self.engine == "threads":
            worker = threading.Thread(
                target=run_worker,
                args=(spec, self._cache.view, self.loads.read_fd, self.stores.read_fd, self.results.write_fd),
                name=name,
                daemon=True,
            )
        else:
            fds = (self.loads.read_fd, self.stores.read_fd, self.results.write_fd)
            worker = self._ctx.Process(
                target=process_main,
                args=(spec, self._cache.name, self._cache.num_blocks, *map(_InheritedFd, fds)),
                name=name,
                daemon=True,
            )
        worker.start()
        return worker

    def submit(self, op: int, frames: bytearray) -> None:
        (self.loads if op == LOAD else self.stores).put(frames)

    def flush(self) -> bool:
        """Push held-back frames into the pipes; True when none are left."""
        return self.stores.flush() & self.loads.flush()

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if self.engine == "processes"]

    def alive(self) -> int:
        return sum(w.is_alive() for w in self._workers)

    def wait(self, timeout: float | None) -> None:
        """Sleep until a completion arrives, a held-back frame fits, or ``timeout``."""
        poller = select.poll()
        poller.register(self.results.read_fd, select.POLLIN)
        for pipe in (self.loads, self.stores):
            if pipe.backlog:
                poller.register(pipe.write_fd, select.POLLOUT)
        poller.poll(None if timeout is None else max(0, int(timeout * 1000)))

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
        for worker in self._workers:
            while worker.is_alive() and time.monotonic() < deadline:
                for completion in self.results.read():
                    on_result(completion)
                worker.join(0.01)
            if worker.is_alive() and self.engine == "processes":
                worker.kill()
                worker.join()
        for completion in self.results.read():
            on_result(completion)

    def close(self) -> None:
        """Release every pipe end; call after ``stop``."""
        for worker in self._workers:
            if self.engine == "processes":
                worker.close()
        self._workers.clear()
        self.loads.close()
        self.stores.close()
        self.results.close()

