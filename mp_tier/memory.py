"""The primary cache's bytes as another process maps them: a range of a shared file.

Workers never attach by name and never touch a resource tracker: the host
hands each one an open fd of the file behind the cache (a segment in
/dev/shm that mp_tier created, or the mapping an engine such as vLLM made
itself), with the range to map. So a worker's exit can unlink nothing, a
respawn works even if the name was removed, and memory mp_tier did not
create is used in place, with no copy.

This module imports no numpy: a worker process starts with the little it needs.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from collections.abc import Callable
from typing import Any

import msgspec

PAGE = mmap.ALLOCATIONGRANULARITY
_MADV_POPULATE_READ = 22  # Linux 5.14+
_TMPFS_MAGIC = 0x01021994  # <linux/magic.h>: /dev/shm, memfd
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_fstatfs.restype = ctypes.c_int


class SharedRegion(msgspec.Struct, frozen=True):
    """Bytes ``[offset, offset + length)`` of the file open as ``fd`` in the host."""

    fd: int
    offset: int
    length: int


class PrivateMemory(ValueError):
    """A buffer no other process can map (anonymous or private memory)."""


def map_region(region: SharedRegion) -> tuple[mmap.mmap, memoryview]:
    """Map ``region`` shared and writable; return the mapping and a flat view of exactly its bytes."""
    start = region.offset - region.offset % PAGE
    mapping = mmap.mmap(region.fd, region.length + region.offset - start, mmap.MAP_SHARED, offset=start)
    return mapping, memoryview(mapping)[region.offset - start :]


class Prefault:
    """Maps each block's pages into this process's page tables before its first I/O here, in one system call.

    A worker maps the cache afresh, so its first I/O on each page faults, and
    a load's copy into the cache (or O_DIRECT's page pinning) takes a write
    fault per 4 KiB page: the first load of a 2 MiB block into a fresh mapping
    cost 820 µs on tmpfs against 158 µs once mapped. ``MADV_POPULATE_READ``
    maps the same pages 16 at a time (fault-around), writable since the
    mapping is shared and tmpfs tracks no writes: 290 µs, once per block and
    process. Nothing is mapped that the I/O would not map but, in the same
    64 KiB windows, pages of the neighbouring blocks already in memory. Off
    for a file on any other file system (``fd``): one that tracks writes to
    shared mappings maps the pages read-only, so a load's copy faults on each
    again and the populate only adds (a first 2 MiB load on ext4: 165 µs
    faulting, 1025 µs populated). A kernel without it (before 5.14: EINVAL)
    turns it off; any other refusal leaves the block to fault as before.

    Lanes share one: a block two lanes start at once is mapped twice, which is harmless.
    """

    def __init__(self, view: memoryview, block_bytes: int, fd: int) -> None:
        self._start = buffer_address(view)
        self._block_bytes = block_bytes
        self._mapped = bytearray(view.nbytes // block_bytes)  # 1: this process has mapped the block's pages (or tried to)
        self._on = _on_tmpfs(fd)  # and until the kernel says it has no MADV_POPULATE_READ

    def hook(self, block_id: int) -> Callable[[], None] | None:
        """What to call just before block ``block_id``'s bytes move: None once it is mapped (most blocks)."""
        if not self._on or self._mapped[block_id]:
            return None
        return functools.partial(self.block, block_id)

    def hooks(self, block_ids: list[int]) -> list[Callable[[], None] | None] | None:
        """``hook`` of each block, or None if no block needs one (a batch then calls nothing)."""
        if not self._on:
            return None
        hooks = [self.hook(block_id) for block_id in block_ids]
        return hooks if any(hooks) else None

    def block(self, block_id: int) -> None:
        """Map block ``block_id``'s pages, unless done before; never fails."""
        if not self._on or self._mapped[block_id]:
            return
        self._mapped[block_id] = 1
        first = self._start + block_id * self._block_bytes
        page = first - first % PAGE
        if _madvise(page, first + self._block_bytes - page, _MADV_POPULATE_READ) != 0 and ctypes.get_errno() == errno.EINVAL:
            self._on = False


def _on_tmpfs(fd: int) -> bool:
    """Whether ``fd`` is a tmpfs file: the one file system whose pages a read populate maps writable."""
    statfs = (ctypes.c_long * 32)()  # struct statfs, f_type first; 120 bytes on 64-bit Linux
    return _fstatfs(fd, statfs) == 0 and statfs[0] == _TMPFS_MAGIC


def buffer_address(view: memoryview) -> int:
    """Where ``view``'s first byte is in this process (the view must be writable, as a cache is)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def find_backing(view: memoryview) -> tuple[str, int]:
    """The file mapped shared under ``view`` and the file offset of its first byte.

    Read from /proc/self/maps. One mapping may show as several lines (VMAs)
    once part of it was madvise()d or mlock()ed: adjacent lines of the same
    file (device and inode) at consecutive offsets are one run of it. A file
    already unlinked (``(deleted)``) is reached through an fd of this process
    that still holds it, or else /proc/self/map_files (root only). Raises
    PrivateMemory naming the mapping when no other process could see the
    same bytes.
    """
    address = buffer_address(view)
    end = address + view.nbytes
    reached = address  # the buffer's bytes below this lie in the run found so far
    run: tuple[str, str, int] | None = None  # device, inode, file offset minus address: the same on every line
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if high <= reached:
                continue
            if low > reached:
                break  # a hole in the address space (the lines are in address order)
            perms, file_offset = fields[1], int(fields[2], 16)
            name = fields[5].rstrip("\n") if len(fields) > 5 else ""
            if perms[3] != "s" or not name.startswith("/") or "w" not in perms:
                what = name or "anonymous memory"
                raise PrivateMemory(f"the buffer lies in a {perms} mapping of {what}, which worker processes cannot map")
            if run is None:
                run, first = (fields[3], fields[4], file_offset - low), (name, fields[0])
            elif run != (fields[3], fields[4], file_offset - low):
                raise PrivateMemory(f"the buffer spans more than one mapping ({first[1]} and {fields[0]} are not one run of a file)")
            reached = high
            if reached >= end:
                path = first[0]
                if path.endswith(" (deleted)"):
                    path = _open_copy(int(run[1])) or f"/proc/self/map_files/{first[1]}"
                return path, address + run[2]
    raise PrivateMemory(f"no mapping holds address {reached:#x}")


def _open_copy(inode: int) -> str | None:
    """A /proc/self/fd path that reopens the unlinked file ``inode``, if this process holds one (vLLM keeps the fd
    of its region open): offsets through it stay file offsets."""
    for fd in os.listdir("/proc/self/fd"):
        path = f"/proc/self/fd/{fd}"
        try:
            if os.stat(path).st_ino == inode and os.readlink(path).endswith(" (deleted)"):
                return path
        except OSError:
            continue  # closed meanwhile, or the listing's own fd
    return None


def open_backing(view: Any) -> SharedRegion:
    """An fd (owned by the caller) and range for the file under ``view``; PrivateMemory if there is none."""
    flat = memoryview(view).cast("B")
    path, offset = find_backing(flat)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    size = os.fstat(fd).st_size
    if size < offset + flat.nbytes:
        os.close(fd)
        raise PrivateMemory(f"{path} holds {size} bytes, fewer than the buffer's end at {offset + flat.nbytes}")
    return SharedRegion(fd, offset, flat.nbytes)
