"""Jobs and their tasks, from plan to the last completion.

A job is split into tasks that each fit one frame. ``plan`` does all of the
work that can fail (sizing, encoding) and changes nothing; ``commit`` records
the plan, which cannot fail; ``complete`` folds a task's completion into its
job. So a submit either queues a whole job or leaves the ledger as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

from .channels import FRAME_BYTES, TASK_HEADER, TaskFields, encode_frames
from .messages import Completion, Op, Task

# Bytes a Task needs besides its blocks (array headers, seq, op), and per
# block besides the key itself (a msgpack bin header and a block id up to
# 2**63), and per evicted key besides the key.
_TASK_OVERHEAD = 32
_BLOCK_OVERHEAD = 12
_EVICT_OVERHEAD = 3


class Job:
    """A submitted job while its tasks are out, or the tier's own housekeeping (``job_id`` None)."""

    __slots__ = ("code", "error", "evict", "failed", "ids", "job_id", "keys", "nbytes", "op", "start", "tasks_left", "unsure")

    def __init__(self, job_id: int | None, op: Op, keys: list[bytes], ids: list[int], evict: list[bytes]):
        self.job_id = job_id
        self.op = op
        self.keys = keys
        self.ids = ids
        self.evict = evict  # blocks its tasks delete first, aligned with keys
        self.tasks_left = 0  # set by commit; the job is done at zero
        self.nbytes = 0  # bytes moved so far
        self.failed: list[int] = []  # indices (into keys) of blocks that did not move
        # ... of those, the ones that may be on disk: a store's that a worker may have begun before their task failed,
        # or whose name still holds a file (one there before the store)
        self.unsure: list[int] = []
        self.error: str | None = None  # the first failure's message
        self.code: str | None = None  # ... and its errno name
        self.start = time.perf_counter()


class TaskRef(NamedTuple):
    """A task's share of its job: ``blocks`` blocks from ``first`` (one task with no blocks for SCAN or SWEEP)."""

    job: Job
    first: int
    blocks: int


class Plan(NamedTuple):
    """A job split and encoded, ready to commit: the frames go to the pipe of ``job.op``."""

    job: Job
    refs: list[tuple[int, TaskRef]]  # (seq, ref) per task, in frame order
    frames: bytearray


def blocks_per_task(keys: Sequence[bytes], evict: Sequence[bytes], workers: int) -> int:
    """One task per worker of the group, as many blocks as fit a frame."""
    per_block = max(map(len, keys), default=0) + _BLOCK_OVERHEAD
    if evict:
        per_block += max(map(len, evict)) + _EVICT_OVERHEAD
    fit = (FRAME_BYTES - TASK_HEADER - _TASK_OVERHEAD) // per_block
    return max(1, min(-(-max(len(keys), len(evict)) // workers), fit))


class Ledger:
    """Every job without a result yet and every task without a completion."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}  # engine jobs by id, until their result is produced
        self.tasks: dict[int, TaskRef] = {}  # tasks by seq, until their completion (or failure) is folded in
        self.in_flight: dict[Op, int] = dict.fromkeys(Op, 0)  # tasks of each kind in the ledger, until their completion is read
        self._next_seq = 0  # seqs are never reused within a tier

    def spread(self, op: Op, workers: int) -> int:
        """How many tasks a new job of ``op`` is split over: the workers of its group less the tasks of its
        kind in the ledger, at least one.

        A lone job is shared by every worker of its group, so it finishes soonest; once each of them has a
        task, a further split would only add frames, completions and wake-ups for the same work. A task
        counts until its completion is read, so a host that submits without polling in between (vLLM's
        scheduler polls every step) may send a job whole to a worker that has just become free.
        """
        return max(1, workers - self.in_flight[op])

    def plan(self, job: Job, workers: int) -> Plan:
        """Split ``job`` over ``workers`` and encode its frames; raises ValueError (a frame overflow) changing nothing."""
        count = max(len(job.keys), len(job.evict))
        per_task = blocks_per_task(job.keys, job.evict, workers)
        tasks: list[TaskFields] = []
        refs = []
        seq = self._next_seq
        for first in range(0, count or 1, per_task):
            last = first + per_task
            tasks.append((seq, job.op, job.ids[first:last], job.keys[first:last], job.evict[first:last]))
            refs.append((seq, TaskRef(job, first, min(last, count) - first)))
            seq += 1
        return Plan(job, refs, encode_frames(tasks))

    def commit(self, plan: Plan) -> None:
        self.tasks.update(plan.refs)
        self.in_flight[plan.job.op] += len(plan.refs)
        plan.job.tasks_left = len(plan.refs)
        self._next_seq += len(plan.refs)
        if plan.job.job_id is not None:
            self.jobs[plan.job.job_id] = plan.job

    def complete(self, completion: Completion, unsure: bool = False) -> TaskRef | None:
        """Fold a final completion into its job; None if the task is unknown (failed already).

        ``unsure``: the host failed the task, and a worker may have begun it: its failed blocks may be on disk.
        """
        ref = self.tasks.pop(completion.seq, None)
        if ref is None:
            return None
        job = ref.job
        self.in_flight[job.op] -= 1
        job.nbytes += completion.nbytes
        if completion.failed:
            job.failed.extend(ref.first + i for i in completion.failed)
            if unsure:
                job.unsure.extend(ref.first + i for i in completion.failed)
            elif completion.present:
                job.unsure.extend(ref.first + i for i in completion.present)
            if job.error is None:
                job.error, job.code = completion.error, completion.code
        job.tasks_left -= 1
        if job.tasks_left == 0 and job.job_id is not None:
            del self.jobs[job.job_id]
        return ref

    def left_behind(self, reason: str) -> None:
        """The namespace directory was replaced: blocks of stores in flight whose tasks already ended are in the
        old one. They fail (ESTALE, ``reason``), so no job reports a block stored that is not at its path. A
        scan in flight may be listing the old one: it is marked stale (ESTALE), and what it finds is not taken."""
        pending: dict[int, tuple[Job, set[int]]] = {}
        for job, first, blocks in self.tasks.values():
            if job.op == Op.STORE:
                pending.setdefault(id(job), (job, set()))[1].update(range(first, first + blocks))
            elif job.op == Op.SCAN:
                job.error, job.code = reason, "ESTALE"
        for job, waiting in pending.values():
            if placed := sorted(set(range(len(job.keys))).difference(waiting, job.failed)):
                job.failed.extend(placed)
                if job.error is None:
                    job.error, job.code = reason, "ESTALE"

    def task(self, seq: int) -> Task:
        """The task ``seq`` as it was sent, to send again."""
        job, first, blocks = self.tasks[seq]
        last = first + blocks
        return Task(seq, job.op, job.ids[first:last], job.keys[first:last], list(job.evict[first:last]))

    def stored_keys(self, seqs: list[int], op: Op) -> list[bytes]:
        """The keys of the ``op`` tasks among ``seqs``: where a killed writer may have left temp files (STORE),
        or where a sweep was still to look for them (SWEEP)."""
        return [key for seq in seqs if (ref := self.tasks[seq]).job.op == op for key in ref.job.keys[ref.first : ref.first + ref.blocks]]
