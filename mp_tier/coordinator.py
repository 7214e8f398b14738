"""The coordinator: runs inside the host's calls, turning plans into tasks and completions into results.

It has no thread of its own: ``pump`` does, in one pass, everything that
has come due (completions, worker deaths, a death being settled, delayed
restarts, task deadlines) and never blocks. Decisions come from plain
objects: the ``ledger`` (jobs and tasks), ``residency`` (what is on disk and
pinned) and ``recovery`` (what a death means); the coordinator applies them
to the ``pool``.

A death is settled in steps across pumps, never by waiting: the pipes are
emptied and held, and once no live worker is between reading a task and
naming it (see ``slots``), every task that had left a pipe is named by a
live worker, complete, or was the dead one's. Those are sent again once
(a second loss fails the job), then the pipes flow again.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from . import block_io
from .codes import ErrorCode
from .jobs import Counters, JobResult, TierStats
from .layout import BlockLayout, BlockPath
from .ledger import Job, Ledger, Plan
from .messages import Completion, Op
from .pool import WorkerPool
from .recovery import BOOT_SECONDS, BOOTING_AT_ONCE, CLAIM_SETTLE_SECONDS, RESTART_RECHECK_SECONDS, Recovery, Settling
from .residency import Residency

log = logging.getLogger(__name__)


class Coordinator:
    """Jobs in, results out, workers kept alive; the tier's lock is held around every call."""

    def __init__(
        self,
        pool: WorkerPool,
        residency: Residency,
        layout: BlockLayout,
        root: int,
        group_sizes: dict[Op, int],
        task_timeout: float,
        start_timeout: float,
    ):
        self.pool = pool
        self.ledger = Ledger()
        self.residency = residency
        self.recovery = Recovery()
        self.layout = layout
        self.root = root  # the namespace directory's fd, for the host's own sweep at stop
        self.leftovers: list[BlockPath] = []  # after stop: blocks beside which stores cut short may have left temp files
        self.group_sizes = group_sizes  # workers a job of each kind is split over
        self.task_timeout = task_timeout  # seconds a worker may hold a task; 0 = no deadline
        self.start_timeout = start_timeout  # seconds a worker may take to become ready
        self._deadline_every = min(1.0, start_timeout / 4, task_timeout / 4 if task_timeout else 1.0)  # seconds between checks
        self.finished: list[JobResult] = []  # results not yet handed to get_finished()
        self.counts = Counters()
        self.tasks_by_worker = [0] * len(pool.specs)  # job tasks each worker slot completed
        self.settling: Settling | None = None  # a death being settled, if any
        self.stopping = False  # no new housekeeping once the workers are being stopped
        self._next_deadline_check = time.monotonic()

    # -- sending -----------------------------------------------------------------

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

    def snapshot(self, running: bool) -> TierStats:
        """The counters, and the state of the tier now (no worker counts once it stopped)."""
        counts, pool = self.counts, self.pool
        return TierStats(
            jobs_stored=counts.jobs_stored,
            jobs_loaded=counts.jobs_loaded,
            jobs_failed=counts.jobs_failed,
            bytes_stored=counts.bytes_stored,
            bytes_loaded=counts.bytes_loaded,
            blocks_skipped=counts.blocks_skipped,
            blocks_evicted=self.residency.blocks_evicted,
            files_removed=counts.files_removed,
            foreign_entries=counts.foreign_entries,
            workers_restarted=counts.workers_restarted,
            tasks_timed_out=counts.tasks_timed_out,
            spawns_failed=counts.spawns_failed,
            jobs_active=len(self.ledger.jobs),
            bytes_counted=self.residency.capacity.used_bytes,
            blocks_seen_elsewhere=len(self.residency.elsewhere),
            tasks_queued=pool.backlog(Op.LOAD) + pool.backlog(Op.STORE),
            workers_alive=len(pool.live()) if running else 0,
            workers_starting=sum(map(pool.slots.starting, pool.live())) if running else 0,
            tasks_by_worker=tuple(self.tasks_by_worker),
        )

    def deliver(self, result: JobResult) -> None:
        if not result.success:
            self.counts.jobs_failed += 1
        self.finished.append(result)

    # -- the pump ----------------------------------------------------------------

    def pump(self) -> None:
        """Everything that has come due; never blocks."""
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
        if self.recovery.restart_at and self.settling is None:
            self._restart_due(now)
        if now >= self._next_deadline_check:
            self._enforce_deadlines(now)

    def next_wakeup(self) -> float | None:
        """When the pump has timed work to do (a settle deadline, a restart, a deadline check), or None."""
        restart = self.recovery.next_restart()
        # a restart still due after a pump waits for a boot to end, which nothing signals: look again soon
        times = [None if restart is None else max(restart, time.monotonic() + RESTART_RECHECK_SECONDS)]
        if self.settling is not None:
            times.append(min(self.settling.deadline, time.monotonic() + 0.001))
        times.append(self._next_deadline_check)
        return min((t for t in times if t is not None), default=None)

    def on_completion(self, completion: Completion) -> None:
        if completion.namespace is not None and self.residency.renewed(completion.namespace):
            self.housekeeping(Op.SCAN, [])  # what the directory now there holds (one put back, say)
        if completion.more:
            if completion.seq in self.ledger.tasks:
                self.residency.scanned(completion.found)
            return
        ref = self.ledger.complete(completion)
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
            kept = [victims[i] for i in completion.kept]
            if kept:
                log.warning("%d evicted blocks were not deleted and stay counted: %s", len(kept), completion.error)
            self.residency.evicted(victims, kept)
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
        if job.op == Op.STORE:
            residency.store_done(job.keys, job.failed, job.unsure)
        else:
            residency.load_done(job.keys)
        successful_keys = None
        if job.failed:
            failed = set(job.failed)
            successful_keys = tuple(k for i, k in enumerate(job.keys) if i not in failed)
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

    def _fail_task(self, seq: int, code: ErrorCode, reason: str) -> None:
        """Complete a task that will never run: every block failed, for ``reason``."""
        ref = self.ledger.tasks.get(seq)
        if ref is not None:
            ref.job.error, ref.job.code = reason, code  # why the task never ran outranks any block error
            # it may have deleted some victims before it died: they stay counted (no look on disk under the lock)
            kept = list(range(len(ref.job.evict[ref.first : ref.first + ref.blocks])))
            self.on_completion(Completion(seq, -1, 0, list(range(ref.blocks)), reason, code, kept=kept))

    # -- deaths ------------------------------------------------------------------

    def _on_deaths(self, dead: list[int]) -> None:
        now = time.monotonic()
        reasons, overdue = [], []
        for index in dead:
            # killed for start_timeout as it became ready: still a death at start, and the kill was for a deadline
            starting = self.pool.slots.starting(index) or index in self.recovery.stalled_starts
            reason = self.pool.forget(index)
            overdue.append(index in self.recovery.overdue_kills or index in self.recovery.stalled_starts)
            if index in self.recovery.overdue_kills:
                self.recovery.overdue_kills.discard(index)
                reason += f"; the tier killed it for holding a task past task_timeout {self.task_timeout:g} s"
            elif index in self.recovery.stalled_starts:
                self.recovery.stalled_starts.discard(index)
                reason += f"; the tier killed it for not starting within start_timeout {self.start_timeout:g} s"
            delay = self.recovery.died(index, starting, now, reason, self.pool.serving())
            log.warning("%s%s; replacing it in %.2f s", reason, " while starting" if starting else "", delay)
            reasons.append(reason)
        if self.settling is not None:
            self.settling.reasons.extend(reasons)
            self.settling.overdue.extend(overdue)
            return
        queued = self.pool.reclaim()
        taken = {task.seq for task in queued}
        suspects = {seq for seq in self.ledger.tasks if seq not in taken}
        self.settling = Settling(queued, suspects, now + CLAIM_SETTLE_SECONDS, reasons, overdue)

    def _settle(self) -> None:
        settling = self.settling
        assert settling is not None
        if claiming := self.pool.claiming():
            if time.monotonic() >= settling.deadline:
                for index in claiming:
                    if self.pool.kill(index):
                        log.warning(
                            "worker %d (pid %s) stayed between reading a task and naming it for %.1f s: killing it",
                            index,
                            self.pool.pid_of(index),
                            CLAIM_SETTLE_SECONDS,
                        )
            return  # a killed worker's death arrives through poll, and settling goes on
        held = self.pool.held()
        for completion in self.pool.results.read():  # after the slots: a completion is written before its slot clears
            self.on_completion(completion)
        lost = sorted(seq for seq in settling.suspects if seq in self.ledger.tasks and seq not in held)
        self.settling = None
        if all(settling.overdue):  # only workers killed for a deadline died: whatever they held timed out
            self.recovery.timed_out.update(lost)
        verdict = self.recovery.lost(lost)
        self.recovery.timed_out.difference_update(verdict.retry)  # the loss that fails a task names its code
        reason = "; ".join(settling.reasons)
        stores = self.ledger.stored_keys(lost, Op.STORE)  # a lost sweep is sent again itself
        retry = [self.ledger.task(seq) for seq in verdict.retry]
        for seq in verdict.fail:
            self._fail_task(seq, self.recovery.failure_code(seq), f"{reason}; the task had already been retried once")
        if lost:
            log.warning("%d tasks lost to a death: %d sent again, %d failed", len(lost), len(retry), len(verdict.fail))
        if stores:
            self.housekeeping(Op.SWEEP, stores)  # the temp files their writers left
        if self.recovery.broken:
            self.break_tier()
            return
        self.pool.requeue(retry + settling.queued)
        self.pool.resume()

    def _restart_due(self, now: float) -> None:
        room = BOOTING_AT_ONCE - self.pool.booting(time.monotonic_ns() - int(BOOT_SECONDS * 1e9))
        for index in self.recovery.due(now, room):
            try:
                pid = self.pool.start(index)
            except OSError as e:
                reason = f"worker {index} could not start: {block_io.describe(e)[1]}"
                delay = self.recovery.spawn_failed(index, e, now, reason, self.pool.serving())
                self.counts.spawns_failed += 1
                log.log(logging.DEBUG if self.recovery.failed_spawns > 1 else logging.WARNING, "%s; trying again in %.2f s", reason, delay)
                if self.recovery.broken:
                    self.break_tier()
                    return
                continue
            failed = self.recovery.spawned()
            self.counts.workers_restarted += 1
            log.warning("worker %d replaced: pid %s%s", index, pid, f", after {failed} spawns failed for lack of a resource" if failed else "")

    def _enforce_deadlines(self, now: float) -> None:
        """Kill the workers that hold a task past task_timeout, or are still starting past start_timeout."""
        self._next_deadline_check = now + self._deadline_every
        now_ns = time.monotonic_ns()
        task_overdue = now_ns - int(self.task_timeout * 1e9) if self.task_timeout else None
        start_overdue = now_ns - int(self.start_timeout * 1e9)
        recovery = self.recovery
        if (shortage := recovery.unserved(now, bool(self.pool.live()), self.start_timeout)) and self.settling is None:
            code, why = block_io.describe(shortage)  # a SHORTAGES errno: listed in codes
            for task in self.pool.reclaim():  # no worker process: every task is in a pipe
                self._fail_task(task.seq, cast(ErrorCode, code), f"no worker could be started for {self.start_timeout:g} s (start_timeout): {why}")
            self.pool.resume()
        for index in self.pool.live():
            if index in recovery.overdue_kills or index in recovery.stalled_starts:
                continue  # killed already; a process in uninterruptible I/O dies when the I/O returns
            started = self.pool.slots.starting_since(index)
            if started is not None:
                if started < start_overdue and self.pool.kill(index):
                    recovery.stalled_starts.add(index)
                    log.warning(
                        "worker %d (pid %s) did not start within start_timeout %g s: killing it",
                        index,
                        self.pool.pid_of(index),
                        self.start_timeout,
                    )
                continue
            if task_overdue is None:
                continue
            late = [seq for seq, named_at in self.pool.slots.held(index) if named_at < task_overdue and seq in self.ledger.tasks]
            claimed = self.pool.slots.claimed_since(index)
            stuck = claimed is not None and claimed < task_overdue  # stopped between reading a task and naming it
            if (late or stuck) and self.pool.kill(index):
                recovery.timed_out.update(late)
                recovery.overdue_kills.add(index)
                self.counts.tasks_timed_out += len(late) or 1
                log.warning(
                    "worker %d (pid %s) held %s for more than task_timeout %g s: killing it",
                    index,
                    self.pool.pid_of(index),
                    f"task {late[0]}" if late else "a task it had not named yet",
                    self.task_timeout,
                )

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
        pool = self.pool
        for completion in pool.results.read():
            self.on_completion(completion)
        unswept = self.ledger.stored_keys(list(self.ledger.tasks), Op.SWEEP)  # a sweep cancelled here is the host's to do
        for task in pool.reclaim():
            self._fail_task(task.seq, "ECANCELED", "cancelled: the tier shut down before the task started")
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
        self.leftovers = [self.layout.locate(key) for key in set(self.ledger.stored_keys(cut_short, Op.STORE)).union(unswept or ())]
        for seq in list(self.ledger.tasks):
            self._fail_task(seq, code, reason)
        self.pool.close()

    def sweep_leftovers(self) -> None:
        """Once, after ``stop`` and outside the tier's lock: remove the temp files of the stores it cut short."""
        beside, self.leftovers = self.leftovers, []
        if beside:
            try:
                self.counts.files_removed += block_io.remove_stale_temps(self.root, beside)[0]
            except OSError as e:
                log.warning("sweeping temp files at stop failed: %s", block_io.describe(e)[1])
