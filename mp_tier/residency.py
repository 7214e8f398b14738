"""What the tier believes is on disk, and what must not be disturbed while a worker uses it.

Hooks around every transfer, as vLLM's FS evictor has: ``prepare``
decides (and may refuse) without changing anything, ``commit`` records a
job that is sure to go out, and ``*_done`` folds in its outcome. Keys of
loads and stores in flight are pinned: they are never chosen as victims. A
store of a block whose eviction is still in flight is refused (EBUSY)
rather than raced by the unlink.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence

from .capacity import Admission, CapacityIndex
from .errors import Refused
from .jobs import TierEvent
from .messages import Op

log = logging.getLogger(__name__)

# Keys background probes may be out for at once. A lookup answer is a hint: keys past the bound are answered
# from memory and probed by a later lookup, so a lookup of 200,000 unknown keys queues about a dozen tasks
# ahead of the jobs, not thousands.
PROBES_IN_FLIGHT = 256
_NOTHING = Admission([], False)  # what a load takes from the budget


def _pin(counts: dict[bytes, int], keys: list[bytes]) -> None:
    """Count ``keys`` in. Every submit runs this: the usual case (none of them pinned yet) stays in C calls."""
    fresh = dict.fromkeys(keys, 1)
    if len(fresh) == len(keys) and counts.keys().isdisjoint(fresh):
        counts.update(fresh)
    else:
        for key in keys:
            counts[key] = counts.get(key, 0) + 1


def _release(counts: dict[bytes, int], keys: Iterable[bytes]) -> None:
    """Count ``keys`` out, dropping the ones that reach zero so membership stays exact.

    A plain dict rather than a Counter: Counter's ``del`` is a Python method, a third of a completion's cost.
    """
    for key in keys:
        left = counts.pop(key, 0) - 1
        if left > 0:
            counts[key] = left


class Residency:
    """Pins, evictions in flight, probes, the byte budget, blocks seen elsewhere, and the events they produce."""

    def __init__(self, capacity: CapacityIndex, events: bool, namespace: tuple[int, int]):
        self.namespace = namespace  # the namespace directory the counted blocks are in: (device, inode)
        self.capacity = capacity  # the blocks this tier counts against max_bytes, in LRU order
        self.storing: dict[bytes, int] = {}  # keys of stores in flight -> how many
        self.loading: dict[bytes, int] = {}  # keys of loads in flight -> how many
        self.evicting: dict[bytes, int] = {}  # victims not yet unlinked -> by how many tasks
        self.restored: set[bytes] = set()  # keys stored while a load of them was in flight: its ENOENT is stale
        self.elsewhere: set[bytes] = set()  # blocks other instances on the root wrote, learned by probes
        # keys a background probe is out for -> False once this tier deleted the block meanwhile (the answer is stale)
        self.probing: dict[bytes, bool] = {}
        self.events: list[TierEvent] | None = [] if events else None  # None: events are off
        self.blocks_evicted = 0

    # -- a job going out -------------------------------------------------------

    def prepare(self, op: Op, keys: list[bytes]) -> Admission:
        """What a job of ``op`` takes: room for a store's ``keys`` (a load's need none); raises Refused
        (EBUSY, ENOSPC), changing nothing."""
        if op == Op.LOAD:
            return _NOTHING
        if self.evicting and (busy := next((k for k in keys if k in self.evicting), None)):
            # its old file may still be unlinked after a new one is written: refuse rather than lose it
            raise Refused("EBUSY", f"block {busy.hex()} is being evicted; store it again later")
        return self.capacity.admission(keys, (self.loading, self.storing))

    def commit(self, op: Op, keys: list[bytes], admission: Admission) -> None:
        """The job ``prepare`` took is sure to go out: count a store's blocks in, refresh a load's; pin them."""
        if op == Op.LOAD:
            self.capacity.refresh(keys)
            _pin(self.loading, keys)
            return
        self.capacity.admit(keys, admission)
        if admission.victims:
            self._removed(admission.victims)
        _pin(self.storing, keys)

    # -- stores --------------------------------------------------------------

    def store_done(self, keys: list[bytes], failed: Sequence[int], unsure: Sequence[int] = ()) -> None:
        """Unpin; a block a worker failed to store stops counting, unless another store of it is in flight.

        ``unsure`` blocks may be on disk, so they stay counted: their task failed (its workers died), or a
        file was at their name before the store, which left it as it was; over-counting costs room,
        under-counting would let the disk outgrow the budget.
        """
        _release(self.storing, keys)
        bad = set(failed)
        if bad:
            self._forget(keys[i] for i in bad.difference(unsure))
        if self.loading and not self.loading.keys().isdisjoint(keys):
            self.restored.update(k for i, k in enumerate(keys) if k in self.loading and i not in bad)
        if self.events is not None:
            stored = tuple(k for i, k in enumerate(keys) if i not in bad) if bad else tuple(keys)
            if stored:
                self.events.append(TierEvent("stored", stored))

    def evicted(self, victims: list[bytes], kept: list[bytes], error: str | None) -> None:
        """The task that carried these unlinks has run; ``kept`` files could not be deleted (for ``error``).

        Those count again, as just used, so the disk never holds more than is
        counted and the next stores make room among the other blocks; the
        others are reported removed now that their files are gone.
        """
        _release(self.evicting, victims)
        if kept:
            log.warning("%d evicted blocks were not deleted and stay counted: %s", len(kept), error)
            self.capacity.touch(kept)
            self.blocks_evicted -= len(kept)
        if self.events is not None and (gone := tuple(k for k in victims if k not in kept)):
            self.events.append(TierEvent("removed", gone))

    # -- loads ---------------------------------------------------------------

    def missing(self, keys: list[bytes]) -> None:
        """A load found no file for these blocks (another instance deleted them, say): stop counting them,
        so lookups stop answering True, unless a store of them landed or is in flight since. The counted
        ones are reported removed, as the blocks of a namespace removed whole are."""
        gone = [k for k in keys if k not in self.restored]
        self.elsewhere.difference_update(gone)
        counted = [k for k in gone if k in self.capacity and k not in self.storing]
        self.capacity.discard(counted)
        if self.events is not None and counted:
            self.events.append(TierEvent("removed", tuple(counted)))

    def done(self, op: Op, keys: list[bytes], failed: Sequence[int], unsure: Sequence[int]) -> None:
        """A job's outcome, whichever its op: ``store_done`` or ``load_done``."""
        if op == Op.STORE:
            self.store_done(keys, failed, unsure)
        else:
            self.load_done(keys)

    def load_done(self, keys: list[bytes]) -> None:
        _release(self.loading, keys)
        if self.restored:
            self.restored.difference_update([k for k in keys if k not in self.loading])

    def corrupt(self, keys: list[bytes]) -> None:
        """Blocks whose files were found corrupt and deleted."""
        self._forget(keys)
        self._deleted_here(keys)
        if self.events is not None:
            self.events.append(TierEvent("removed", tuple(keys)))

    # -- lookups, probes, touches ----------------------------------------------

    def lookup_many(self, keys: list[bytes]) -> tuple[list[bool | None], list[bytes]]:
        """Answers from memory, and keys answered False that no probe is out for yet, as many as may be probed."""
        storing, index, elsewhere, probing = self.storing, self.capacity, self.elsewhere, self.probing
        answers: list[bool | None] = [None if k in storing else (k in index or k in elsewhere) for k in keys]
        # a block being evicted is known to be going: a probe could still see its file
        unknown = dict.fromkeys(k for k, answer in zip(keys, answers) if answer is False and k not in probing and k not in self.evicting)
        return answers, list(itertools.islice(unknown, max(0, PROBES_IN_FLIGHT - len(probing))))

    def probe_sent(self, keys: list[bytes]) -> None:
        self.probing.update(dict.fromkeys(keys, True))

    def probed(self, keys: list[bytes], missing: Sequence[int]) -> None:
        """A probe's findings: a block found missing is not seen elsewhere, and one this tier deleted while
        the probe was out is not taken from it (no second probe of a key goes out while one is)."""
        gone = set(missing)
        for i, key in enumerate(keys):
            fresh = self.probing.pop(key, False)
            if i in gone:
                self.elsewhere.discard(key)
            elif fresh:
                self.elsewhere.add(key)

    def touch(self, keys: list[bytes]) -> list[bytes]:
        """Refresh the counted ones among ``keys``; return them (their files' mtimes follow)."""
        counted = [k for k in keys if k in self.capacity]
        self.capacity.refresh(counted)
        return counted

    def renewed(self, namespace: tuple[int, int]) -> bool:
        """A worker found the namespace directory removed or replaced and made it again: forget the blocks
        counted or seen elsewhere (their files are gone, or in a directory the tier no longer uses) and the
        probes out, all but the stores in flight, which land in the new one. False if it is known already."""
        if namespace == self.namespace:
            return False
        self.namespace = namespace
        gone = self.capacity.retain(self.storing)
        self.elsewhere.clear()
        self.probing = dict.fromkeys(self.probing, False)
        if self.events is not None and gone:
            self.events.append(TierEvent("removed", tuple(gone)))
        log.warning("the namespace directory was removed or replaced: a worker made it again; %d blocks forgotten", len(gone))
        return True

    # -- the start-up scan ---------------------------------------------------------

    def scanned(self, keys: list[bytes]) -> None:
        self.capacity.adopt(keys)

    def over_budget(self) -> list[bytes]:
        """After the scan: the oldest blocks to delete if the root held more than fits (already uncounted)."""
        victims = self.capacity.over_budget((self.loading, self.storing))
        if victims:
            self._removed(victims)
        return victims

    def take_events(self) -> list[TierEvent]:
        if self.events is None:
            raise ValueError("events are off: construct the tier with TierConfig(events=True)")
        events, self.events = self.events, []
        return events

    def _removed(self, keys: list[bytes]) -> None:
        """Evicted from the index now; their files go (and the events say so) when the task carrying them runs."""
        _pin(self.evicting, keys)
        self.blocks_evicted += len(keys)
        self._deleted_here(keys)

    def _deleted_here(self, keys: Iterable[bytes]) -> None:
        """This tier deletes these blocks' files: no longer seen elsewhere, and a probe out for them is stale."""
        probing = self.probing
        for key in keys:
            self.elsewhere.discard(key)
            if key in probing:
                probing[key] = False

    def _forget(self, keys: Iterable[bytes]) -> None:
        """Stop counting blocks found missing, unless a store of them is in flight: its outcome decides."""
        self.capacity.discard(k for k in keys if k not in self.storing)
