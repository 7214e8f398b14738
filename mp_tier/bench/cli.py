"""The load generator's command line: ``mp-tier bench`` and ``python -m mp_tier bench``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator, Sequence

from ..config import TierConfig
from .case import Case, Settings
from .driver import calibrate_spin
from .errors import UsageError, stop_on_sigterm, stopped_status
from .plot import load_pyplot, plot
from .records import COMPARES, Ratio, RunRecord, compute_ratios
from .report import print_case, write_json
from .root_dir import cleanup, fs_label, prepare_root
from .tier_runs import learn_layout
from .units import (
    SWEEP_KEYS,
    parse_block_size,
    parse_io_depth,
    parse_list,
    parse_non_negative,
    parse_positive,
    parse_seconds,
    parse_size,
    parse_sweep,
    parse_whole,
    parse_workers,
)
from .workloads import WORKLOAD_RUNNERS, WORKLOADS


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options; ``prog`` names the command in usage lines (default: the script's name)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Drive an mp_tier tier like a scheduler and measure throughput, latency and host interference.",
        epilog="Sizes are binary: 256k, 2m, 1g. GB/s figures use GB = 1e9 bytes. "
        "The docstring of mp_tier.bench.report documents the --json schema.",
    )
    p.add_argument(
        "--workload", type=parse_list(WORKLOADS), default=list(WORKLOADS), help="comma list of store, load, mixed, trace, or all (default: all)"
    )
    p.add_argument("--block-size", type=parse_block_size, default=2 << 20, help="bytes per block (default 2m)")
    p.add_argument("--blocks-per-job", type=parse_positive, default=16, help="blocks per job, except in trace (default 16)")
    default = TierConfig()
    p.add_argument(
        "--workers",
        type=parse_workers,
        default=(default.n_read_workers, default.n_write_workers),
        help=f"N (N read + N write workers) or R+W (default: the tier's, {default.n_read_workers}+{default.n_write_workers} here)",
    )
    p.add_argument(
        "--io-depth", type=parse_io_depth, default=default.io_depth, help="tasks each worker process serves at once (default: the tier's)"
    )
    p.add_argument("--inflight", type=parse_positive, default=4, help="jobs (trace: requests) kept in flight (default 4)")
    p.add_argument("--total", type=parse_size, default=1 << 30, help="bytes each phase moves (default 1g)")
    p.add_argument("--seconds", type=parse_seconds, default=None, help="also stop submitting after this many seconds per phase")
    p.add_argument(
        "--compare",
        type=parse_list(COMPARES),
        default=[],
        help="also run: threads (same workload on the thread engine), raw (pwrite/preadv, no tier), checksum (processes with CRC32 checksums)",
    )
    p.add_argument(
        "--o-direct", choices=("auto", "on", "off"), default="auto", help="the tier's o_direct setting; raw follows the tier (default auto)"
    )
    p.add_argument(
        "--spin-us", type=parse_whole, default=1000, help="host busy-loop slice between polls, microseconds; 0 = block in wait() (default 1000)"
    )
    p.add_argument("--repeat", type=parse_positive, default=1, help="run every engine this many times, interleaved (default 1)")
    p.add_argument(
        "--idle-seconds",
        type=parse_non_negative,
        default=0.3,
        help="busy-loop idle speed is measured this long before and after each run (default 0.3)",
    )
    p.add_argument("--load-gap-ms", type=parse_non_negative, default=10.0, help="mixed: pause between one load's end and the next (default 10)")
    p.add_argument("--conversations", type=parse_positive, default=32, help="trace: conversations (default 32)")
    p.add_argument("--zipf", type=parse_non_negative, default=1.1, help="trace: Zipf exponent of conversation popularity (default 1.1)")
    p.add_argument("--turn-blocks", type=parse_positive, default=4, help="trace: blocks a turn adds to its conversation (default 4)")
    p.add_argument("--max-turns", type=parse_positive, default=8, help="trace: turns before a conversation starts over (default 8)")
    p.add_argument("--seed", type=int, default=0, help="trace: request sequence seed (default 0)")
    p.add_argument("--sweep", type=parse_sweep, default=None, help=f"KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    p.add_argument("--plot", metavar="PNG", help="with --sweep: draw GB/s and busy/idle against the swept value (needs the plot extra)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON (schema in the docstring of mp_tier.bench.report)")
    p.add_argument("--root", help="directory to work in: new, empty, or holding only earlier loadgen runs (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the block files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars on stderr")
    return p


def cases_of(args: argparse.Namespace, run_dir: str, spin_chunk: int) -> Iterator[Case]:
    """One case per swept value (one case without --sweep), each in its own directory."""
    base = Settings(args.block_size, args.blocks_per_job, args.workers, args.inflight)
    points: list[tuple[str | None, Settings]] = [(None, base)]
    if args.sweep:
        key, values = args.sweep
        points = [(label, dataclasses.replace(base, **{key: value})) for label, value in values]
    for i, (label, settings) in enumerate(points):
        root = os.path.join(run_dir, f"case{i}")
        os.makedirs(root)
        case = Case(settings, args, root, label, spin_chunk)
        learn_layout(case)
        yield case


def run(args: argparse.Namespace, run_dir: str) -> tuple[list[RunRecord], list[Ratio]]:
    """Every case's workloads, printed as each case ends; a case's files go unless --keep."""
    spin_chunk = calibrate_spin(args.spin_us)
    print(
        f"mp_tier loadgen: {', '.join(args.workload)} under {os.path.dirname(run_dir)} ({fs_label(run_dir)}), "
        f"{os.cpu_count()} CPUs, compare: {', '.join(args.compare) or 'none'}"
    )
    runs: list[RunRecord] = []
    ratios: list[Ratio] = []
    for case in cases_of(args, run_dir, spin_chunk):
        records = [r for w in args.workload for r in WORKLOAD_RUNNERS[w](case)]
        case_ratios = compute_ratios(records)
        print_case(case, records, case_ratios)
        runs += records
        ratios += case_ratios
        if not args.keep:
            shutil.rmtree(case.root, ignore_errors=True)
    if "raw" in args.compare and any(w in args.workload for w in ("mixed", "trace")):
        print("\nnote: raw runs cover store and load only; mixed and trace have no tier-less equivalent")
    return runs, ratios


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Exit status 2 on a usage error (as argparse), 130 when interrupted, 143 when terminated."""
    args = build_parser(prog).parse_args(argv)
    stop_on_sigterm()
    try:
        if args.plot:
            if not args.sweep:
                raise UsageError("--plot needs --sweep (it draws figures against the swept value)")
            load_pyplot()  # fail now, not after the benchmark
        run_dir, created = prepare_root(args.root)
    except UsageError as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    try:
        runs, ratios = run(args, run_dir)
        if args.json:
            write_json(args.json, args, run_dir, runs, ratios)
        if args.plot:
            plot(args.plot, args.sweep[0], [label for label, _ in args.sweep[1]], runs)
    except KeyboardInterrupt as stop:
        print("loadgen: interrupted", file=sys.stderr)
        return stopped_status(stop)
    finally:
        cleanup(run_dir, created, args.keep)
    return 0
