"""The scheduler stand-in: it submits jobs, polls the tier and does its own pure-Python work between polls.

mp_tier moves KV blocks in worker processes so that the scheduler's process
keeps its GIL. What a scheduler feels is measured here by running the same
loop a scheduler runs, with a busy loop of known speed in place of its work.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from mp_tier import FileSystemTierManager, JobMetadata, JobResult

from .progress import Bar
from .records import Dist, OpStats


def spin(n: int) -> int:
    """Pure-Python work that holds the GIL for every bytecode: the scheduler's own work."""
    x = 0
    for i in range(n):
        x ^= i
    return x


def calibrate_spin(slice_us: int) -> int:
    """Iterations of ``spin`` that take about ``slice_us`` on an idle host (best of 5)."""
    if slice_us <= 0:
        return 0
    n = 20_000
    best = min(_timed(spin, n) for _ in range(5))
    return max(1, round(n * slice_us * 1e-6 / best))


def _timed(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


class Spinner:
    """Runs equal slices of ``spin`` between polls and keeps their speed, idle and busy apart.

    The ratio busy/idle is the share of its speed a scheduler keeps while the
    tier works: the GIL (thread engine) or the CPU cores (any engine) it loses.
    """

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.totals = {"idle": [0, 0.0], "busy": [0, 0.0]}  # iterations, seconds
        self.busy_cpu = 0.0  # this thread's CPU seconds in busy slices, to take out of the host's CPU
        self.mode = "busy"

    def slice(self) -> None:
        c0, t0 = time.thread_time(), time.perf_counter()
        spin(self.chunk)
        t1, c1 = time.perf_counter(), time.thread_time()
        totals = self.totals[self.mode]
        totals[0] += self.chunk
        totals[1] += t1 - t0
        if self.mode == "busy":
            self.busy_cpu += c1 - c0

    def measure_idle(self, poll: Callable[[], Any], seconds: float) -> None:
        """The same poll-and-spin loop with no work submitted."""
        if not self.chunk:
            return
        self.mode = "idle"
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            poll()
            self.slice()
        self.mode = "busy"

    def rate(self, mode: str) -> float | None:
        iterations, seconds = self.totals[mode]
        return iterations / seconds if seconds else None

    def busy_idle(self) -> float | None:
        busy, idle = self.rate("busy"), self.rate("idle")
        return busy / idle if busy and idle else None


class Host:
    """Submits jobs to the tier, polls it and spins between polls; records every cost it sees."""

    def __init__(self, tier: FileSystemTierManager, spinner: Spinner, bar: Bar):
        self.tier = tier
        self.spinner = spinner
        self.bar = bar
        self._ids = itertools.count(1)
        self.pending: dict[int, tuple[str, int, int]] = {}  # job id -> kind, blocks, submit time (ns)
        self.submit_ns: dict[str, list[int]] = {"store": [], "load": []}
        self.latency_ns: dict[str, list[int]] = {"store": [], "load": []}
        self.blocks: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.errors: list[str] = []
        self.poll_ns: list[int] = []

    def submit(self, kind: str, keys: list[bytes], block_ids: list[int]) -> int:
        """Submit one job; only the submit_* call itself is timed."""
        job = JobMetadata(job_id=next(self._ids), keys=keys, block_ids=block_ids, is_promotion=kind == "load")
        call = self.tier.submit_load if kind == "load" else self.tier.submit_store
        t0 = time.perf_counter_ns()
        call(job)
        self.submit_ns[kind].append(time.perf_counter_ns() - t0)
        self.pending[job.job_id] = (kind, len(keys), t0)
        return job.job_id

    def step(self) -> list[JobResult]:
        """One scheduler iteration: poll the tier, then do a slice of the host's own work."""
        t0 = time.perf_counter_ns()
        results = self.tier.get_finished()
        now = time.perf_counter_ns()
        self.poll_ns.append(now - t0)
        for result in results:
            self._account(result, now)
        if self.spinner.chunk:
            self.spinner.slice()
        elif self.pending and not results:
            self.tier.wait(0.05)
        return results

    def _account(self, result: JobResult, now: int) -> None:
        kind, blocks, submitted = self.pending.pop(result.job_id)
        self.latency_ns[kind].append(now - submitted)
        self.blocks[kind] += blocks
        self.bytes[kind] += result.transfer_size
        self.bar.update(result.transfer_size)
        if not result.success:
            self.failed[kind] += 1
            if result.error and len(self.errors) < 5 and result.error not in self.errors:
                self.errors.append(result.error)

    def op_stats(self, kind: str) -> OpStats | None:
        if not self.submit_ns[kind]:
            return None
        return OpStats(
            jobs=len(self.latency_ns[kind]),
            blocks=self.blocks[kind],
            bytes=self.bytes[kind],
            failed_jobs=self.failed[kind],
            job_ms=Dist.of(self.latency_ns[kind], 1e-6),
            submit_us=Dist.of(self.submit_ns[kind], 1e-3),
        )


class Window:
    """The jobs in flight, each moving blocks of its own slot of the primary cache.

    A slot is ``slot_blocks`` consecutive cache blocks, so two loads in flight
    never write the same block. Slots are handed out per lane ("store",
    "load", "request") up to that lane's limit; a slot frees when its last job ends.
    """

    def __init__(self, host: Host, slot_blocks: int, lanes: dict[str, int]):
        self.host = host
        self.slot_blocks = slot_blocks
        self._room = dict(lanes)
        self._free = list(range(sum(lanes.values())))
        self._lane_of_slot: dict[int, str] = {}
        self._jobs_in_slot: Counter[int] = Counter()
        self._slot_of_job: dict[int, int] = {}

    def has_room(self, lane: str) -> bool:
        return self._room[lane] > 0

    def open(self, lane: str) -> int:
        self._room[lane] -= 1
        slot = self._free.pop()
        self._lane_of_slot[slot] = lane
        return slot

    def release(self, slot: int) -> None:
        self._room[self._lane_of_slot.pop(slot)] += 1
        self._free.append(slot)

    def submit(self, slot: int, kind: str, keys: list[bytes], positions: Sequence[int] | None = None) -> int:
        base = slot * self.slot_blocks
        ids = [base + p for p in (positions if positions is not None else range(len(keys)))]
        job_id = self.host.submit(kind, keys, ids)
        self._slot_of_job[job_id] = slot
        self._jobs_in_slot[slot] += 1
        return job_id

    def step(self) -> list[JobResult]:
        results = self.host.step()
        for result in results:
            slot = self._slot_of_job.pop(result.job_id)
            self._jobs_in_slot[slot] -= 1
            if not self._jobs_in_slot[slot]:
                del self._jobs_in_slot[slot]
                self.release(slot)
        return results

    def drain(self, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while self._slot_of_job:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self._slot_of_job)} jobs still in flight after {timeout:.0f} s")
            self.step()
