"""Every bad input from docs/errors.md's table gets its clear error and leaves the tier working."""

from __future__ import annotations

import json
import os

import pytest
from bad_input import BAD_JOBS, KEY
from helpers import BLOCK, make_keys, run_job

from mp_tier import ConfigError, FileSystemTierManager, JobMetadata, PrimaryCache, TierClosed
from mp_tier.layout import CONFIG_FILE, MAX_KEY_BYTES


def still_works(tier) -> None:
    keys = make_keys(2, seed=7)
    assert run_job(tier, "store", JobMetadata(job_id=123456, keys=keys, block_ids=[0, 1])).success
    assert run_job(tier, "load", JobMetadata(job_id=123457, keys=keys, block_ids=[2, 3])).success


def test_every_bad_job_raises_and_leaves_the_tier_working(tier):
    """The messages are checked case by case in tests/unit/test_validation.py; here each one goes through a real tier."""
    for what, change, message in BAD_JOBS:
        for kind in ("store", "load"):
            fields = {"job_id": 1, "keys": [KEY], "block_ids": [0]}
            fields.update(change)
            job = fields.pop("job", None) or JobMetadata(**fields)
            with pytest.raises(ValueError, match=message):
                getattr(tier, f"submit_{kind}")(job)
            assert tier.stats().jobs_active == 0 and tier.get_finished() == [], what
    still_works(tier)


def test_duplicate_block_ids_are_refused_for_loads_only(tier):
    keys = make_keys(2)
    with pytest.raises(ValueError, match="block id 5 is loaded twice"):
        tier.submit_load(JobMetadata(job_id=1, keys=keys, block_ids=[5, 5]))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[5, 5])).success
    still_works(tier)


def test_reused_active_job_id(tier):
    tier.submit_store(JobMetadata(job_id=9, keys=[KEY], block_ids=[0]))
    with pytest.raises(ValueError, match="job_id 9 is still active"):
        tier.submit_store(JobMetadata(job_id=9, keys=make_keys(1, seed=3), block_ids=[1]))
    tier.drain(30)
    assert [r.job_id for r in tier.get_finished()] == [9]
    still_works(tier)


@pytest.mark.parametrize(
    "view, message",
    [
        (lambda c: bytearray(c.num_blocks * c.block_bytes), "2-D buffer .*; got 1-D 'B'"),
        (lambda c: bytes(16), "2-D buffer .*; got read-only 1-D"),
        (lambda c: c.array.reshape(4, -1, 1024), "2-D buffer .*; got 3-D"),
        (lambda c: c.array[:, ::2], "C-contiguous 2-D buffer .*; got 2-D"),
        (lambda c: c.array[:0], "2-D buffer .*; got 2-D 'B' of shape \\(0,"),
        (lambda c: "cache", "must be a PrimaryCache, its .array/.view, or a 2-D writable buffer; got str"),
        (lambda c: None, "got NoneType"),
    ],
    ids=["bytearray", "read-only", "3-D", "strided", "empty", "str", "None"],
)
def test_primary_view_that_cannot_be_a_cache(cache, tmp_path, view, message):
    with pytest.raises(ValueError, match=f"primary_kv_view .*{message}"):
        FileSystemTierManager(primary_kv_view=view(cache), root_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_root_dir_that_is_a_file(cache, tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(OSError, match="afile"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(path))


def test_root_dir_that_cannot_be_created(cache):
    with pytest.raises(OSError, match="/proc/mp_tier_root"):
        FileSystemTierManager(primary_kv_view=cache, root_dir="/proc/mp_tier_root")


def test_a_worker_count_under_both_its_names_is_refused_and_a_bad_one_blamed_on_the_name_given(cache, tmp_path):
    """``n_read_threads`` is vLLM's name for ``n_read_workers``: given both, one was dropped without a word
    (1 and 3 made 1 read worker), and a bad value given as ``n_write_threads`` was blamed on
    ``n_write_workers``, a name the host never wrote. Nothing is created under the root either way."""
    with pytest.raises(TypeError, match=r"^n_read_threads and n_read_workers name one setting: give one$"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path), n_read_workers=1, n_read_threads=3)
    with pytest.raises(ConfigError, match=r"^n_write_threads = 0: expected an integer >= 1 and <= 256$"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path), n_write_threads=0)
    assert os.listdir(tmp_path) == []


def test_namespace_written_by_another_block_size_is_refused(make_tier, tmp_path):
    tier = make_tier()
    config = os.path.join(tier.layout.base, CONFIG_FILE)
    tier.shutdown()
    with open(config) as f:
        run = json.load(f)
    run["block_bytes"] = BLOCK * 2
    with open(config, "w") as f:
        json.dump(run, f)
    with pytest.raises(ValueError, match="describes another run"):
        make_tier()


def test_calls_after_shutdown(tier):
    tier.submit_store(JobMetadata(job_id=1, keys=[KEY], block_ids=[0]))
    tier.shutdown()
    assert [r.job_id for r in tier.get_finished()] == [1]
    for call in (
        lambda: tier.submit_store(JobMetadata(job_id=2, keys=[KEY], block_ids=[0])),
        lambda: tier.submit_load(JobMetadata(job_id=2, keys=[KEY], block_ids=[0])),
        lambda: tier.lookup(KEY),
        tier.drain,
        tier.wait,
    ):
        with pytest.raises(TierClosed, match="shut down"):
            call()
    assert tier.get_finished() == []
    assert tier.worker_pids() == [] and tier.stats().workers_alive == 0
    tier.shutdown()


def test_lookup_and_touch_of_a_bad_key(tier):
    for call in (tier.lookup, lambda k: tier.lookup_many([KEY, k]), lambda k: tier.touch([k])):
        for bad in ("abc", b"short", None, bytes(MAX_KEY_BYTES + 1), bytearray(KEY)):
            with pytest.raises(ValueError, match="is not bytes of at least 8"):
                call(bad)
    assert tier.lookup(KEY) is False


def test_bad_cache_sizes():
    for args, message in (((0, 4096), "num_blocks"), ((4, -1), "block_bytes"), ((4.0, 4096), "num_blocks")):
        with pytest.raises(ValueError, match=message):
            PrimaryCache.create(*args)
