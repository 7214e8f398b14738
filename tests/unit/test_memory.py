"""Mapping a worker's view of the cache: which pages ``Prefault`` puts in this process's page tables."""

from __future__ import annotations

import mmap
import os
import resource
import struct
from collections.abc import Iterator

import pytest

from mp_tier.bench.root_dir import fs_type
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


def written(fd: int) -> int:
    """``fd``, its cache file's pages made to exist (another mapping wrote them), as a new worker finds them."""
    os.ftruncate(fd, BLOCKS * BLOCK)
    with mmap.mmap(fd, BLOCKS * BLOCK) as writer:
        writer.write(os.urandom(BLOCKS * BLOCK))
    return fd


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = written(os.memfd_create("cache"))
    yield fd
    os.close(fd)


@pytest.fixture
def fresh_view(memfd) -> Iterator[memoryview]:
    """The cache file mapped again, as a new worker maps it."""
    with mmap.mmap(memfd, BLOCKS * BLOCK) as mapping:
        view = memoryview(mapping)
        yield view
        view.release()


def test_a_fresh_mapping_has_no_page_mapped(fresh_view):
    assert not any(present(fresh_view))


def test_prefault_maps_the_blocks_pages_and_at_most_a_fault_around_window_beside(fresh_view, memfd):
    """The kernel maps pages in aligned 64 KiB windows (fault-around, pages already in memory only): a few
    of the neighbours' pages may come along, never a block further away."""
    Prefault(fresh_view, BLOCK, memfd).block(2)
    pages = present(fresh_view)
    per_block = BLOCK // PAGE
    assert all(pages[2 * per_block : 3 * per_block])
    assert not any(pages[:per_block])
    assert sum(pages[per_block : 2 * per_block] + pages[3 * per_block :]) <= 2 * (16 - 1)


@pytest.fixture(params=["tmpfs", "disk"])
def written_file(request, tmp_path) -> Iterator[int]:
    """An fd of a written cache file: a memfd (tmpfs, as /dev/shm), or a file on a file system that tracks
    writes to shared mappings (the engine may map any shared file)."""
    if request.param == "tmpfs":
        fd = os.memfd_create("cache")
    elif fs_type(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on tmpfs: no file system that tracks writes to test on")
    else:
        fd = os.open(tmp_path / "cache", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    yield written(fd)
    os.close(fd)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_a_populate_is_done_only_where_it_spares_a_loads_writes_their_faults(written_file):
    """A load copies into the block. On tmpfs a read populate maps its pages writable, so the copy takes no
    fault. A file system that tracks writes to shared mappings maps them read-only: the copy would fault on
    every page anyway, and the populate would only add its own cost (a first 2 MiB load on ext4: 165 µs
    faulting, 1025 µs after a populate), so none is done there."""
    data = bytearray(os.urandom(BLOCK))
    with mmap.mmap(written_file, BLOCKS * BLOCK) as mapping:
        view = memoryview(mapping)
        before = faults()
        Prefault(view, BLOCK, written_file).block(2)
        populating = faults() - before
        before = faults()
        view[2 * BLOCK : 3 * BLOCK] = data
        writing = faults() - before
        assert bytes(view[2 * BLOCK : 3 * BLOCK]) == data
        view.release()
    assert writing <= 2 or populating == 0, f"a populate ({populating} faults) left the copy {writing} faults"


def test_the_hook_before_a_blocks_io_is_there_only_until_the_block_is_mapped(written_file):
    """A worker asks for the hook before every block's I/O: most blocks are mapped already, and get none."""
    with mmap.mmap(written_file, BLOCKS * BLOCK) as mapping:
        view = memoryview(mapping)
        prefault = Prefault(view, BLOCK, written_file)
        hook = prefault.hook(2)
        if not os.readlink(f"/proc/self/fd/{written_file}").startswith("/memfd:"):
            assert hook is None  # populating would not help there
        else:
            assert hook is not None and not any(present(view[2 * BLOCK : 3 * BLOCK]))
            hook()
            assert all(present(view[2 * BLOCK : 3 * BLOCK]))
            assert prefault.hook(2) is None and prefault.hook(1) is not None
        view.release()
