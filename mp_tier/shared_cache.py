"""The primary KV cache mp_tier creates: fixed-size blocks in one file under /dev/shm.

The host creates the file; its workers (and any process an engine wants)
map it, so no block ever travels through a pipe. Only the creating process,
in the creating pid, ever unlinks it: a process that attaches never
registers the name with a resource tracker (CPython gh-82300 is how an
attacher's exit used to unlink the owner's segment), and a forked child of
the creator closes its inherited copy without unlinking. The creator
has its ``janitor`` unlink the name should it die first, so a creator killed
by SIGKILL leaves no segment behind, even while a forked child of it lives.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
import weakref
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import janitor, stdio
from .janitor import SHM_DIR
from .memory import PrivateMemory, SharedRegion, buffer_address, open_backing

SEGMENT_PREFIX = "mp_tier_"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")

# Caches created or attached in this process, by base address, so that a
# tier handed ``cache.array`` or ``cache.view`` can find the cache.
_by_address: weakref.WeakValueDictionary[int, PrimaryCache] = weakref.WeakValueDictionary()


def _positive(name: str, value: object) -> int:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PrimaryCache:
    """``num_blocks`` blocks of ``block_bytes`` each, in a shared file other processes can map."""

    def __init__(self, name: str, fd: int, num_blocks: int, block_bytes: int, creator_pid: int | None):
        size = num_blocks * block_bytes
        self.name = name
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self._fd = fd = stdio.above(fd)  # kept open: workers map the file through it, even if the name is removed
        self._creator_pid = creator_pid  # the only pid that unlinks; None when attached
        with stdio.held():  # mmap's copy of the fd, too, keeps off 0-2
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED)
        self.view: memoryview = memoryview(self._mmap)
        self.array: np.ndarray = np.ndarray((num_blocks, block_bytes), dtype=np.uint8, buffer=self.view)
        self._closed = False
        self.address = buffer_address(self.view)
        # Run once, by close() or when the mapping goes (this cache dropped, and any array or view of it):
        # a dropped cache leaves no fd and no segment, and one whose array lives on stays until it goes.
        self._finalizer = weakref.finalize(self._mmap, _let_go, name, fd, creator_pid)
        _by_address[self.address] = self

    @classmethod
    def create(cls, num_blocks: int, block_bytes: int) -> PrimaryCache:
        """Create and fully reserve a new segment.

        The pages are reserved with ``posix_fallocate`` so that a full
        ``/dev/shm`` fails here with ENOSPC instead of killing a later reader
        with SIGBUS.
        """
        size = _positive("num_blocks", num_blocks) * _positive("block_bytes", block_bytes)
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"  # the pid tells an operator whose it is
        path = f"{SHM_DIR}/{name}"
        janitor.guard(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except BaseException:
            janitor.release(name)
            raise
        try:
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.unlink(path)
            os.close(fd)
            janitor.release(name)
            raise
        return cls(name, fd, num_blocks, block_bytes, creator_pid=os.getpid())

    @classmethod
    def attach(cls, name: str, num_blocks: int, block_bytes: int) -> PrimaryCache:
        """Map an existing segment; closing it never unlinks, and nothing tracks it."""
        size = _positive("num_blocks", num_blocks) * _positive("block_bytes", block_bytes)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"not a segment name: {name!r}")
        fd = os.open(f"{SHM_DIR}/{name}", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        held = os.fstat(fd).st_size
        if held < size:
            os.close(fd)
            raise ValueError(
                f"shared-memory segment {name!r} holds {held} bytes, fewer than {num_blocks} blocks of {block_bytes} bytes"
            )
        return cls(name, fd, num_blocks, block_bytes, creator_pid=None)

    @property
    def owner(self) -> bool:
        """True in the creating process only (not in its forked children)."""
        return self._creator_pid == os.getpid()

    def region(self) -> SharedRegion:
        """Where a worker maps this cache: the whole file, through this cache's fd (valid until ``close``)."""
        return SharedRegion(self._fd, 0, self.num_blocks * self.block_bytes)

    @classmethod
    def backing(cls, view: object) -> PrimaryCache | None:
        """The cache whose whole buffer ``view`` is, or None.

        A 2-D array must have the cache's (num_blocks, block_bytes) shape; a
        flat view of all of its bytes (``cache.view``) is accepted as is.
        """
        if isinstance(view, PrimaryCache):
            return view
        if isinstance(view, memoryview):
            try:
                view = np.frombuffer(view, dtype=np.uint8)
            except (TypeError, ValueError):
                return None
        if not isinstance(view, np.ndarray):
            return None
        cache = _by_address.get(view.__array_interface__["data"][0])
        if cache is None or view.dtype != np.uint8 or view.shape not in (cache.array.shape, (cache.array.nbytes,)):
            return None
        return cache

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap the segment; the creator also unlinks it.

        The unlink comes first so that a caller still holding ``array``
        (which keeps the mapping alive) cannot leak the segment in /dev/shm.
        While a tier still uses the cache the mapping stays, and that tier
        unmaps it when it ends (by calling ``close`` again, which then only
        retries the unmap).
        """
        self._closed = True
        self._finalizer()  # at most once, even when a signal handler's close() interrupted this one
        _by_address.pop(self.address, None)
        vars(self).pop("array", None)
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            pass  # the caller still holds a view; the mapping goes with it

    def __enter__(self) -> PrimaryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrimaryCache(name={self.name!r}, num_blocks={self.num_blocks}, block_bytes={self.block_bytes})"


def _let_go(name: str, fd: int, creator_pid: int | None) -> None:
    """A cache's end: the creator unlinks the segment, the fd is closed, and last the creator's janitor is told
    (a janitor that cannot be restarted then leaves nothing open)."""
    owner = creator_pid == os.getpid()
    if owner:
        try:
            os.unlink(f"{SHM_DIR}/{name}")
        except FileNotFoundError:
            pass  # someone removed it already
    os.close(fd)
    if owner:
        janitor.release(name)


class Primary(NamedTuple):
    """The memory a tier moves blocks to and from."""

    view: memoryview  # every byte, flat and writable; the tier's own view, to release when it stops
    num_blocks: int
    block_bytes: int
    region: SharedRegion | None  # how a worker process maps it (its fd is the tier's to close); None for threads
    release: Callable[[], None]  # at the tier's end: lets go of ``view`` (and unmaps a cache its owner closed meanwhile)


def primary_memory(view: object, processes: bool) -> Primary:
    """Resolve what a tier was handed as ``primary_kv_view``; ValueError naming what is wrong with it.

    Accepted: a PrimaryCache or its whole ``.array``/``.view``, or any
    writable C-contiguous 2-D buffer of ``num_blocks`` rows of one block each
    (vLLM's int8 view, say). Worker processes map the same bytes through the
    file behind them, so with ``processes`` the buffer must lie in a shared
    file mapping; the thread engine takes any memory.
    """
    cache = PrimaryCache.backing(view)
    if cache is not None:
        if cache.closed:
            raise ValueError(f"primary_kv_view is a closed PrimaryCache: {cache!r}")
        region = SharedRegion(os.dup(cache._fd), 0, cache.num_blocks * cache.block_bytes) if processes else None
        own = memoryview(cache.view)

        def release() -> None:
            own.release()
            if cache.closed:
                cache.close()

        return Primary(own, cache.num_blocks, cache.block_bytes, region, release)
    try:
        flat = memoryview(view)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"primary_kv_view must be a PrimaryCache, its .array/.view, or a 2-D writable buffer; got {type(view).__name__}"
        ) from None
    if flat.ndim != 2 or not flat.c_contiguous or flat.readonly or flat.nbytes == 0:
        raise ValueError(
            f"primary_kv_view must be a writable C-contiguous 2-D buffer (blocks x bytes per block); got "
            f"{'read-only ' if flat.readonly else ''}{flat.ndim}-D {flat.format!r} of shape {flat.shape}"
        )
    num_blocks, row_items = flat.shape or (0, 0)
    block_bytes = row_items * flat.itemsize
    flat = flat.cast("B")
    region = None
    if processes:
        try:
            region = open_backing(flat)
        except PrivateMemory as e:
            raise ValueError(
                f"primary_kv_view is not in shared memory ({e}): allocate it in a file-backed shared mapping "
                f"(PrimaryCache, or a MAP_SHARED file under /dev/shm), or set engine = \"threads\""
            ) from None
    return Primary(flat, num_blocks, block_bytes, region, flat.release)
