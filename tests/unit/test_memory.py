"""Mapping a worker's view of the cache: which pages ``Prefault`` puts in this process's page tables."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from mp_tier.memory import PAGE, Prefault, buffer_address

BLOCK = 64 * PAGE
BLOCKS = 4


def present(view: memoryview) -> list[bool]:
    """Whether each page of ``view`` is in this process's page tables (/proc/self/pagemap bit 63)."""
    first = buffer_address(view) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read(view.nbytes // PAGE * 8)
    return [bool(entry >> 63) for (entry,) in struct.iter_unpack("<Q", entries)]


@pytest.fixture
def fresh_view() -> Iterator[memoryview]:
    """A cache file whose pages exist (another mapping wrote them), mapped again as a new worker maps it."""
    fd = os.memfd_create("cache")
    try:
        os.ftruncate(fd, BLOCKS * BLOCK)
        with mmap.mmap(fd, BLOCKS * BLOCK) as writer:
            writer.write(os.urandom(BLOCKS * BLOCK))
        mapping = mmap.mmap(fd, BLOCKS * BLOCK)
    finally:
        os.close(fd)
    view = memoryview(mapping)
    yield view
    view.release()
    mapping.close()


def test_a_fresh_mapping_has_no_page_mapped(fresh_view):
    assert not any(present(fresh_view))


def test_prefault_maps_the_blocks_pages_and_at_most_a_fault_around_window_beside(fresh_view):
    """The kernel maps pages in aligned 64 KiB windows (fault-around, pages already in memory only): a few
    of the neighbours' pages may come along, never a block further away."""
    Prefault(fresh_view, BLOCK).block(2)
    pages = present(fresh_view)
    per_block = BLOCK // PAGE
    assert all(pages[2 * per_block : 3 * per_block])
    assert not any(pages[:per_block])
    assert sum(pages[per_block : 2 * per_block] + pages[3 * per_block :]) <= 2 * (16 - 1)


def test_the_mapped_pages_take_writes_and_hold_the_files_bytes(fresh_view):
    """Mapped by a read populate, yet writable in place (the mapping is shared): a load's copy lands in the file."""
    before = bytes(fresh_view[BLOCK : 2 * BLOCK])
    Prefault(fresh_view, BLOCK).block(1)
    fresh_view[BLOCK : BLOCK + 5] = b"hello"
    assert bytes(fresh_view[BLOCK : 2 * BLOCK]) == b"hello" + before[5:]
