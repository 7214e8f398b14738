"""The host's own cost of one job, with nothing else in the way: its ``submit_store`` and its completions.

    python tools/submit_cost.py                        # this checkout's mp_tier
    python tools/submit_cost.py --against ../old       # and another checkout's, same run, with the ratios

The workers are SIGSTOPped while a batch of jobs is submitted, so no wake-up,
no completion and no worker on the other CPU takes part: what is timed is
validation, admission, planning, encoding and the pipe write. Three figures
per repeat, each the lowest over ``--repeats`` (the cost the code has when
the machine lets it):

- **hot**: the median of ``--jobs`` back-to-back submits of
  ``--blocks``-block jobs.
- **cold**: the same, with ``--gap-us`` of pure-Python busy loop before each
  submit, as a scheduler runs between its calls. A call that follows other
  work finds its caches and branch history cold; on this VM that costs 2-4x
  (a fixed 7 µs Python function took 23 µs after 1 ms of busy loop). This is
  the figure a run's submit p50 starts from, before the host is preempted.
- **completions**: the workers then run the batch while the host reads
  nothing; once their CPU time stops growing every completion is in the
  result pipe, and one ``get_finished()`` takes them all. That call's time
  per job is the completion side's cost: reading, decoding, the ledger, the
  result.

``--against`` runs the same measurement in a child interpreter that imports
mp_tier from that directory (an older checkout, say), interleaved with this
one's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

FIGURES = ("hot", "cold", "completions")


def _cpu_ticks(pids: list[int]) -> int:
    """utime + stime of ``pids``, as ``mp_tier.bench.tier_runs.worker_cpu_seconds`` reads them.

    Not that function itself: this runs in a child that imports another checkout's mp_tier, which may
    predate ``mp_tier.bench``.
    """
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def _quiet(pids: list[int], seconds: float = 0.2) -> None:
    """Return once the workers used no CPU for ``seconds``: they have written every completion."""
    last = _cpu_ticks(pids)
    while True:
        time.sleep(seconds)
        now = _cpu_ticks(pids)
        if now == last:
            return
        last = now


def _busy(ns: int) -> None:
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def measure(blocks: int, jobs: int, gap_us: float) -> dict[str, float]:
    """One repeat's figures (µs) for the mp_tier this interpreter imports."""
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache

    cache = PrimaryCache.create(blocks, 4096)
    made = 0

    def batch() -> list[JobMetadata]:
        nonlocal made
        jobs_made = []
        for _ in range(jobs):
            keys = [(made + i).to_bytes(32, "big") + bytes(4) for i in range(blocks)]
            jobs_made.append(JobMetadata(job_id=made, keys=keys, block_ids=list(range(blocks))))
            made += blocks
        return jobs_made

    figures: dict[str, float] = {}
    # Blocks go to tmpfs where there is one: the disk is not what is measured, and this VM's ext4 (no journal)
    # spends up to 0.6 ms of CPU creating a file right after many were deleted.
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as root:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=2, n_write_workers=2)
        try:
            tier.drain(60)
            pids = tier.worker_pids()
            for figure, gap_ns in (("hot", 0), ("cold", int(gap_us * 1000))):
                todo = batch()
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    times = []
                    for job in todo:
                        _busy(gap_ns)
                        start = time.perf_counter_ns()
                        tier.submit_store(job)
                        times.append(time.perf_counter_ns() - start)
                finally:
                    for pid in pids:
                        os.kill(pid, signal.SIGCONT)
                figures[figure] = statistics.median(times) / 1000
                _quiet(pids)
                start = time.perf_counter_ns()
                results = tier.get_finished()
                completing = time.perf_counter_ns() - start
                if len(results) != jobs:
                    raise RuntimeError(f"{len(results)} of {jobs} results were in after the workers went quiet")
                figures["completions"] = min(figures.get("completions", float("inf")), completing / jobs / 1000)
        finally:
            tier.shutdown()
            cache.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=16, help="blocks per job")
    parser.add_argument("--jobs", type=int, default=200, help="submits timed per repeat")
    parser.add_argument("--gap-us", type=float, default=1000, help="busy loop before each cold submit, µs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", metavar="DIR", help="also measure the mp_tier under DIR (a checkout), interleaved")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's single repeat, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.blocks, args.jobs, args.gap_us)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here} | ({"against": os.path.abspath(args.against)} if args.against else {})
    seen: dict[str, dict[str, list[float]]] = {name: {figure: [] for figure in FIGURES} for name in trees}
    one = [sys.executable, os.path.abspath(__file__), "--one", "--blocks", str(args.blocks), "--jobs", str(args.jobs), "--gap-us", str(args.gap_us)]
    for _ in range(args.repeats):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            done = subprocess.run(one, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
            for figure, value in json.loads(done.stdout.splitlines()[-1]).items():
                seen[name][figure].append(value)
    print(f"{args.blocks}-block jobs, µs; lowest of {args.repeats} repeats (all repeats in brackets)")
    for name, tree in trees.items():
        print(f"{name} ({tree}):")
        for figure in FIGURES:
            values = seen[name][figure]
            print(f"  {figure:12s} {min(values):6.1f}  [{' '.join(f'{v:.1f}' for v in values)}]")
    if args.against:
        ratios = ", ".join(f"{figure} {min(seen['this'][figure]) / min(seen['against'][figure]):.2f}x" for figure in FIGURES)
        print(f"this / against: {ratios}")


if __name__ == "__main__":
    main()
