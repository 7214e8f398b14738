"""The comparison's matrix at one root and block size: staging, every column's runs in each job shape, the raw loops.

Columns run interleaved, their order reversed every other round, because the
disk's speed drifts on a shared VM. Load phases read blocks staged once per
root and size by mp_tier; on disk their pages are dropped first and checked
with mincore (``NOT COLD`` if that failed); on tmpfs the files are memory.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .case import Case, Settings
from .keys import Keys
from .page_cache import drop_page_cache
from .raw import raw_run
from .records import RunRecord
from .tier_runs import settle
from .units import size_label
from .vllm_peer import Column, Tier, VllmApi
from .vllm_phase import Drive, Phase, limit_note, remove_blocks, run_phase
from .vllm_table import fmt
from .vllm_targets import MP, Cell

RAW_BATCH = 16  # blocks between a raw process's progress messages, whatever the job shape: its CPU is the loop's


@dataclass(frozen=True)
class Shape:
    """Jobs of ``blocks_per_job`` blocks, ``inflight`` of them kept in flight."""

    blocks_per_job: int
    inflight: int

    @property
    def label(self) -> str:
        return f"{self.blocks_per_job}x{self.inflight}"


@dataclass
class CellRuns:
    """Everything measured in one cell."""

    cell: Cell
    staged_blocks: int
    tiers: list[dict[str, Any]] = field(default_factory=list)  # {round, column, direct, store: Phase, load: Phase}
    raw: list[dict[str, Any]] = field(default_factory=list)  # {round, store: RunRecord, load: RunRecord}


def schedule(columns: list[Column], rounds: int, with_raw: bool) -> list[tuple[int, Column | None]]:
    """(round, column) pairs, None for the raw loops; every other round in reverse order."""
    order: list[Column | None] = [*columns, *([None] if with_raw else [])]
    return [(r, c) for r in range(rounds) for c in (order if r % 2 == 0 else order[::-1])]


def phase_blocks(args: argparse.Namespace, block: int) -> int:
    """Blocks a phase moves at most: ``--total`` bytes and ``--max-blocks`` blocks (small blocks stay seconds)."""
    return max(1, min(int(args.total) // block, int(args.max_blocks)))


def as_jobs(keys: list[bytes], shape: Shape) -> list[list[bytes]]:
    n = shape.blocks_per_job
    return [keys[i : i + n] for i in range(0, len(keys) - n + 1, n)]


def stage(api: VllmApi, view: Any, root: str, n_blocks: int, slots: list[np.ndarray]) -> tuple[list[bytes], Tier]:
    """Store the load phases' blocks with mp_tier, untimed; returns them and the (shut down) tier, whose layout the raw loops follow."""
    keys = Keys().fresh(n_blocks)
    per_job = len(slots[0])
    jobs = [keys[i : i + per_job] for i in range(0, n_blocks, per_job)]
    tier = api.open(Column(MP, MP), view, root)
    ids = itertools.count(1)
    failed = 0
    try:
        for first in range(0, len(jobs), len(slots)):
            for batch, slot in zip(jobs[first : first + len(slots)], slots):
                tier.submit_store(tier.make_job(next(ids), batch, slot[: len(batch)], False))
            tier.drain()
            failed += sum(not r.success for r in tier.poll())
    finally:
        tier.shutdown()
    if failed:
        raise RuntimeError(f"staging under {root}: {failed} store jobs failed")
    return keys, tier


@dataclass
class Bed:
    """What every run at one root and block size shares: the blocks staged for loads, and how the host drives."""

    kind: str
    root: str
    staged: list[bytes]
    staged_paths: list[str]
    stager: Tier
    drive: Drive
    n_blocks: int
    ids: Iterator[int]

    def cold(self) -> str:
        """Make the staged blocks' next reads cold, and say how; tmpfs has no disk to read from."""
        return "tmpfs: the files are memory" if self.kind == "tmpfs" else drop_page_cache(self.staged_paths)


def measure(
    api: VllmApi, columns: list[Column], view: Any, root: str, kind: str, args: argparse.Namespace, note: Callable[[str], None]
) -> list[CellRuns]:
    """Every shape at one root and block size: staged once, then every column ``--rounds`` times, interleaved.

    The raw loops have no jobs, so they run in the first shape's rounds and serve every shape.
    """
    block = args.block
    n_blocks = phase_blocks(args, block)
    stage_slots = [np.arange(s * 16, (s + 1) * 16, dtype=np.int32) for s in range(8)]
    staged, stager = stage(api, view, root, n_blocks, stage_slots)
    note(f"{kind} {size_label(block)}: staged {len(staged)} blocks for the load phases")
    drive = Drive(args.spin_chunk, args.idle_seconds, args.seconds, block)
    bed = Bed(kind, root, staged, [stager.path_of(k) for k in staged], stager, drive, n_blocks, itertools.count(1_000_000))
    out: list[CellRuns] = []
    try:
        for shape in args.shapes:
            runs = CellRuns(Cell(kind, shape.label, block), len(staged), raw=out[0].raw if out else [])
            for rnd, column in schedule(columns, args.rounds, with_raw=not out):
                os.sync()  # the previous run's dirty pages are not this run's work
                where = f"{kind} {shape.label} {size_label(block)} round {rnd + 1}"
                if column is None:
                    store, load = run_raw(bed)
                    runs.raw.append({"round": rnd, "store": store, "load": load})
                    note(f"{where} raw: store {store.gbps:.3f}, load {load.gbps:.3f} GB/s")
                    continue
                tier = api.open(column, view, root)
                try:
                    store_phase, load_phase = run_tier(tier, shape, bed)
                    direct = tier.direct
                finally:
                    tier.shutdown()
                    del tier
                runs.tiers.append({"round": rnd, "column": column.name, "direct": direct, "store": store_phase, "load": load_phase})
                note(
                    f"{where} {column.name}: store {store_phase.gbps:.3f} GB/s{limit_note(store_phase)}, "
                    f"load {load_phase.gbps:.3f} GB/s{limit_note(load_phase)}, busy/idle {fmt(store_phase.busy_idle)}",
                )
            out.append(runs)
    finally:
        remove_blocks(bed.staged_paths)
    return out


def run_tier(tier: Tier, shape: Shape, bed: Bed) -> tuple[Phase, Phase]:
    """Fresh stores in this shape, then loads of the staged blocks, their pages dropped first."""
    tier.drain()  # its start-up sweep and scan are not this run's work
    list(tier.poll())
    settle(tier.pids)
    bpj = shape.blocks_per_job
    slots = [np.arange(s * bpj, (s + 1) * bpj, dtype=np.int32) for s in range(shape.inflight)]
    fresh = as_jobs(Keys().fresh(bed.n_blocks), shape)
    try:
        store = run_phase(tier, False, fresh, slots, bed.ids, bed.drive)
    finally:
        remove_blocks(tier.path_of(k) for keys in fresh for k in keys)
    dropped = bed.cold()
    load = run_phase(tier, True, as_jobs(bed.staged, shape), slots, bed.ids, bed.drive)
    load.cache_drop = dropped
    return store, load


def run_raw(bed: Bed) -> tuple[RunRecord, RunRecord]:
    """The same blocks with no tier: fresh files written, then the staged ones read, in as many processes as mp_tier has workers."""
    case = Case(
        Settings(bed.drive.block_bytes, RAW_BATCH, bed.stager.workers, 1),
        argparse.Namespace(idle_seconds=bed.drive.idle_seconds, progress=False),
        bed.root,
        None,
        bed.drive.spin_chunk,
        bed.stager.path_of,
        bed.stager.direct,
    )
    fresh = [bed.stager.path_of(k) for k in Keys().fresh(bed.n_blocks)]
    try:
        store = raw_run(case, "store", "fresh", fresh)
    finally:
        remove_blocks(fresh)
    dropped = bed.cold()
    load = raw_run(case, "load", "cold", bed.staged_paths)
    load.cache_drop = dropped
    return store, load
