"""The primary KV cache: fixed-size blocks in one POSIX shared-memory segment.

The host creates the segment; workers attach to it by name and move bytes
between it and block files, so no block ever travels through a pipe.

Segments come from ``multiprocess.shared_memory`` because the workers are
started by ``multiprocess``: mixing it with the stdlib module starts a second
resource tracker that unlinks the segment when a worker exits.
"""

from __future__ import annotations

import os
import uuid
import weakref

import numpy as np
from multiprocess import resource_tracker, shared_memory

SEGMENT_PREFIX = "mp_tier_"

# Segments created or attached in this process, by base address, so that a
# tier handed ``cache.array`` or ``cache.view`` can find the segment's name.
_by_address: "weakref.WeakValueDictionary[int, PrimaryCache]" = weakref.WeakValueDictionary()


def _positive(name: str, value: object) -> int:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PrimaryCache:
    """``num_blocks`` blocks of ``block_bytes`` each, backed by shared memory.

    Only the creator unlinks the segment; attachers merely unmap it.
    """

    def __init__(self, shm: shared_memory.SharedMemory, num_blocks: int, block_bytes: int, owner: bool):
        self._shm = shm
        self.name: str = shm.name
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.owner = owner
        self.view: memoryview = shm.buf[: num_blocks * block_bytes]
        self.array: np.ndarray = np.ndarray((num_blocks, block_bytes), dtype=np.uint8, buffer=self.view)
        self._closed = False
        _by_address[self.address] = self

    @classmethod
    def create(cls, num_blocks: int, block_bytes: int) -> "PrimaryCache":
        """Create and fully reserve a new segment.

        The pages are reserved with ``posix_fallocate`` so that a full
        ``/dev/shm`` fails here with ENOSPC instead of killing a later reader
        with SIGBUS.
        """
        size = _positive("num_blocks", num_blocks) * _positive("block_bytes", block_bytes)
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"  # the pid tells an operator whose it is
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        try:
            fd = os.open(f"/dev/shm/{shm.name}", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError:
            shm.close()
            shm.unlink()
            raise
        return cls(shm, num_blocks, block_bytes, owner=True)

    @classmethod
    def attach(cls, name: str, num_blocks: int, block_bytes: int) -> "PrimaryCache":
        """Map an existing segment; closing it never unlinks."""
        size = _positive("num_blocks", num_blocks) * _positive("block_bytes", block_bytes)
        shm = shared_memory.SharedMemory(name=name)
        if shm.size < size:
            shm.close()
            raise ValueError(
                f"shared-memory segment {name!r} holds {shm.size} bytes, "
                f"fewer than {num_blocks} blocks of {block_bytes} bytes"
            )
        return cls(shm, num_blocks, block_bytes, owner=False)

    @property
    def address(self) -> int:
        return self.array.__array_interface__["data"][0]

    @classmethod
    def backing(cls, view: object) -> "PrimaryCache | None":
        """The cache whose whole buffer ``view`` is, or None.

        A 2-D array must have the cache's (num_blocks, block_bytes) shape; a
        flat view of all of its bytes (``cache.view``) is accepted as is.
        """
        if isinstance(view, PrimaryCache):
            return view
        if isinstance(view, memoryview):
            view = np.frombuffer(view, dtype=np.uint8)
        if not isinstance(view, np.ndarray):
            return None
        cache = _by_address.get(view.__array_interface__["data"][0])
        if cache is None or view.dtype != np.uint8 or view.shape not in (cache.array.shape, (cache.array.nbytes,)):
            return None
        return cache

    def close(self) -> None:
        """Unmap the segment; the owner also unlinks it.

        The unlink comes first so that a caller still holding ``array``
        (which keeps the mapping alive, see ``SharedMemory.close``) cannot
        leak the segment in /dev/shm.
        """
        if self._closed:
            return
        self._closed = True
        _by_address.pop(self.address, None)
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:  # someone removed it already; stop tracking it
                resource_tracker.unregister(self._shm._name, "shared_memory")
        del self.array
        try:
            self.view.release()
            self._shm.close()
        except BufferError:
            pass  # the caller still holds a view; the mapping goes with it

    def __enter__(self) -> "PrimaryCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrimaryCache(name={self.name!r}, num_blocks={self.num_blocks}, block_bytes={self.block_bytes})"
