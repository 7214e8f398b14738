"""Layout alone: every key maps to a path that parses back to it, and nothing else parses."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mp_tier.layout import (
    BLOCK_SUFFIX,
    GROUP_BYTES,
    HOST_TAG,
    MAX_KEY_BYTES,
    MIN_KEY_BYTES,
    NAME_MAX,
    BlockLayout,
    BlockPath,
    temp_name,
    temp_target,
    temp_writer_pid,
)

LAYOUT = BlockLayout("/ns")
is_layout_dir, parse_block = BlockLayout.is_layout_dir, BlockLayout.parse_block
keys = st.binary(min_size=MIN_KEY_BYTES, max_size=MAX_KEY_BYTES)


@given(keys)
def test_every_key_round_trips_through_its_path(key):
    where = LAYOUT.locate(key)
    parents = where.dir.split("/")
    assert all(is_layout_dir(parents[:i], parents[i]) for i in range(len(parents)))
    assert parse_block(parents, where.name) == key
    assert LAYOUT.path(key) == f"/ns/{where.dir}/{where.name}"


@given(keys)
def test_the_longest_temp_name_fits_name_max(key):
    name = temp_name(LAYOUT.locate(key).name)
    assert len(name.encode()) <= NAME_MAX
    assert temp_target(name) == LAYOUT.locate(key).name and temp_writer_pid(name) == os.getpid()


def test_the_group_bounds_round_trip():
    for group in (0, 1, 2**32 - 1):
        key = bytes(range(32)) + group.to_bytes(GROUP_BYTES, "big")
        where = LAYOUT.locate(key)
        assert parse_block(where.dir.split("/"), where.name) == key


def test_a_block_is_named_by_its_hash_prefixes_and_group():
    key = bytes.fromhex("abcdef0123") + bytes(27) + (4242).to_bytes(GROUP_BYTES, "big")
    assert LAYOUT.locate(key) == BlockPath("abc/de_g4242", "abcdef0123" + "00" * 27 + BLOCK_SUFFIX)


@pytest.mark.parametrize("size", [0, MIN_KEY_BYTES - 1, MAX_KEY_BYTES + 1, 132])
def test_a_key_of_no_block_size_is_refused_naming_its_size(size):
    """The one author of block names names only keys: a name made for any other would be one a scan passes
    over as someone else's (a hash over 108 bytes), or one past NAME_MAX."""
    with pytest.raises(ValueError, match=f"a key of {size} bytes names no block: {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes"):
        LAYOUT.locate(bytes(size))


@pytest.mark.parametrize("size", range(MAX_KEY_BYTES + 24))
def test_a_key_is_named_only_if_its_name_parses_back(size):
    key = os.urandom(size)
    try:
        where = LAYOUT.locate(key)
    except ValueError:
        assert not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES
    else:
        assert parse_block(where.dir.split("/"), where.name) == key


GOOD_DIR = ["000", "10_g7"]
GOOD_NAME = "0001" + "00" * 30 + BLOCK_SUFFIX


def test_the_good_name_parses():
    assert parse_block(GOOD_DIR, GOOD_NAME) is not None


@pytest.mark.parametrize(
    "parents, name",
    [
        (["000", "00_g7"], GOOD_NAME),  # the second directory's prefix is not the hash's
        (["001", "10_g7"], GOOD_NAME),  # nor the first's
        (["000", "10_g07"], GOOD_NAME),  # a leading zero: two names for one group
        (["000", "10_g4294967296"], GOOD_NAME),  # a group past 2**32
        (["000", "10_g²"], GOOD_NAME),  # str.isdigit takes it, int() does not
        (["000", "10_g٣"], GOOD_NAME),  # int() reads it as 3
        (["000", "10_g"], GOOD_NAME),
        (["000", "10_g7"], GOOD_NAME.upper()),
        (["000", "10_g7"], "0001" + "00" * 30 + "0" + BLOCK_SUFFIX),  # odd length
        (["000", "10_g7"], "0001" + "00" + BLOCK_SUFFIX),  # a hash shorter than 4 bytes
        (["000", "10_g7"], "0001" + "00" * MAX_KEY_BYTES + BLOCK_SUFFIX),  # longer than a key may be
        (["000", "10_g7"], "0001" + "00" * 30 + ".bin.tmp"),
        (["000", "10_g7"], "../" + GOOD_NAME),
        (["000", "10_g7", "x"], GOOD_NAME),
        (["000"], GOOD_NAME),
        (["0g0", "10_g7"], GOOD_NAME),
    ],
)
def test_a_name_the_layout_never_gives_is_not_a_block(parents, name):
    assert parse_block(parents, name) is None


@pytest.mark.parametrize(
    "name",
    [
        f"x.bin.{HOST_TAG}.123.tmp.x",  # not ending in the suffix
        f".{HOST_TAG}.123.0.tmp",  # no target
        "x.bin.0.tmp",  # too few parts
    ],
)
def test_a_name_that_is_not_a_temp_name(name):
    assert temp_target(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "x.bin.deadbeef.123.0.tmp",  # another host's tag
        f"x.bin.{HOST_TAG}.12٣.0.tmp",
        f"x.bin.{HOST_TAG}.99999999999.0.tmp",  # more digits than a pid has
        f"x.bin.{HOST_TAG}.0.0.tmp",
        f"x.bin.{HOST_TAG}.{1 << 31}.0.tmp",
    ],
)
def test_a_temp_name_whose_writer_is_not_a_process_of_this_host(name):
    assert temp_writer_pid(name) is None
