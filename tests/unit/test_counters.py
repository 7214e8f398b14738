"""The counters mirror TierStats field for field, and add up a finished job by its kind and outcome."""

from __future__ import annotations

from mp_tier.jobs import Counters, TierStats

# TierStats' fields read from the tier's state when it is asked, not counted.
STATE = {
    "blocks_evicted", "jobs_active", "bytes_counted", "blocks_seen_elsewhere", "tasks_queued",
    "workers_alive", "workers_starting", "tasks_by_worker",
}  # fmt: skip


def test_every_counter_is_a_field_of_tierstats_and_every_other_field_is_state():
    assert set(Counters.__struct_fields__) == set(TierStats.__struct_fields__) - STATE
    assert all(TierStats.__annotations__[name] == "int" for name in Counters.__struct_fields__)


def test_a_finished_job_counts_by_kind_and_outcome():
    counts = Counters()
    counts.add_job(True, True, 100)
    counts.add_job(True, False, 30)
    counts.add_job(False, True, 7)
    assert (counts.jobs_stored, counts.bytes_stored, counts.jobs_loaded, counts.bytes_loaded) == (1, 130, 1, 7)
    assert type(counts.jobs_stored) is int
