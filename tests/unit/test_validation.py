"""Every check of caller input, case by case, with the message that names the bad value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from bad_input import BAD_JOBS, KEY
from helpers import make_keys

from mp_tier.jobs import JobMetadata
from mp_tier.layout import MAX_KEY_BYTES
from mp_tier.validation import checked_job, checked_keys, checked_timeout

NUM_BLOCKS = 256


@pytest.mark.parametrize("what, change, message", BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
@pytest.mark.parametrize("loading", [False, True], ids=["store", "load"])
def test_a_bad_job_is_refused_naming_the_value(what, change, message, loading):
    fields = {"job_id": 1, "keys": [KEY], "block_ids": [0]}
    fields.update(change)
    job = fields.pop("job", None) or JobMetadata(**fields)
    with pytest.raises(ValueError, match=message):
        checked_job(job, loading, NUM_BLOCKS)


def test_a_good_job_comes_back_as_plain_lists():
    keys = make_keys(3)
    for ids in ([0, 1, 255], (0, 1, 255), np.array([0, 1, 255], dtype=np.int32), [np.int64(0), 1, np.uint8(255)]):
        job_id, got_keys, got_ids = checked_job(JobMetadata(job_id=np.int64(5), keys=tuple(keys), block_ids=ids), True, NUM_BLOCKS)
        assert (job_id, got_keys, got_ids) == (5, keys, [0, 1, 255])
        assert type(job_id) is int and all(type(b) is int for b in got_ids)


def test_an_empty_job_is_valid():
    assert checked_job(JobMetadata(job_id=1, keys=[], block_ids=[]), False, NUM_BLOCKS) == (1, [], [])


def test_the_last_block_is_in_range_and_the_next_is_not():
    with pytest.raises(ValueError, match=r"block id 256 is out of range \[0, 256\)"):
        checked_job(JobMetadata(job_id=1, keys=[KEY], block_ids=[NUM_BLOCKS]), False, NUM_BLOCKS)


def test_duplicate_block_ids_are_refused_for_loads_only():
    job = JobMetadata(job_id=1, keys=make_keys(2), block_ids=[5, 5])
    with pytest.raises(ValueError, match="job 1: block id 5 is loaded twice"):
        checked_job(job, True, NUM_BLOCKS)
    assert checked_job(job, False, NUM_BLOCKS)[2] == [5, 5]


@pytest.mark.parametrize("bad", ["abc", b"short", None, bytes(MAX_KEY_BYTES + 1), bytearray(KEY)])
def test_a_bad_key_to_lookup_or_touch(bad):
    with pytest.raises(ValueError, match="is not bytes of at least 8 and at most"):
        checked_keys([KEY, bad])


def test_keys_for_lookup_must_be_ordered():
    with pytest.raises(ValueError, match="keys must be an ordered sequence, not a set"):
        checked_keys({KEY})
    assert checked_keys((KEY,)) == [KEY] and checked_keys(iter([KEY])) == [KEY]


@pytest.mark.parametrize("bad", [-1, math.nan, "1", True, [1]])
def test_a_bad_timeout(bad):
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0 or None"):
        checked_timeout(bad)


def test_no_limit_and_a_limit():
    assert checked_timeout(None) is None and checked_timeout(math.inf) is None
    assert checked_timeout(0) == 0.0 and type(checked_timeout(2)) is float


def test_a_numpy_timeout_is_a_number():
    """A host that computes its timeout with numpy (job ids may be numpy integers too) gets it taken, not a
    refusal that names the good value (``got 2``); numpy's bool stays refused, as bool is."""
    assert checked_timeout(np.int64(2)) == 2.0 and type(checked_timeout(np.float32(0.5))) is float
    assert checked_timeout(np.float64(np.inf)) is None
    for bad in (np.bool_(True), np.float64(np.nan), np.int64(-1)):
        with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0 or None"):
            checked_timeout(bad)
