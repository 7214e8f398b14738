"""The workers of one tier, and every pipe end and fd the host holds for them.

The pool owns: the write ends of the two task pipes (and their read ends,
to take frames back), the result pipe, the doorbell, the slots, and one
``workers.Worker`` per index. It starts, polls, kills and reaps workers and
moves frames; what a death means for the tasks is decided elsewhere
(``recovery``), and the pool reports facts (who died, who holds what).

Worker threads (the ``threads`` engine) use the pool's fds in the host's own
fd table, and one that stop gives up on (stuck on a hung mount) runs on
when the mount comes back. So the fds close when the pool and every worker
thread have let go of them: a number the thread still uses is never free
for the host to reuse for a file or a pipe of its own. Such a thread ends
after the block it is on once the pool has closed (``_given_up``).

Death detection costs no thread: each worker's death fd sits in the same
``poll`` set as the result pipe, which the host polls in the calls it
already makes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import time
import weakref
from collections.abc import Callable

from . import interpreter
from .channels import ResultReader, TaskPipe, WorkerEnds, close_fds, close_listed, make_pipe
from .memory import SharedRegion
from .messages import READ_OPS, Completion, Op, Task
from .placement import Placement
from .slots import Slots
from .worker import WorkerSpec, run_worker
from .worker_process import Boot, encode_boot
from .workers import ProcessWorker, ThreadWorker, Users, Worker

log = logging.getLogger(__name__)

# How long stop() waits for a killed worker to be gone before leaving it
# (a process in uninterruptible I/O dies when the I/O returns).
_KILL_GRACE_SECONDS = 5.0
_MAX_POLL_MS = 2**31 - 1


def poll_ms(timeout: float | None) -> int | None:
    """A ``poll`` timeout in ms for ``timeout`` seconds (None: forever), clamped to what poll takes."""
    return None if timeout is None else min(_MAX_POLL_MS, max(0, int(timeout * 1000)))


class WorkerPool:
    """The read-priority and write-priority workers of one tier."""

    def __init__(self, specs: list[WorkerSpec], root: int, region: SharedRegion | None, view: memoryview, engine: str, placement: Placement):
        self.specs = specs
        self.placement = placement  # where the worker processes run: off the scheduler thread's CPU
        self.engine = engine
        # the parts made so far, until all are: closed if one cannot be made (EMFILE), or in a child forked meanwhile
        self._making: contextlib.ExitStack | None = (undo := contextlib.ExitStack())
        _pools.add(self)
        with undo:
            self.loads = TaskPipe()  # LOAD tasks: read-priority workers try this pipe first
            undo.callback(self.loads.close)
            self.stores = TaskPipe()  # everything else
            undo.callback(self.stores.close)
            self.results = ResultReader()  # completions from every worker
            undo.callback(self.results.close)
            self.slots = Slots(len(specs), max(spec.io_depth for spec in specs))  # what each worker's lanes hold
            undo.callback(self.slots.close)
            self._bell = make_pipe()  # a worker that sees more work rings it to wake another
            undo.callback(os.close, self._bell[0])
            undo.callback(os.close, self._bell[1])
            # the namespace directory's fd, inherited by workers; worker threads get the pool's own copy (see close)
            self._root = os.dup(root) if engine == "threads" else root
            # worker threads': readable for good once close() has run, so a thread left running (stuck on a hung
            # mount) ends after the block it is on, sending nothing into a result pipe nobody reads any more
            self._given_up = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if engine == "threads" else -1
            undo.callback(close_fds, self._given_up)
            self._users = Users(self._close_ends)  # the pool and its running worker threads: the last closes the ends
            self._closed = False  # close() has run: the pool let go
            self._later: list[int] = []  # fds of worker threads left running at stop, closed with the ends
            self._region = region  # the cache as a process maps it (None for threads)
            self._view = view  # the cache as a thread sees it
            self._workers: list[Worker | None] = [None] * len(specs)  # None: down (dead, or not started yet)
            self._by_fd: dict[int, int] = {}  # death fd -> worker index
            self._poller = select.poll()  # the result pipe and every death fd; used by the lock holder only
            self._poller.register(self.results.read_fd, select.POLLIN)
            self._making = None
            undo.pop_all()

    def start(self, index: int) -> int | None:
        """Start the worker of slot ``index``; return its pid (None for a thread). Raises OSError if it cannot."""
        spec = self.specs[index]
        self.slots.reset(index)
        ends = WorkerEnds(self.loads.read_fd, self.stores.read_fd, *self._bell, self.results.write_fd)
        worker: Worker
        if self.engine == "threads":
            serve = functools.partial(run_worker, spec, self._root, self._view, ends, self.slots, given_up=self._given_up)
            worker = ThreadWorker(index, serve, f"mp_tier-{'r' if spec.read_priority else 'w'}{index}", self._users.enter, self._users.let_go)
        else:
            assert self._region is not None
            boot = Boot(spec, self._root, self._region, ends, self.slots.fd, len(self.specs), os.getpid())
            fds = (*ends, self._root, self._region.fd, self.slots.fd)
            worker = ProcessWorker(index, interpreter.command("mp_tier.worker_process", encode_boot(boot)), fds)
        self._workers[index] = worker
        self._by_fd[worker.death_fd] = index
        self._poller.register(worker.death_fd, select.POLLIN)
        if worker.pid is not None:
            self.placement.started(worker.pid)
        if isinstance(worker, ThreadWorker):
            try:
                worker.start()  # listed first: one an exception leaves running is stopped as any other
            except OSError:  # it could not start (its fds are closed)
                self._detach(index)
                raise
        return worker.pid

    def forget(self, index: int) -> str:
        """Reap a worker that died; return why it did. Listed until reaped: a child forked meanwhile closes its fds."""
        worker = self._workers[index]
        assert worker is not None
        why = worker.reap()
        self._detach(index)
        return why

    def _detach(self, index: int) -> Worker:
        """Take worker ``index`` off the pool and out of the poll set (its death fd as listed: a reaped one's is -1)."""
        worker = self._workers[index]
        assert worker is not None
        [death_fd] = [fd for fd, listed in self._by_fd.items() if listed == index]
        self._workers[index] = None
        self._poller.unregister(death_fd)
        del self._by_fd[death_fd]
        return worker

    # -- frames ----------------------------------------------------------------

    def _pipe_for(self, op: Op) -> TaskPipe:
        return self.loads if op in READ_OPS else self.stores

    def submit(self, op: Op, frames: bytearray) -> None:
        self._pipe_for(op).put(frames, op == Op.PROBE)

    def requeue(self, tasks: list[Task]) -> None:
        """Put taken-back tasks in front of anything queued since, in their order."""
        for pipe in (self.loads, self.stores):
            if mine := [task for task in tasks if self._pipe_for(task.op) is pipe]:
                pipe.put_front(mine)

    def backlog(self, op: Op) -> int:
        """Tasks of ``op``'s pipe held on the host side."""
        return self._pipe_for(op).backlog

    def jobs_waiting(self, op: Op) -> int:
        """The job tasks among them, which max_queued_tasks bounds: all but the background probes."""
        pipe = self._pipe_for(op)
        return pipe.backlog - pipe.probes

    def flush(self) -> None:
        """Push held-back frames into the pipes, as far as they fit."""
        self.loads.flush()
        self.stores.flush()

    def reclaim(self) -> list[Task]:
        """Take back every task no worker has taken, and hold new ones back until ``resume``."""
        self.loads.paused = self.stores.paused = True
        return self.loads.reclaim() + self.stores.reclaim()

    def resume(self) -> None:
        self.loads.paused = self.stores.paused = False
        self.flush()

    # -- watching --------------------------------------------------------------

    def poll(self) -> tuple[list[Completion], list[int]]:
        """Completions that have arrived and indexes of workers that died; never blocks."""
        completions: list[Completion] = []
        dead: list[int] = []
        for fd, _ in self._poller.poll(0):
            if fd == self.results.read_fd:
                completions = self.results.read()
            else:
                dead.append(self._by_fd[fd])
        return completions, dead

    def wait_fds(self) -> list[tuple[int, int]]:
        """What a sleeping host waits on: results, deaths, and room in a pipe that has frames held back."""
        fds = [(self.results.read_fd, select.POLLIN)] + [(fd, select.POLLIN) for fd in self._by_fd]
        return fds + [(p.write_fd, select.POLLOUT) for p in (self.loads, self.stores) if p.backlog and not p.paused]

    def live(self) -> list[int]:
        return [i for i, w in enumerate(self._workers) if w is not None]

    def booting(self, since_ns: int) -> int:
        """How many live workers, started after ``since_ns`` (monotonic), are not ready yet."""
        return sum((t := self.slots.starting_since(i)) is not None and t > since_ns for i in self.live())

    def serving(self) -> bool:
        """Whether a live worker is past its start (every worker serves both pipes)."""
        return any(not self.slots.starting(i) for i in self.live())

    def held(self) -> set[int]:
        """Seqs of the tasks live workers hold right now."""
        return {seq for i in self.live() for seq, _ in self.slots.held(i)}

    def held_at_stop(self) -> set[int]:
        """After ``stop``: the seqs each worker named when it ended (a killed worker's slots outlive it)."""
        return {seq for index in range(len(self.specs)) for seq, _ in self.slots.held(index)}

    def claiming(self) -> list[int]:
        """Live workers between reading a task pipe and naming what they read."""
        return [i for i in self.live() if self.slots.claiming(i)]

    def kill(self, index: int) -> bool:
        """SIGKILL a worker process; False for a thread, which cannot be killed. Its death arrives via ``poll``."""
        worker = self._workers[index]
        if worker is None or not worker.killable:
            return False
        worker.kill()
        return True

    def pid_of(self, index: int) -> int | None:
        worker = self._workers[index]
        return None if worker is None else worker.pid

    def pids(self, ready: bool = False) -> list[int]:
        """Pids of the live worker processes; ``ready``: only those past their start-up."""
        return [pid for i in self.live() if (pid := self.pid_of(i)) is not None and not (ready and self.slots.starting(i))]

    def follow_scheduler(self, now: float) -> None:
        """From the scheduler's step: keep the ready workers off the CPU its thread is on."""
        self.placement.follow(lambda: self.pids(ready=True), now)

    # -- stopping ----------------------------------------------------------------

    def stop(self, timeout: float, on_result: Callable[[Completion], None]) -> list[str]:
        """Close the task pipes and wait for the workers to finish what they hold.

        Completions keep being read (and handed to ``on_result``) while
        waiting, so a worker blocked on a full result pipe can still finish.
        A worker still starting holds nothing and may be stuck in its start:
        it is killed at once. Workers still running at ``timeout`` are
        killed; returns why each worker that did not exit by itself ended.
        """
        self.loads.close_writer()
        self.stores.close_writer()
        for index in self.live():
            if self.slots.starting(index):
                self.kill(index)
        deadline = time.monotonic() + timeout
        killed: list[str] = []
        while live := self.live():
            for completion in self.results.read():
                on_result(completion)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed += self._kill_all(live)
                break
            waiter = select.poll()
            for fd, events in self.wait_fds():
                waiter.register(fd, events)
            for fd, _ in waiter.poll(poll_ms(remaining)):
                if fd in self._by_fd:
                    self.forget(self._by_fd[fd])
        for completion in self.results.read():
            on_result(completion)
        return killed

    def _kill_all(self, live: list[int]) -> list[str]:
        """Kill the workers left at stop's timeout; a thread, which cannot be killed, is left running at once."""
        reasons = []
        for index in live:
            if not self.kill(index):
                log.warning("worker thread %d still holds a task at stop_timeout; leaving it running", index)
                self._drop(index)
        deadline = time.monotonic() + _KILL_GRACE_SECONDS
        waiter = select.poll()
        for index in self.live():
            worker = self._workers[index]
            assert worker is not None
            waiter.register(worker.death_fd, select.POLLIN)
        while live := self.live():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for index in live:
                    log.warning("worker %d (pid %s) did not exit when killed; leaving it", index, self.pid_of(index))
                    self._drop(index)
                break
            for fd, _ in waiter.poll(poll_ms(remaining)):
                waiter.unregister(fd)
                reasons.append(self.forget(self._by_fd[fd]))
        return reasons

    def _drop(self, index: int) -> None:
        self._later.extend(self._detach(index).abandon())

    def close(self) -> None:
        """Let go of every fd, once; call after ``stop``. A worker thread that ``stop`` left running keeps them
        open until it ends: their numbers stay its own, never free for the host to reuse under it."""
        if self._closed:
            return
        self._closed = True
        for index in self.live():
            self._drop(index)
        if self._given_up >= 0:
            os.eventfd_write(self._given_up, 1)
        self._users.let_go()

    def once_let_go(self, run: Callable[[], None]) -> None:
        """Run ``run`` once the pool and every worker thread have let go (now, if they have): a thread left
        running still moves blocks to and from the cache, holding its buffer, so the tier lets go of it then."""
        self._users.after(run)

    def _close_ends(self) -> None:
        """Listed until every fd is closed, each marked closed first: a child forked meanwhile closes the rest."""
        self.loads.close()
        self.stores.close()
        self.results.close()
        self.slots.close()
        own = [*self._bell, *([self._root, self._given_up] if self.engine == "threads" else [])]
        self._bell, self._root, self._given_up, self._later = (-1, -1), -1, -1, [*self._later, *own]
        close_listed(self._later)
        _pools.discard(self)

    def let_go_in_child(self) -> None:
        """In a child forked from the host: close this process's copies of everything now (no worker runs here)."""
        if self._making is not None:  # forked while the pool was being made
            self._making.close()
            return
        self._closed = True
        for index in self.live():
            self._drop(index)
        self._close_ends()


# Pools of this process, from the moment their pipes exist: a child forked at any time, even while a
# tier is being built, closes its copies at once, so only the host holds the ends its workers wait on.
_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _let_go_in_child() -> None:
    for pool in list(_pools):
        pool.let_go_in_child()


os.register_at_fork(after_in_child=_let_go_in_child)
