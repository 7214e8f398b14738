"""Applying recovery to the worker pool: deaths recorded, claims settled, replacements started, deadlines enforced.

``recovery`` decides from facts; these functions gather the facts from the
pool and carry out the answers on it. They run inside the coordinator's pump,
under the tier's lock, and never block.

A death is settled in steps across pumps, never by waiting: the pipes are
emptied and held, and once no live worker is between reading a task and
naming it (see ``slots``), every task that had left a pipe is named by a
live worker, complete, or was the dead one's. Those are sent again once
(a second loss fails the job), then the pipes flow again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from . import block_io
from .codes import ErrorCode
from .jobs import Counters
from .ledger import Ledger
from .messages import Completion, Op, Task
from .pool import WorkerPool
from .recovery import BOOT_SECONDS, BOOTING_AT_ONCE, CLAIM_SETTLE_SECONDS, Recovery, Settling

log = logging.getLogger(__name__)


def record_deaths(
    pool: WorkerPool,
    recovery: Recovery,
    dead: list[int],
    settling: Settling | None,
    tasks: Collection[int],
    task_timeout: float,
    start_timeout: float,
) -> Settling:
    """Forget the dead workers and schedule their replacements; returns the death being settled, ``settling``
    with these deaths added, or a new one: the pipes held, and what they still held taken back (every other
    task of ``tasks`` may have been a dead worker's)."""
    now = time.monotonic()
    reasons, overdue = [], []
    for index in dead:
        # killed for start_timeout as it became ready: still a death at start, and the kill was for a deadline
        starting = pool.slots.starting(index) or index in recovery.stalled_starts
        reason = pool.forget(index)
        overdue.append(index in recovery.overdue_kills or index in recovery.stalled_starts)
        if index in recovery.overdue_kills:
            recovery.overdue_kills.discard(index)
            reason += f"; the tier killed it for holding a task past task_timeout {task_timeout:g} s"
        elif index in recovery.stalled_starts:
            recovery.stalled_starts.discard(index)
            reason += f"; the tier killed it for not starting within start_timeout {start_timeout:g} s"
        delay = recovery.died(index, starting, now, reason, pool.serving())
        log.warning("%s%s; replacing it in %.2f s", reason, " while starting" if starting else "", delay)
        reasons.append(reason)
    if settling is not None:
        settling.reasons.extend(reasons)
        settling.overdue.extend(overdue)
        return settling
    queued = pool.reclaim()
    taken = {task.seq for task in queued}
    return Settling(queued, {seq for seq in tasks if seq not in taken}, now + CLAIM_SETTLE_SECONDS, reasons, overdue)


def still_claiming(pool: WorkerPool, settling: Settling) -> bool:
    """Whether a live worker is between reading a task and naming it; one that stays there past the deadline is killed."""
    claiming = pool.claiming()
    if claiming and time.monotonic() >= settling.deadline:
        for index in claiming:
            if pool.kill(index):
                log.warning(
                    "worker %d (pid %s) stayed between reading a task and naming it for %.1f s: killing it",
                    index,
                    pool.pid_of(index),
                    CLAIM_SETTLE_SECONDS,
                )
    return bool(claiming)  # a killed worker's death arrives through poll, and settling goes on


def settle(
    pool: WorkerPool,
    ledger: Ledger,
    recovery: Recovery,
    settling: Settling,
    fold: Callable[[Completion], None],
    fail: Callable[[int, ErrorCode, str, bool], None],
) -> tuple[list[bytes], list[Task]]:
    """No live worker is claiming any more: fold in what was completed meanwhile, and find what the dead held.

    Tasks lost for the second time ``fail``; returns the keys of the lost stores (whose writers may have left
    temp files) and the tasks to send again, once.
    """
    held = pool.held()
    for completion in pool.results.read():  # after the slots: a completion is written before its slot clears
        fold(completion)
    lost = sorted(seq for seq in settling.suspects if seq in ledger.tasks and seq not in held)
    if all(settling.overdue):  # only workers killed for a deadline died: whatever they held timed out
        recovery.timed_out.update(lost)
    verdict = recovery.lost(lost)
    recovery.timed_out.difference_update(verdict.retry)  # the loss that fails a task names its code
    reason = "; ".join(settling.reasons)
    stores = ledger.stored_keys(lost, Op.STORE)  # a lost sweep is sent again itself
    retry = [ledger.task(seq) for seq in verdict.retry]
    for seq in verdict.fail:
        fail(seq, recovery.failure_code(seq), f"{reason}; the task had already been retried once", True)  # a dead worker held it
    if lost:
        log.warning("%d tasks lost to a death: %d sent again, %d failed", len(lost), len(retry), len(verdict.fail))
    return stores, retry


def restart_due(pool: WorkerPool, recovery: Recovery, counts: Counters, now: float) -> bool:
    """Start the replacements that are due, a few at a time; True if a spawn that failed broke the tier."""
    room = BOOTING_AT_ONCE - pool.booting(time.monotonic_ns() - int(BOOT_SECONDS * 1e9))
    for index in recovery.due(now, room):
        try:
            pid = pool.start(index)
        except OSError as e:
            reason = f"worker {index} could not start: {block_io.describe(e)[1]}"
            delay = recovery.spawn_failed(index, e, now, reason, pool.serving())
            counts.spawns_failed += 1
            log.log(logging.DEBUG if recovery.failed_spawns > 1 else logging.WARNING, "%s; trying again in %.2f s", reason, delay)
            if recovery.broken:
                return True
            continue
        failed = recovery.spawned()
        counts.workers_restarted += 1
        log.warning("worker %d replaced: pid %s%s", index, pid, f", after {failed} spawns failed for lack of a resource" if failed else "")
    return False


def kill_overdue(pool: WorkerPool, recovery: Recovery, tasks: Collection[int], counts: Counters, task_timeout: float, start_timeout: float) -> None:
    """Kill the workers that hold a task of ``tasks`` past task_timeout, or are still starting past start_timeout."""
    now_ns = time.monotonic_ns()
    task_overdue = now_ns - int(task_timeout * 1e9) if task_timeout else None
    start_overdue = now_ns - int(start_timeout * 1e9)
    for index in pool.live():
        if index in recovery.overdue_kills or index in recovery.stalled_starts:
            continue  # killed already; a process in uninterruptible I/O dies when the I/O returns
        started = pool.slots.starting_since(index)
        if started is not None:
            if started < start_overdue and pool.kill(index):
                recovery.stalled_starts.add(index)
                log.warning("worker %d (pid %s) did not start within start_timeout %g s: killing it", index, pool.pid_of(index), start_timeout)
            continue
        if task_overdue is None:
            continue
        late = [seq for seq, named_at in pool.slots.held(index) if named_at < task_overdue and seq in tasks]
        claimed = pool.slots.claimed_since(index)
        stuck = claimed is not None and claimed < task_overdue  # stopped between reading a task and naming it
        if (late or stuck) and pool.kill(index):
            recovery.timed_out.update(late)
            recovery.overdue_kills.add(index)
            counts.tasks_timed_out += len(late) or 1
            log.warning(
                "worker %d (pid %s) held %s for more than task_timeout %g s: killing it",
                index,
                pool.pid_of(index),
                f"task {late[0]}" if late else "a task it had not named yet",
                task_timeout,
            )
