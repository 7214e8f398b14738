"""The ledger alone: a plan changes nothing, a commit records it, completions fold into their job."""

from __future__ import annotations

import pytest

from mp_tier.channels import FRAME_BYTES, decode_frame
from mp_tier.ledger import Job, Ledger
from mp_tier.messages import Completion, Op

KEYS = [bytes([i]) * 32 + (0).to_bytes(4, "big") for i in range(16)]


def store(job_id: int | None = 1, n: int = 16) -> Job:
    return Job(job_id, Op.STORE, KEYS[:n], list(range(n)), [])


def test_a_plan_splits_and_encodes_but_changes_nothing():
    ledger = Ledger()
    plan = ledger.plan(store(), 4)
    assert [ref.blocks for _, ref in plan.refs] == [4, 4, 4, 4]
    assert [seq for seq, _ in plan.refs] == [0, 1, 2, 3]
    assert len(plan.frames) == 4 * FRAME_BYTES
    tasks = [decode_frame(bytes(plan.frames[i : i + FRAME_BYTES])) for i in range(0, len(plan.frames), FRAME_BYTES)]
    assert [t.keys for t in tasks] == [KEYS[i : i + 4] for i in range(0, 16, 4)]
    assert [t.block_ids for t in tasks] == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert ledger.jobs == {} and ledger.tasks == {} and ledger.in_flight[Op.STORE] == 0
    assert ledger.plan(store(), 4).refs[0][0] == 0, "a plan never committed used no seq"


def test_commit_records_every_task_and_seqs_are_never_reused():
    ledger = Ledger()
    first = ledger.plan(store(1), 2)
    ledger.commit(first)
    assert ledger.jobs == {1: first.job} and set(ledger.tasks) == {0, 1}
    assert first.job.tasks_left == 2 and ledger.in_flight[Op.STORE] == 2
    second = ledger.plan(store(2), 2)
    assert [seq for seq, _ in second.refs] == [2, 3]
    assert ledger.task(1).keys == KEYS[8:16]


def test_housekeeping_has_one_task_and_no_job_entry():
    ledger = Ledger()
    plan = ledger.plan(Job(None, Op.SCAN, [], [], []), 4)
    ledger.commit(plan)
    assert len(plan.refs) == 1 and ledger.jobs == {}
    assert ledger.complete(Completion(seq=0, worker=0, nbytes=0, failed=[])) is not None
    assert ledger.tasks == {}


def test_spread_is_the_idle_workers_of_a_group_and_at_least_one():
    ledger = Ledger()
    assert ledger.spread(Op.STORE, 4) == 4
    ledger.commit(ledger.plan(store(1), 3))
    assert ledger.spread(Op.STORE, 4) == 1 and ledger.spread(Op.LOAD, 4) == 4
    ledger.commit(ledger.plan(store(2), 2))
    assert ledger.spread(Op.STORE, 4) == 1


def test_complete_folds_bytes_failures_and_the_first_error_then_retires_the_job():
    ledger = Ledger()
    plan = ledger.plan(store(7, 8), 2)
    ledger.commit(plan)
    job = plan.job
    ledger.complete(Completion(seq=1, worker=0, nbytes=300, failed=[1], error="ENOSPC: disk full", code="ENOSPC"))
    assert job.failed == [5] and job.unsure == [] and job.code == "ENOSPC" and 7 in ledger.jobs
    ledger.complete(Completion(seq=0, worker=-1, nbytes=100, failed=[0, 2], error="EOWNERDEAD: lost twice", code="EOWNERDEAD"), unsure=True)
    assert job.nbytes == 400 and sorted(job.failed) == [0, 2, 5] and job.unsure == [0, 2]
    assert (job.error, job.code) == ("ENOSPC: disk full", "ENOSPC"), "the first failure's message is kept"
    assert job.tasks_left == 0 and ledger.jobs == {} and ledger.in_flight[Op.STORE] == 0
    assert ledger.complete(Completion(seq=0, worker=0, nbytes=0, failed=[])) is None, "a task failed already is unknown"


def test_a_task_that_overflows_its_frame_is_refused_and_changes_nothing():
    ledger = Ledger()
    huge = Job(1, Op.STORE, [bytes(2000)], [0], [])
    with pytest.raises(ValueError, match="over the 1024-byte frame"):
        ledger.plan(huge, 1)
    assert ledger.jobs == {} and ledger.tasks == {}
    assert ledger.plan(store(), 1).refs[0][0] == 0


def test_stored_keys_names_the_blocks_of_the_tasks_of_one_op():
    ledger = Ledger()
    ledger.commit(ledger.plan(store(1, 4), 2))
    ledger.commit(ledger.plan(Job(2, Op.LOAD, KEYS[4:6], [0, 1], []), 1))
    assert ledger.stored_keys([0, 1, 2], Op.STORE) == KEYS[:4]
    assert ledger.stored_keys([0, 1, 2], Op.SWEEP) == []


def test_left_behind_fails_the_placed_blocks_of_stores_in_flight_only():
    """After a namespace directory was made again: the blocks of a store's ended tasks are in the old one."""
    ledger = Ledger()
    ledger.commit(ledger.plan(store(1), 4))  # seqs 0-3, four blocks each
    ledger.commit(ledger.plan(Job(2, Op.LOAD, KEYS[:4], list(range(4)), []), 2))  # seqs 4-5
    ledger.complete(Completion(seq=0, worker=0, nbytes=400, failed=[]))
    ledger.complete(Completion(seq=1, worker=0, nbytes=300, failed=[2], error="ENOSPC: disk full", code="ENOSPC"))
    ledger.complete(Completion(seq=4, worker=0, nbytes=200, failed=[]))
    ledger.left_behind("moved")
    job = ledger.jobs[1]
    assert sorted(job.failed) == [0, 1, 2, 3, 4, 5, 6, 7] and job.unsure == []
    assert (job.error, job.code) == ("ENOSPC: disk full", "ENOSPC"), "the first failure's message is kept"
    assert ledger.jobs[2].failed == [], "a load places nothing"
    ledger.complete(Completion(seq=2, worker=0, nbytes=400, failed=[]))
    ledger.left_behind("moved again")
    assert sorted(job.failed) == list(range(12)), "each block failed once"
