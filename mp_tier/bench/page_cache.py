"""Making block files cold, and checking that they are: posix_fadvise, mincore(2), drop_caches.

A cold load is only cold if the file's pages are out of the page cache; this
module drops them and then counts the resident pages, rather than assuming.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def _libc_mincore() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    return libc


_libc = _libc_mincore()
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of the file), by mincore(2).

    This is how a cold load is checked to be cold, not assumed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pages = -(-size // mmap.PAGESIZE)
        if not size:
            return 0, 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed", path)
        try:
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", path)
            return int((np.frombuffer(vec.raw, np.uint8) & 1).sum()), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_share(paths: Sequence[str], sample: int = 256) -> float:
    """Share of the pages of (an even sample of) ``paths`` that are in the page cache."""
    step = max(1, len(paths) // sample)
    counts = [resident_pages(p) for p in paths[::step]]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def fadvise_out(paths: Sequence[str]) -> None:
    """Ask the kernel to drop these files' clean pages (no root needed); flush dirty ones first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache(paths: Sequence[str]) -> str:
    """Make the next reads of ``paths`` cold; return how, and whether it worked.

    posix_fadvise per file comes first: it needs no root and touches only these
    files. If pages stay resident, root's drop_caches (the whole machine's
    cache) is the fallback; if that is not possible either, the result says so.
    """
    fadvise_out(paths)
    left = resident_share(paths)
    if left == 0:
        return "fadvise DONTNEED: 0% of pages resident"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"NOT COLD: {left:.0%} of pages still resident after fadvise; drop_caches: {e.strerror}"
    left = resident_share(paths)
    if left == 0:
        return "fadvise + drop_caches: 0% of pages resident"
    return f"NOT COLD: {left:.0%} of pages still resident after fadvise and drop_caches"
