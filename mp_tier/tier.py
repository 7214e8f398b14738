"""The tier API: what an engine calls, from any thread, in the host process.

A facade over the coordinator and the objects it consults. Every public
call checks its input first (``validation``), takes the tier's one lock,
and pumps the coordinator; ``submit_*`` never touches a file and never
blocks. Between calls the tier costs the host nothing: it has no thread.

A tier belongs to the process that made it. A forked child gets a dead
copy (its calls raise TierClosed, and it holds none of the pipes, so the
parent's workers still see the parent's death), and a tier that is dropped
without ``shutdown`` stops its workers in a finalizer, at garbage
collection or at interpreter exit.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .channels import close_listed
from .config import TierConfig
from .errors import TierBroken, TierClosed
from .jobs import JobMetadata, JobResult, TierEvent, TierStats
from .messages import Op
from .reentry import entered, inside_a_call
from .validation import checked_job, checked_keys, checked_timeout
from .wiring import build, built, configured, teardown

log = logging.getLogger(__name__)

# Live tiers of this process, so a forked child can let go of them at once.
_tiers: weakref.WeakSet[FileSystemTierManager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_tiers):
        tier._abandon_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class FileSystemTierManager:
    """A file-system KV tier whose block I/O runs in worker processes."""

    def __init__(
        self,
        offloading_spec: Any = None,
        primary_kv_view: Any = None,
        tier_type: str = "mp_fs",
        root_dir: str | None = None,
        n_read_workers: int | None = None,
        n_write_workers: int | None = None,
        config: TierConfig | None = None,
        *,
        n_read_threads: int | None = None,
        n_write_threads: int | None = None,
        engine: str | None = None,
        namespace: str | None = None,
    ):
        """``namespace`` names the directory under ``root_dir`` that holds the blocks; by default a name that
        describes the run (block size, and model, dtype and parallel layout from ``offloading_spec``)."""
        self._pid = os.getpid()  # the process the tier belongs to
        config = configured(
            config,
            root_dir=root_dir,
            n_read_workers=n_read_workers,
            n_write_workers=n_write_workers,
            n_read_threads=n_read_threads,
            n_write_threads=n_write_threads,
            engine=engine,
        )
        parts = build(config, primary_kv_view, offloading_spec, namespace)
        self.config = config
        self.tier_type = tier_type
        self.layout = parts.layout  # where blocks live (``block_path``): fixed for the tier's life
        self.direct = parts.direct  # O_DIRECT in use
        self.num_blocks = parts.num_blocks
        self.block_bytes = parts.block_bytes
        self._core = parts.core  # the coordinator: everything below it is its
        self._wake = parts.wake  # rung when a result is made outside a pump
        self._owned_fds = parts.fds  # closed at the end; in a forked child, at once
        self._lock = threading.RLock()  # one caller at a time (waiters sleep without it); the finalizer takes it too
        self._shutdown_asked = False  # by a signal handler inside a call: the next call shuts the tier down
        self._waiters = 0  # threads asleep in wait()/drain()
        self._finalizer = weakref.finalize(self, teardown, parts, self._lock, config.stop_timeout, self._pid)
        _tiers.add(self)
        built(parts)
        with self._lock:
            self._core.start()

    # -- submitting ---------------------------------------------------------

    def submit_store(self, job: JobMetadata) -> None:
        """Queue the blocks of ``job`` for writing; returns at once."""
        self._submit(job, Op.STORE)

    def submit_load(self, job: JobMetadata) -> None:
        """Queue the blocks of ``job`` for reading into the cache; returns at once."""
        self._submit(job, Op.LOAD)

    def _submit(self, job: JobMetadata, op: Op) -> None:
        """Check the input first, so a raise changes nothing; the coordinator does the rest."""
        job_id, keys, ids = checked_job(job, op == Op.LOAD, self.num_blocks)
        with entered(self._lock):
            self._check_open()
            if (result := self._core.submit(op, job_id, keys, ids)) is not None:
                self._deliver(result)

    def _deliver(self, result: JobResult) -> None:
        """A result made outside a pump (lock held): also wake a thread asleep in wait()."""
        self._core.deliver(result)
        if self._waiters:
            try:
                os.write(self._wake[1], b"\0")
            except BlockingIOError:
                pass  # rung already

    # -- completions --------------------------------------------------------

    def get_finished(self) -> list[JobResult]:
        """Results of the jobs finished since the last call; never blocks.

        This call is also where a dead worker is noticed and replaced.
        """
        with entered(self._lock):
            self._check_owner()
            if not self._core.stopping:
                self._pump(scheduler=True)
            if (broken := self._core.broken()) and not self._core.finished:
                raise TierBroken(broken)
            finished, self._core.finished = self._core.finished, []
            return finished

    def _pump(self, scheduler: bool = False) -> None:
        self._core.pump(scheduler)
        if self._core.broken():
            self._finalizer()  # the workers are stopped already: this closes the tier's fds

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a result is ready for get_finished(); False on timeout (None or inf: no limit), or at once
        when no job is in flight (no result could come). True too when another thread shut the tier down
        meanwhile and its cancelled results wait.

        For a host with nothing else to do; a scheduler loop just polls.
        """
        core = self._core
        try:
            return self._block_until(lambda: bool(core.finished) or not core.jobs_active(), timeout) and bool(core.finished)
        except TierClosed:
            if core.finished and os.getpid() == self._pid:
                return True
            raise

    def drain(self, timeout: float | None = None) -> None:
        """Block until every submitted job has finished; results stay for get_finished().

        It also waits for the tier's own housekeeping, so the workers are idle after it.
        """
        if not self._block_until(self._core.idle, timeout):
            raise TimeoutError(f"{self._core.jobs_active()} jobs still active after {timeout} s")

    def _block_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        limit = checked_timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            with entered(self._lock):
                self._check_open()
                self._pump()  # may break the tier: then every job has its result, and done() holds
                if done():
                    return True
                if (sleep := self._core.sleep(deadline)) is None:
                    return False
                fds, ms = sleep
                self._waiters += 1
            try:
                sleeper = select.poll()
                for fd, events in [*fds, (self._wake[0], select.POLLIN)]:
                    sleeper.register(fd, events)
                if any(fd == self._wake[0] for fd, _ in sleeper.poll(ms)):
                    with self._lock:  # a shutdown meanwhile (another thread's, a signal handler's) closed the fd
                        if not self._core.stopping:
                            try:
                                os.read(self._wake[0], 4096)
                            except BlockingIOError:
                                pass  # another waiter took it
            finally:
                with self._lock:
                    self._waiters -= 1

    # -- queries ------------------------------------------------------------

    def lookup(self, key: bytes) -> bool | None:
        """True if the block is on disk, False if not, None while a store of it is in flight.

        The path lookup runs outside the tier's lock, through a copy of the namespace directory's fd, so a
        slow or hung mount holds up this call alone, never another thread's call of the tier. False while
        the namespace directory is removed or replaced and no worker has made it again yet.
        """
        checked_keys([key])
        with entered(self._lock):
            self._check_open()
            look = self._core.lookup(key)
        return None if look is None else self._core.on_disk(look, key, self._lock)

    def lookup_many(self, keys: Sequence[bytes], *, probe: bool = True) -> list[bool | None]:
        """``lookup`` for many keys at once, from memory only: it never waits for a disk.

        True for blocks this tier stored, found at start, or learned of; None for blocks with a store in
        flight; False otherwise. Keys it answers False are also probed on disk by a worker in the background
        (at most 256 keys at a time, the rest by a later call; probes do not count in ``max_queued_tasks``),
        so a block another instance sharing the root wrote is answered True once that probe's completion has
        been read (by any later ``get_finished``, ``wait`` or ``drain``). A block another instance deleted is
        forgotten when a load of it fails. ``probe=False`` is for a caller that looks on disk itself
        (``lookup``) for the keys it is told are False.
        """
        keys = checked_keys(keys)
        with entered(self._lock):
            self._check_open()
            return self._core.lookup_many(keys, probe)

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark blocks as just used, for LRU eviction; persisted in their files' mtime."""
        keys = checked_keys(keys)
        with entered(self._lock):
            self._check_open()
            self._core.touch(keys)

    def take_events(self) -> list[TierEvent]:
        """Events recorded since the last call (``events = true`` only)."""
        with entered(self._lock):
            self._check_owner()
            if not self._core.stopping:
                self._pump()
            return self._core.take_events()

    def block_path(self, key: bytes) -> str:
        """The file that holds (or would hold) the block of ``key``."""
        checked_keys([key])
        return self.layout.path(key)

    def stats(self) -> TierStats:
        """Counters since construction, and the tier's state now; also from a signal handler."""
        if inside_a_call(self._lock):  # a handler that interrupted a call: read, change nothing
            return self._core.snapshot()
        with self._lock:
            self._check_owner()
            return self._core.snapshot()

    def worker_pids(self, *, ready: bool = False) -> list[int]:
        """Pids of the live worker processes ([] for threads); ``ready``: only those past their start-up."""
        with entered(self._lock):
            self._check_owner()
            return self._core.worker_pids(ready)

    def _check_owner(self) -> None:
        """The tier belongs to this process; a shutdown a signal handler asked for happens here."""
        if os.getpid() != self._pid:
            raise TierClosed(f"this tier belongs to process {self._pid}; a forked child cannot use it")
        if self._shutdown_asked:
            self._shutdown_asked = False
            self._finalizer()

    def _check_open(self) -> None:
        if self._core.stopping or self._shutdown_asked or os.getpid() != self._pid:  # one test on the submit path
            self._check_owner()
            if broken := self._core.broken():
                raise TierBroken(broken)
            raise TierClosed("the tier is shut down")

    # -- shutdown -----------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the workers; every unfinished job gets a ``cancelled`` result (ECANCELED).

        Tasks no worker has taken are cancelled at once; tasks in progress get ``stop_timeout`` seconds to
        finish. Idempotent, and a no-op in a forked child. From a signal handler that interrupted another
        call of the tier, it only asks: the tier's next call (or its finalizer) shuts it down. So it does
        when another thread has held the tier's lock for ``stop_timeout`` in a call that is not a shutdown:
        that thread may be waiting for this one (its log handler, for a lock the handler's thread holds).
        """
        if os.getpid() != self._pid:
            return
        if inside_a_call(self._lock):
            self._shutdown_asked = True
            log.debug("shutdown() interrupted a call of the tier (a signal handler): the tier's next call carries it out")
            return
        try:
            while not self._lock.acquire(timeout=self.config.stop_timeout):
                if not self._core.stopping:  # not another shutdown, which ends by itself: a call that may wait for this thread
                    self._shutdown_asked = True
                    log.debug("shutdown() waited %g s for another call of the tier: the next call carries it out", self.config.stop_timeout)
                    return
            self._finalizer()  # stops the workers and closes the tier's fds; a no-op once it has run
        finally:
            if inside_a_call(self._lock):  # taken here (not before: see above), even if a handler raised as it was
                self._lock.release()

    def _abandon_in_child(self) -> None:
        """Right after a fork, in the child: drop every fd and worker of the parent's tier, touching none of them.

        Also when the parent's tier was ending (its sweep may wait on a hung mount for long): the end takes each fd
        off ``_owned_fds`` as it closes it, so those left are the ones to close here (none once the tier ended).
        """
        self._lock = threading.RLock()  # the parent's may have been held by a thread that does not exist here
        self._finalizer.detach()
        self._core.stopping = True  # the pool let go of its fds already (its own fork handler)
        close_listed(self._owned_fds)  # emptied: a fork of this child closes none of them again (numbers it may reuse)

    def __enter__(self) -> FileSystemTierManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
