"""The coordinator: runs inside the host's calls, turning plans into tasks and completions into results.

It has no thread of its own: ``pump`` does, in one pass, everything that
has come due (completions, worker deaths, a death being settled, delayed
restarts, task deadlines) and never blocks. Decisions come from plain
objects: the ``ledger`` (jobs and tasks), ``residency`` (what is on disk and
pinned) and ``recovery`` (what a death means); the coordinator applies them
to the ``pool`` (deaths and deadlines through ``supervision``).

It owns the submit path (check, prepare, plan, commit, send) and answers
the tier's queries from memory; the one look on disk it leaves the tier to
run outside the lock (``lookup``, then ``on_disk``).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Any, cast

import msgspec

from . import block_io
from .codes import ErrorCode
from .config import TierConfig
from .errors import Refused
from .host_root import HostRoot, Look
from .jobs import Counters, JobResult, TierEvent, TierStats
from .layout import BlockPath
from .ledger import Job, Ledger, Plan
from .messages import Completion, Op
from .pool import WorkerPool, poll_ms
from .recovery import RESTART_RECHECK_SECONDS, Recovery, Settling
from .residency import Residency
from .supervision import kill_overdue, record_deaths, restart_due, settle, still_claiming

log = logging.getLogger(__name__)


class Coordinator:
    """Jobs in, results out, workers kept alive; the tier's lock is held around every call."""

    def __init__(self, pool: WorkerPool, residency: Residency, root: HostRoot, config: TierConfig):
        self.pool = pool
        self.ledger = Ledger()
        self.residency = residency
        self.recovery = Recovery()
        self.root = root  # the host's fd of the namespace directory, for lookups and the sweep at stop
        self.leftovers: list[BlockPath] = []  # after stop: blocks beside which stores cut short may have left temp files
        self.group_sizes = {Op.LOAD: config.n_read_workers, Op.STORE: config.n_write_workers}  # workers a job is split over
        self.max_queued_tasks = config.max_queued_tasks
        self.task_timeout = config.task_timeout  # seconds a worker may hold a task; 0 = no deadline
        self.start_timeout = config.start_timeout  # seconds a worker may take to become ready
        self._deadline_every = min(1.0, self.start_timeout / 4, self.task_timeout / 4 if self.task_timeout else 1.0)  # seconds between checks
        self.finished: list[JobResult] = []  # results not yet handed to get_finished()
        self.counts = Counters()
        self.tasks_by_worker = [0] * len(pool.specs)  # job tasks each worker slot completed
        self.settling: Settling | None = None  # a death being settled, if any
        self.stopping = False  # no new housekeeping once the workers are being stopped
        self._next_deadline_check = time.monotonic()

    # -- sending -----------------------------------------------------------------

    def start(self) -> None:
        """The first housekeeping: sweep what dead writers left, then count what the root holds."""
        self.housekeeping(Op.SWEEP, [])
        self.housekeeping(Op.SCAN, [])

    def submit(self, op: Op, job_id: int, keys: list[bytes], block_ids: list[int]) -> JobResult | None:
        """Send a checked job; a result made at once instead (a refusal, or a job with no blocks), else None.

        Raises ValueError (the job id still active, a frame overflow) before anything changes.
        """
        if job_id in self.ledger.jobs:
            raise ValueError(f"job_id {job_id} is still active")
        if not keys:
            self.counts.add_job(op == Op.STORE, True, 0)
            return JobResult(job_id=job_id, success=True, successful_keys=None, transfer_size=0, transfer_time=0.0)
        try:
            limit = self.max_queued_tasks
            if limit and self.pool.jobs_waiting(op) >= limit:
                raise Refused("EAGAIN", f"{limit} tasks already wait on the host (max_queued_tasks)")
            admission = self.residency.prepare(op, keys)
        except Refused as refused:
            return JobResult(
                job_id=job_id, success=False, successful_keys=(), transfer_size=0, transfer_time=0.0, error=str(refused), error_code=refused.code
            )
        plan = self.ledger.plan(Job(job_id, op, keys, block_ids, admission.victims), self.ledger.spread(op, self.group_sizes[op]))
        self.residency.commit(op, keys, admission)
        self.send(plan)
        return None

    def send(self, plan: Plan) -> None:
        """Commit a plan and queue its frames; cannot fail."""
        self.ledger.commit(plan)
        self.pool.submit(plan.job.op, plan.frames)

    def housekeeping(self, op: Op, keys: list[bytes], evict: list[bytes] | None = None) -> None:
        """Send the tier's own work (no result): split over every worker, or one task if it has no blocks."""
        if self.stopping:
            return
        job = Job(None, op, keys, [], evict or [])
        self.send(self.ledger.plan(job, len(self.pool.specs)))

    # -- queries -----------------------------------------------------------------

    def snapshot(self) -> TierStats:
        """The counters, and the state of the tier now (no worker counts once it stopped)."""
        pool, residency, running = self.pool, self.residency, not self.stopping
        return TierStats(
            **msgspec.structs.asdict(self.counts),
            blocks_evicted=residency.blocks_evicted,
            jobs_active=len(self.ledger.jobs),
            bytes_counted=residency.capacity.used_bytes,
            blocks_seen_elsewhere=len(residency.elsewhere),
            tasks_queued=pool.backlog(Op.LOAD) + pool.backlog(Op.STORE),
            workers_alive=len(pool.live()) if running else 0,
            workers_starting=sum(map(pool.slots.starting, pool.live())) if running else 0,
            tasks_by_worker=tuple(self.tasks_by_worker),
        )

    def jobs_active(self) -> int:
        return len(self.ledger.jobs)

    def idle(self) -> bool:
        """No task out, the tier's own housekeeping included."""
        return not self.ledger.tasks

    def broken(self) -> str | None:
        """Why the tier broke, once it has."""
        return self.recovery.broken

    def worker_pids(self, ready: bool) -> list[int]:
        """Pids of the live worker processes; ``ready``: only those past their start-up."""
        return [] if self.stopping else self.pool.pids(ready)

    def sleep(self, deadline: float | None) -> tuple[list[tuple[int, int]], int | None] | None:
        """What a waiter sleeps on: the pool's fds, and the ms until ``deadline`` or the pump's next timed work
        (None: no limit); None once ``deadline`` has passed."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return None
        ends = [t for t in (deadline, self._next_wakeup()) if t is not None]
        return self.pool.wait_fds(), poll_ms(min(ends) - now if ends else None)

    def lookup(self, key: bytes) -> Look | None:
        """None while a store of ``key`` is in flight; else what ``on_disk`` needs, to call outside the lock."""
        return None if key in self.residency.storing else self.root.look(self.residency.namespace)

    def on_disk(self, look: Look, key: bytes, lock: AbstractContextManager[Any]) -> bool:
        """Outside the tier's lock (taken only to follow a namespace directory made again): is the block on disk."""
        return self.root.has_block(look, key, lock, lambda: self.stopping)

    def lookup_many(self, keys: list[bytes], probe: bool) -> list[bool | None]:
        """Answers from memory; keys answered False are probed on disk by a worker in the background (``probe``)."""
        answers, unknown = self.residency.lookup_many(keys)
        if unknown and probe:
            self.residency.probe_sent(unknown)
            self.housekeeping(Op.PROBE, unknown)
        return answers

    def touch(self, keys: list[bytes]) -> None:
        if counted := self.residency.touch(keys):
            self.housekeeping(Op.TOUCH, counted)

    def take_events(self) -> list[TierEvent]:
        return self.residency.take_events()

    def deliver(self, result: JobResult) -> None:
        if not result.success:
            self.counts.jobs_failed += 1
        self.finished.append(result)

    # -- the pump ----------------------------------------------------------------

    def pump(self, scheduler: bool = False) -> None:
        """Everything that has come due; never blocks. ``scheduler``: called by the scheduler's step
        (``get_finished``), whose thread's CPU the workers keep off."""
        pool = self.pool
        pool.flush()
        completions, dead = pool.poll()
        for completion in completions:
            self.on_completion(completion)
        if dead:
            self._on_deaths(dead)
        if self.settling is not None:
            self._settle()
        now = time.monotonic()
        if self.recovery.restart_at and self.settling is None and restart_due(self.pool, self.recovery, self.counts, now):
            self.break_tier()
        if now >= self._next_deadline_check:
            self._enforce_deadlines(now)
        if scheduler and not self.stopping:
            pool.follow_scheduler(now)

    def _next_wakeup(self) -> float | None:
        """When the pump has timed work to do (a settle deadline, a restart, a deadline check), or None."""
        restart = self.recovery.next_restart()
        # a restart still due after a pump waits for a boot to end, which nothing signals: look again soon
        times = [None if restart is None else max(restart, time.monotonic() + RESTART_RECHECK_SECONDS)]
        if self.settling is not None:
            times.append(min(self.settling.deadline, time.monotonic() + 0.001))
        times.append(self._next_deadline_check)
        return min((t for t in times if t is not None), default=None)

    def on_completion(self, completion: Completion, unsure: bool = False) -> None:
        """Fold in a worker's completion, or the host's for a task that fails (``unsure``: as ``Ledger.complete``)."""
        if completion.namespace is not None and self.residency.renewed(completion.namespace):
            self.ledger.left_behind("the namespace directory was replaced after these blocks were stored: they are in the old one")
            self.housekeeping(Op.SCAN, [])  # what the directory now there holds (one put back, say)
        if completion.more:
            if (scan := self.ledger.tasks.get(completion.seq)) is not None and scan.job.code is None:  # not stale
                self.residency.scanned(completion.found)
            return
        ref = self.ledger.complete(completion, unsure)
        if ref is None:
            return
        recovery = self.recovery
        if recovery.retried or recovery.timed_out:
            recovery.completed(completion.seq)
        job = ref.job
        if job.job_id is None and completion.error and completion.worker >= 0:
            log.warning("housekeeping (%s) failed in worker %d: %s", job.op.name, completion.worker, completion.error)
        if job.evict:
            victims = job.evict[ref.first : ref.first + ref.blocks]
            self.residency.evicted(victims, [victims[i] for i in completion.kept], completion.error)
        if completion.worker >= 0 and job.job_id is not None:
            self.tasks_by_worker[completion.worker] += 1
        counts = self.counts
        counts.blocks_skipped += completion.skipped
        counts.files_removed += completion.swept + len(completion.corrupt)
        counts.foreign_entries += completion.foreign
        if completion.corrupt:
            self.residency.corrupt([job.keys[ref.first + i] for i in completion.corrupt])
        if completion.missing:
            self.residency.missing([job.keys[ref.first + i] for i in completion.missing])
        if job.tasks_left == 0:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        residency = self.residency
        if job.job_id is None:  # the tier's own housekeeping: no result
            if job.op == Op.SCAN and (victims := residency.over_budget()):
                self.housekeeping(Op.EVICT, [], victims)
            elif job.op == Op.PROBE:
                residency.probed(job.keys, job.failed)
            return
        residency.done(job.op, job.keys, job.failed, job.unsure)
        failed = set(job.failed)
        successful_keys = tuple(k for i, k in enumerate(job.keys) if i not in failed) if failed else None
        self.counts.add_job(job.op == Op.STORE, not job.failed, job.nbytes)
        self.deliver(
            JobResult(
                job_id=job.job_id,
                success=not job.failed,
                successful_keys=successful_keys,
                transfer_size=job.nbytes,
                transfer_time=time.perf_counter() - job.start,
                error=job.error,
                error_code=job.code,
            )
        )

    def _fail_task(self, seq: int, code: ErrorCode, reason: str, begun: bool) -> None:
        """Complete a task that will never run (again): every block failed, for ``reason``.

        ``begun``: a worker may have begun it, so a store's blocks may be on disk and stay counted (and its
        victims, some perhaps deleted); one no worker ever took is surely not on disk, and is forgotten.
        """
        ref = self.ledger.tasks.get(seq)
        if ref is not None:
            ref.job.error, ref.job.code = reason, code  # why the task never ran outranks any block error
            kept = list(range(len(ref.job.evict[ref.first : ref.first + ref.blocks])))  # no look on disk under the lock
            self.on_completion(Completion(seq, -1, 0, list(range(ref.blocks)), reason, code, kept=kept), begun)

    def _fail_unstarted(self, code: ErrorCode, reason: str) -> None:
        """Fail every task still in the pipes: none was begun, unless a worker that died held it before (a retry)."""
        for task in self.pool.reclaim():
            self._fail_task(task.seq, code, reason, task.seq in self.recovery.retried)

    # -- deaths ------------------------------------------------------------------

    def _on_deaths(self, dead: list[int]) -> None:
        self.settling = record_deaths(self.pool, self.recovery, dead, self.settling, self.ledger.tasks, self.task_timeout, self.start_timeout)

    def _settle(self) -> None:
        settling = self.settling
        assert settling is not None
        if still_claiming(self.pool, settling):
            return
        self.settling = None
        stores, retry = settle(self.pool, self.ledger, self.recovery, settling, self.on_completion, self._fail_task)
        if stores:
            self.housekeeping(Op.SWEEP, stores)  # the temp files their writers left
        if self.recovery.broken:
            self.break_tier()
            return
        self.pool.requeue(retry + settling.queued)
        self.pool.resume()

    def _enforce_deadlines(self, now: float) -> None:
        """Fail the waiting jobs if no worker could be started for start_timeout; kill the overdue workers."""
        self._next_deadline_check = now + self._deadline_every
        if (shortage := self.recovery.unserved(now, bool(self.pool.live()), self.start_timeout)) and self.settling is None:
            code, why = block_io.describe(shortage)  # a SHORTAGES errno: listed in codes
            # no worker process: every task is in a pipe
            self._fail_unstarted(cast(ErrorCode, code), f"no worker could be started for {self.start_timeout:g} s (start_timeout): {why}")
            self.pool.resume()
        kill_overdue(self.pool, self.recovery, self.ledger.tasks, self.counts, self.task_timeout, self.start_timeout)

    # -- the end -----------------------------------------------------------------

    def break_tier(self) -> None:
        reason = self.recovery.broken
        log.error("mp_tier tier broken: %s", reason)
        self.stop(0, "ENOTRECOVERABLE", f"tier broken: {reason}")

    def shutdown(self, timeout: float) -> None:
        """Cancel what no worker has started, give the rest ``timeout`` seconds, then fail what is left.

        Does nothing once the workers are stopped (after a shutdown, or when the tier broke).
        """
        if self.stopping:
            return
        for completion in self.pool.results.read():
            self.on_completion(completion)
        unswept = self.ledger.stored_keys(list(self.ledger.tasks), Op.SWEEP)  # a sweep cancelled here is the host's to do
        self._fail_unstarted("ECANCELED", "cancelled: the tier shut down before the task started")
        self.stop(timeout, "ECANCELED", "cancelled: the worker stopped before finishing", unswept)

    def stop(self, timeout: float, code: ErrorCode, reason: str, unswept: list[bytes] | None = None) -> None:
        """Stop the pool, then fail every task it did not finish.

        Workers killed at the deadline may have left temp files beside the
        blocks they were storing, and a sweep for dead writers' files may not
        have run; with no worker left, the host removes them (``sweep_leftovers``).
        """
        self.stopping = True
        self.settling = None
        self.recovery.restart_at.clear()
        for why in self.pool.stop(timeout, self.on_completion):
            log.warning("%s at stop", why)
        cut_short = [seq for seq in self.pool.held_at_stop() if seq in self.ledger.tasks]  # only these can have begun
        self.leftovers = [self.root.layout.locate(key) for key in set(self.ledger.stored_keys(cut_short, Op.STORE)).union(unswept or ())]
        begun = self.recovery.retried.union(cut_short)  # and a task sent again: the worker that died holding it may have begun it
        for seq in list(self.ledger.tasks):
            self._fail_task(seq, code, reason, seq in begun)
        self.pool.close()

    def sweep_leftovers(self) -> None:
        """Once, after ``stop`` and outside the tier's lock: remove the temp files of the stores it cut short."""
        beside, self.leftovers = self.leftovers, []
        if beside:
            self.counts.files_removed += self.root.sweep(beside)
