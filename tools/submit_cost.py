"""The host's own cost of one ``submit_store``, hot, with nothing else in the way.

    python tools/submit_cost.py                        # this checkout's mp_tier
    python tools/submit_cost.py --against ../old       # and another checkout's, same run, with the ratio

The workers are SIGSTOPped while a batch of jobs is submitted, so no wake-up,
no completion and no worker on the other CPU takes part: what is timed is
validation, admission, planning, encoding and the pipe write. Each repeat
times ``--jobs`` submits of ``--blocks``-block jobs; the figure is the lowest
of the repeats' medians, the cost the code has when the machine lets it.
Between repeats the workers run and the tier drains. ``--against`` runs the
same measurement in a child interpreter that imports mp_tier from that
directory (an older checkout, say), interleaved with this one's.
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


def measure(blocks: int, jobs: int) -> float:
    """The median submit (µs) of one repeat, for the mp_tier this interpreter imports."""
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache

    cache = PrimaryCache.create(blocks, 4096)
    with tempfile.TemporaryDirectory() as root:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=2, n_write_workers=2)
        try:
            tier.drain(60)
            pids = tier.worker_pids()
            made = 0
            batch = []
            for _ in range(jobs):
                keys = [(made + i).to_bytes(32, "big") + bytes(4) for i in range(blocks)]
                batch.append(JobMetadata(job_id=made, keys=keys, block_ids=list(range(blocks))))
                made += blocks
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                times = []
                for job in batch:
                    start = time.perf_counter_ns()
                    tier.submit_store(job)
                    times.append(time.perf_counter_ns() - start)
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            tier.drain(120)
            tier.get_finished()
        finally:
            tier.shutdown()
            cache.close()
    return statistics.median(times) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=16, help="blocks per job")
    parser.add_argument("--jobs", type=int, default=200, help="submits timed per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", metavar="DIR", help="also measure the mp_tier under DIR (a checkout), interleaved")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child's single repeat, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.blocks, args.jobs)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here} | ({"against": os.path.abspath(args.against)} if args.against else {})
    medians: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            one = [sys.executable, os.path.abspath(__file__), "--one", "--blocks", str(args.blocks), "--jobs", str(args.jobs)]
            done = subprocess.run(one, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
            medians[name].append(json.loads(done.stdout.splitlines()[-1]))
    for name, tree in trees.items():
        spread = " ".join(f"{m:.1f}" for m in medians[name])
        print(f"{name:8s} {tree}: submit_store of {args.blocks} blocks, hot: {min(medians[name]):.1f} µs (repeat medians: {spread})")
    if args.against:
        print(f"this / against: {min(medians['this']) / min(medians['against']):.2f}x")


if __name__ == "__main__":
    main()
