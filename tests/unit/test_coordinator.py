"""The coordinator against a fake pool: the submit path, completions, deaths and shutdown, with no process.

The fake stands in for the worker processes only: the ledger, residency, recovery and the frames are the
real ones. A test plays the workers by hand: it takes a task from the pipes, completes it or dies holding it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mp_tier.capacity import CapacityIndex
from mp_tier.channels import FRAME_BYTES, decode_frame
from mp_tier.config import TierConfig
from mp_tier.coordinator import Coordinator
from mp_tier.host_root import HostRoot
from mp_tier.jobs import JobResult
from mp_tier.layout import BlockLayout
from mp_tier.messages import Completion, Op, Task
from mp_tier.namespace import owners_for
from mp_tier.residency import Residency

BLOCK = 4096
KEYS = [bytes([i]) * 32 + (0).to_bytes(4, "big") for i in range(8)]
READER, WRITER = 0, 1


class FakeSlots:
    """No worker is starting, claiming or holding a named task: every task a worker took is the test's to settle."""

    def starting(self, worker: int) -> bool:
        return False

    def starting_since(self, worker: int) -> int | None:
        return None

    def claimed_since(self, worker: int) -> int | None:
        return None

    def held(self, worker: int) -> list[tuple[int, int]]:
        return []


class FakeResults:
    def __init__(self) -> None:
        self.pending: list[Completion] = []

    def read(self) -> list[Completion]:
        read, self.pending = self.pending, []
        return read


class FakePool:
    """One reader and one writer that are never processes; what the coordinator calls on a WorkerPool."""

    def __init__(self) -> None:
        self.specs = [READER, WRITER]
        self.slots = FakeSlots()
        self.results = FakeResults()
        self.queued: list[Task] = []  # in the pipes (the host's backlog and the pipes are one here)
        self.alive = {READER, WRITER}
        self.dead: list[int] = []
        self.closed = False

    # what the coordinator calls
    def submit(self, op: Op, frames: bytearray) -> None:
        self.queued += [decode_frame(bytes(frames[i : i + FRAME_BYTES])) for i in range(0, len(frames), FRAME_BYTES)]

    def requeue(self, tasks: list[Task]) -> None:
        self.queued[:0] = tasks

    def backlog(self, op: Op) -> int:
        return sum(task.op == op for task in self.queued)

    def jobs_waiting(self, op: Op) -> int:
        return self.backlog(op)  # probes count under Op.PROBE here, never under a job's op

    def poll(self) -> tuple[list[Completion], list[int]]:
        dead, self.dead = self.dead, []
        return self.results.read(), dead

    def reclaim(self) -> list[Task]:
        queued, self.queued = self.queued, []
        return queued

    def forget(self, worker: int) -> str:
        self.alive.discard(worker)
        return f"worker {worker} died"

    def start(self, worker: int) -> int | None:
        self.alive.add(worker)
        return None

    def stop(self, timeout: float, on_result: Callable[[Completion], None]) -> list[str]:
        self.alive.clear()
        return []

    def close(self) -> None:
        self.closed = True

    def live(self) -> list[int]:
        return sorted(self.alive)

    def serving(self) -> bool:
        return bool(self.alive)

    def booting(self, since_ns: int) -> int:
        return 0

    def held(self) -> set[int]:
        return set()

    def held_at_stop(self) -> set[int]:
        return set()

    def claiming(self) -> list[int]:
        return []

    def flush(self) -> None:
        pass

    def resume(self) -> None:
        pass

    # the test's hands, as a worker's
    def take(self) -> Task:
        return self.queued.pop(0)

    def complete(self, worker: int, task: Task) -> None:
        self.results.pending.append(Completion(task.seq, worker, BLOCK * len(task.keys), []))

    def die(self, worker: int) -> None:
        self.dead.append(worker)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[HostRoot]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield HostRoot(fd, BlockLayout(str(tmp_path)), owners_for(False), BLOCK)
    os.close(fd)


def coordinator(root: HostRoot, max_bytes: int = 0, max_queued_tasks: int = 0) -> tuple[Coordinator, FakePool]:
    pool = FakePool()
    config = TierConfig(root_dir=root.layout.base, n_read_workers=1, n_write_workers=1, max_queued_tasks=max_queued_tasks)
    residency = Residency(CapacityIndex(BLOCK, max_bytes, evict=False), events=False, namespace=root.holds)
    return Coordinator(pool, residency, root, config), pool  # type: ignore[arg-type]


def finished(core: Coordinator) -> list[JobResult]:
    core.pump()
    results, core.finished = core.finished, []
    return results


def test_a_submit_is_planned_and_sent(root: HostRoot) -> None:
    core, pool = coordinator(root)
    assert core.submit(Op.STORE, 7, KEYS[:4], [0, 1, 2, 3]) is None
    [task] = pool.queued
    assert (task.op, task.keys, task.block_ids) == (Op.STORE, KEYS[:4], [0, 1, 2, 3])
    assert core.jobs_active() == 1 and set(core.residency.storing) == set(KEYS[:4])
    assert core.lookup(KEYS[0]) is None, "a block being stored is neither on disk nor off it"
    with pytest.raises(ValueError, match="job_id 7 is still active"):
        core.submit(Op.LOAD, 7, KEYS[:1], [0])


@pytest.mark.parametrize(("limits", "code"), [({"max_queued_tasks": 1}, "EAGAIN"), ({"max_bytes": 4 * BLOCK}, "ENOSPC")])
def test_a_refusal_returns_its_result_and_changes_nothing(root: HostRoot, limits: dict[str, int], code: str) -> None:
    core, pool = coordinator(root, **limits)
    assert core.submit(Op.STORE, 1, KEYS[:4], [0, 1, 2, 3]) is None
    before = (list(pool.queued), dict(core.ledger.tasks), dict(core.residency.storing), core.residency.capacity.used_bytes)
    refused = core.submit(Op.STORE, 2, KEYS[4:8], [4, 5, 6, 7])
    assert refused is not None and (refused.job_id, refused.success, refused.error_code) == (2, False, code)
    assert refused.error is not None and refused.error.startswith(f"{code}: ")
    assert (pool.queued, core.ledger.tasks, core.residency.storing, core.residency.capacity.used_bytes) == before
    assert core.jobs_active() == 1


def test_a_completion_yields_one_result(root: HostRoot) -> None:
    core, pool = coordinator(root)
    core.submit(Op.STORE, 1, KEYS[:2], [0, 1])
    pool.complete(WRITER, pool.take())
    [result] = finished(core)
    assert (result.job_id, result.success, result.transfer_size) == (1, True, 2 * BLOCK)
    assert finished(core) == [] and core.idle() and not core.residency.storing
    assert core.snapshot().jobs_stored == 1 and core.snapshot().tasks_by_worker == (0, 1)


def test_a_dead_workers_task_is_sent_again_once_then_fails_with_eownerdead(root: HostRoot) -> None:
    core, pool = coordinator(root)
    core.submit(Op.LOAD, 1, KEYS[:2], [0, 1])
    first = pool.take()
    pool.die(READER)
    assert finished(core) == []
    assert pool.queued == [first], "sent again, as it was"
    assert READER in pool.alive and core.snapshot().workers_restarted == 1
    pool.take()
    pool.die(READER)
    [result] = finished(core)
    assert (result.job_id, result.success, result.error_code) == (1, False, "EOWNERDEAD")
    assert result.error is not None and "retried once" in result.error
    assert pool.queued == [] and core.idle() and finished(core) == []


def test_shutdown_cancels_the_queued_tasks(root: HostRoot) -> None:
    core, pool = coordinator(root)
    core.submit(Op.STORE, 1, KEYS[:2], [0, 1])
    core.submit(Op.LOAD, 2, KEYS[2:4], [2, 3])
    core.shutdown(0)
    assert sorted((r.job_id, r.success, r.error_code) for r in core.finished) == [(1, False, "ECANCELED"), (2, False, "ECANCELED")]
    assert pool.closed and pool.queued == [] and core.idle() and core.worker_pids(ready=False) == []
