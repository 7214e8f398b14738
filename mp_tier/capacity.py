"""The byte budget: which blocks this tier counts, in least-recently-used order.

The index lives in the coordinator, so admitting a store costs the host a few
dict operations and no file-system call; the evictions it decides on travel
inside the store's own tasks, and a worker unlinks them before writing. Every
block is ``block_bytes`` long, so the bytes in use are a count.

Two orders make one LRU list: ``_cold`` holds blocks found on disk by the
start-up scan, oldest first by mtime, and ``_warm`` holds blocks stored or
used by this run. Everything cold is older than everything warm, and cold
blocks arrive while warm ones are already being stored, which is why they are
two dicts rather than one.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable
from typing import NamedTuple

from .errors import CapacityFull


class Admission(NamedTuple):
    """A store the budget takes: the blocks to delete first, and whether none of its keys was counted yet."""

    victims: list[bytes]
    all_new: bool


class CapacityIndex:
    """Blocks counted against ``max_bytes`` (0 = unbounded), with LRU eviction or none."""

    def __init__(self, block_bytes: int, max_bytes: int, evict: bool):
        if 0 < max_bytes < block_bytes:
            raise ValueError(f"max_bytes {max_bytes} is less than one block of {block_bytes} bytes (0 means unbounded)")
        self.block_bytes = block_bytes
        self.max_bytes = max_bytes
        self.evict = evict  # False: a store that does not fit fails instead of deleting others
        self._capacity = max_bytes // block_bytes if max_bytes else 0  # in blocks; 0 = unbounded
        self._cold: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # found at start, oldest first
        self._warm: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # stored or used by this run

    def __contains__(self, key: bytes) -> bool:
        return key in self._warm or key in self._cold

    def __len__(self) -> int:
        return len(self._warm) + len(self._cold)

    @property
    def used_bytes(self) -> int:
        return len(self) * self.block_bytes

    def admission(self, keys: list[bytes], pinned: tuple[Collection[bytes], ...]) -> Admission:
        """What storing ``keys`` takes: the blocks to delete first, oldest first. Changes nothing.

        Raises CapacityFull when the budget cannot take them: eviction is off,
        or too few blocks are free to evict (``pinned`` ones, being loaded or
        stored, never are).
        """
        warm, cold = self._warm, self._cold
        all_new = warm.keys().isdisjoint(keys) and cold.keys().isdisjoint(keys)  # the usual store: C loops only
        new = len(keys) if all_new else sum(k not in warm and k not in cold for k in keys)
        over = len(warm) + len(cold) + new - self._capacity if self._capacity else 0
        if over <= 0:
            return Admission([], all_new)
        if len(keys) > self._capacity:  # counted all at once, they never fit
            raise CapacityFull(f"a store of {len(keys)} blocks of {self.block_bytes} bytes exceeds max_bytes {self.max_bytes} whatever is evicted")
        if not self.evict:
            raise CapacityFull(self._full(new, "eviction is off"))
        victims = self._oldest(over, pinned, skip=set(keys))
        if len(victims) < over:
            raise CapacityFull(self._full(new, f"only {len(victims)} blocks are free to evict"))
        return Admission(victims, all_new)

    def admit(self, keys: list[bytes], admission: Admission) -> None:
        """Count ``keys`` as stored (most recent) and the admission's victims as gone."""
        if admission.victims:
            self.discard(admission.victims)
        if admission.all_new:
            warm = self._warm
            for key in keys:  # 3x faster than OrderedDict.update
                warm[key] = None
        else:
            self.touch(keys)

    def over_budget(self, pinned: tuple[Collection[bytes], ...]) -> list[bytes]:
        """Blocks to delete now (after the scan found more than fits), removed from the index.

        None at all with eviction off: the tier deletes no block to make room, and stores fail until room is made.
        """
        over = len(self) - self._capacity if self._capacity and self.evict else 0
        victims = self._oldest(over, pinned, skip=()) if over > 0 else []
        self.discard(victims)
        return victims

    def touch(self, keys: Iterable[bytes]) -> None:
        """Make ``keys`` the most recently used; unknown keys are added."""
        warm, cold = self._warm, self._cold
        for key in keys:
            if key in warm:
                warm.move_to_end(key)
            else:
                cold.pop(key, None)
                warm[key] = None

    def refresh(self, keys: list[bytes]) -> None:
        """Make the known ones among ``keys`` the most recently used (a load or touch)."""
        if not (self._warm.keys().isdisjoint(keys) and self._cold.keys().isdisjoint(keys)):
            self.touch(k for k in keys if k in self)

    def discard(self, keys: Iterable[bytes]) -> None:
        warm, cold = self._warm, self._cold
        for key in keys:
            if key in warm:
                del warm[key]
            else:
                cold.pop(key, None)

    def retain(self, keys: Collection[bytes]) -> list[bytes]:
        """Stop counting every block but ``keys``; return the ones dropped."""
        dropped = [k for order in (self._cold, self._warm) for k in order if k not in keys]
        self.discard(dropped)
        return dropped

    def adopt(self, keys: Iterable[bytes]) -> None:
        """Blocks found on disk, oldest first, all older than this run's blocks."""
        cold, warm = self._cold, self._warm
        for key in keys:
            if key not in warm:
                cold[key] = None

    def _oldest(self, count: int, pinned: tuple[Collection[bytes], ...], skip: Collection[bytes]) -> list[bytes]:
        victims: list[bytes] = []
        for order in (self._cold, self._warm):
            for key in order:
                if len(victims) == count:
                    return victims
                if key not in skip and not any(key in keys for keys in pinned):
                    victims.append(key)
        return victims

    def _full(self, new: int, why: str) -> str:
        return (
            f"{new} more blocks of {self.block_bytes} bytes exceed max_bytes {self.max_bytes} "
            f"({self.used_bytes} in use; {why})"
        )
