"""Measure what the capacity index costs: restart scan, memory per block, submit and lookup_many.

    python tools/capacity_bench.py --blocks 100000

Fills a temp root with ``--blocks`` small blocks, restarts a tier over it and
times the start-up scan (run by a worker: construction does not wait for it),
then measures the index's memory per block, ``submit_store`` with the budget
full (every store evicts) against an unbounded tier, and ``lookup_many`` for
keys the index knows and for keys another instance wrote after this one
started (answered False at once, then learned by the workers' probes).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
from mp_tier.capacity import CapacityIndex

BLOCK = 4096


def key(i: int, salt: int = 0) -> bytes:
    return (i * 2654435761 + salt).to_bytes(32, "big") + bytes(4)


def fill(root: str, n: int, cache: PrimaryCache) -> float:
    start = time.perf_counter()
    with FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=2, n_write_workers=2) as tier:
        for first in range(0, n, 64):
            count = min(64, n - first)
            tier.submit_store(JobMetadata(job_id=first, keys=[key(i) for i in range(first, first + count)], block_ids=list(range(count))))
            if tier.stats().jobs_active > 64:
                tier.wait(10)
                tier.get_finished()
        tier.drain(600)
    return time.perf_counter() - start


def index_bytes_per_block(n: int) -> float:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    index = CapacityIndex(BLOCK, 0, evict=True)
    index.adopt(key(i, salt=7) for i in range(n))
    used = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(index) == n
    return used / n


def submit_p50_us(tier: FileSystemTierManager, jobs: int, salt: int) -> float:
    """Like a scheduler: busy for a millisecond between submits, polling results as it goes."""
    samples = []
    for j in range(jobs):
        job = JobMetadata(job_id=j, keys=[key(16 * j + i, salt) for i in range(16)], block_ids=list(range(16)))
        busy_until = time.perf_counter() + 0.001
        while time.perf_counter() < busy_until:
            pass
        start = time.perf_counter_ns()
        tier.submit_store(job)
        samples.append(time.perf_counter_ns() - start)
        tier.get_finished()
    tier.drain(60)
    return statistics.median(samples) / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100_000)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="mp_tier_capbench.")
    rows = []
    try:
        with PrimaryCache.create(64, BLOCK) as cache:
            other = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=2, n_write_workers=2)
            other.drain(60)  # its start-up scan found nothing: every block below is another instance's
            rows.append(("fill: store blocks", f"{args.blocks}", f"{fill(root, args.blocks, cache):.2f} s"))
            known = [key(i) for i in range(args.blocks)]
            start = time.perf_counter()
            answers = other.lookup_many(known)
            rows.append(("lookup_many, another instance's blocks (first call)", f"{len(known)}", f"{(time.perf_counter() - start) * 1000:.0f} ms"))
            assert not any(answers)
            other.drain(600)
            rows.append(("  ... until the workers' probes have learned them", f"{len(known)}", f"{(time.perf_counter() - start) * 1000:.0f} ms"))
            assert all(other.lookup_many(known))
            other.shutdown()
            config = TierConfig(max_bytes=args.blocks * BLOCK)
            start = time.perf_counter()
            tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=2, n_write_workers=2, config=config)
            built = time.perf_counter() - start
            tier.drain(600)
            scanned = time.perf_counter() - start
            rows.append(("restart: construction returns", f"{args.blocks} blocks", f"{built * 1000:.0f} ms"))
            rows.append(("restart: scan done, index rebuilt", f"{tier.stats().bytes_counted // BLOCK} blocks", f"{scanned:.2f} s"))
            start = time.perf_counter()
            answers = tier.lookup_many(known)
            rows.append(("lookup_many, keys in the index", f"{len(known)}", f"{(time.perf_counter() - start) * 1000:.0f} ms"))
            assert all(answers)
            tier.shutdown()
            with FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=2, n_write_workers=2, config=config) as full:
                full.drain(600)
                rows.append(("submit_store 16 blocks, budget full (evicts 16)", "p50", f"{submit_p50_us(full, 300, 1):.1f} us"))
            with FileSystemTierManager(primary_kv_view=cache, root_dir=tempfile.mkdtemp(dir=root), n_read_workers=2, n_write_workers=2) as free:
                rows.append(("submit_store 16 blocks, unbounded", "p50", f"{submit_p50_us(free, 300, 2):.1f} us"))
        rows.append(("index memory per block", f"{args.blocks}", f"{index_bytes_per_block(args.blocks):.0f} B"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    for what, n, value in rows:
        print(f"{what:<{width}}  {n:>14}  {value:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
