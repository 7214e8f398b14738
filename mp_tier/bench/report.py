"""What a run shows: the result table, the ratio lines, the JSON document and its schema.

JSON schema "mp_tier.loadgen/1" (``--json FILE``), an object with:
    schema    "mp_tier.loadgen/1"; a change that removes or renames a key bumps it.
    args      every option as parsed (sizes in bytes, workers as [read, write]).
    platform  python, cpus, kernel, and fs: the file system type under the root.
    runs      one RunRecord per run (fields below).
    ratios    one Ratio per (case, workload, phase) and compared engine:
              processes divided by threads or by raw.
A RunRecord holds: workload, phase, engine ("processes" | "threads" | "raw" |
"checksum": the process engine with ``checksum = true``),
sweep (the swept value as given, or null), round (with --repeat: which
repetition, from 0), block_bytes, blocks_per_job,
read_workers, write_workers, inflight, direct (O_DIRECT in use), wall_s,
bytes, blocks, gbps, blocks_per_s, job_ms, submit_us, poll_us (get_finished()
per call), host_cpu_s_per_gb (host CPU less the busy loop's; with the thread
engine it includes the workers), worker_cpu_s_per_gb (null when the workers
are threads of the host), busy_idle, idle_loop_rate (busy-loop iterations per
second with the tier idle), store and load (OpStats or null), idle_load_ms
(mixed flood: the same loads' latency with no flood), trace (TraceStats or
null), cache_drop (cold loads: how the page cache was dropped), errors.
Every latency is a Dist: n, p50, p99, max, mean. Raw runs have no job,
submit or poll latencies (null). An OpStats holds jobs, blocks, bytes,
failed_jobs, job_ms, submit_us.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from .case import Case
from .records import Dist, Ratio, RunRecord, ratio
from .root_dir import fs_type
from .units import size_label

SCHEMA = "mp_tier.loadgen/1"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _dist(d: Dist | None, digits: int = 0) -> str:
    return "-" if d is None else f"{d.p50:.{digits}f}/{d.p99:.{digits}f}/{d.max:.{digits}f}"


def _p50(d: Dist | None) -> float | None:
    return d.p50 if d else None


def _p99(d: Dist | None) -> float | None:
    return d.p99 if d else None


TABLE_COLUMNS = (
    ("workload", 8), ("phase", 10), ("engine", 9), ("rnd", 3), ("GB/s", 6), ("blk/s", 7), ("job ms p50/p99/max", 19),
    ("submit us p50/p99/max", 21), ("poll us", 7), ("host s/GB", 9), ("wrk s/GB", 8), ("busy/idle", 9),
)


def _line(cells: Sequence[str], show_round: bool) -> str:
    """Text columns left-aligned, numbers right-aligned; the round column only with --repeat."""
    return "  ".join(
        f"{c:<{w}}" if i < 3 else f"{c:>{w}}"
        for i, (c, (name, w)) in enumerate(zip(cells, TABLE_COLUMNS))
        if show_round or name != "rnd"
    )


def table_row(r: RunRecord, show_round: bool) -> str:
    worker = "in host" if r.engine == "threads" else _num(r.worker_cpu_s_per_gb, 3)
    cells = (
        r.workload, r.phase, r.engine, str(r.round), _num(r.gbps, 3), f"{r.blocks_per_s:.0f}", _dist(r.job_ms, 1),
        _dist(r.submit_us, 1), _num(r.poll_us.mean if r.poll_us else None, 1), _num(r.host_cpu_s_per_gb, 3),
        worker, _num(r.busy_idle, 2),
    )
    return _line(cells, show_round)


def case_header(case: Case) -> str:
    s = case.settings
    io = "O_DIRECT" if case.direct else "buffered"
    sweep = f"[{case.args.sweep[0]}={case.sweep}] " if case.sweep is not None else ""
    return (
        f"{sweep}{size_label(s.block_size)} blocks, {s.blocks_per_job} blocks/job, {s.workers[0]}+{s.workers[1]} workers, "
        f"{s.inflight} jobs in flight, {io} I/O, up to {size_label(case.args.total)} per phase"
    )


def print_case(case: Case, records: list[RunRecord], ratios: list[Ratio]) -> None:
    show_round = case.args.repeat > 1
    print(f"\n== {case_header(case)}")
    print(_line([name for name, _ in TABLE_COLUMNS], show_round))
    for r in records:
        print(table_row(r, show_round))
    for r in records:
        if r.cache_drop:
            print(f"  {r.workload} {r.phase} {r.engine}: page cache {r.cache_drop}")
        for error in r.errors:
            print(f"  {r.workload} {r.phase} {r.engine}: ERROR {error}")
    print_mixed(records)
    print_trace(records)
    print_ratios(ratios)


def median_range(values: list[float | None], digits: int = 2) -> str:
    """'0.93x' for one value; 'median 0.93x (0.81-1.02)' over rounds."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.{digits}f}x"
    return f"median {float(np.median(known)):.{digits}f}x ({min(known):.{digits}f}-{max(known):.{digits}f})"


def print_ratios(ratios: list[Ratio]) -> None:
    """One line per workload phase and compared engine; with --repeat, the median over rounds."""
    groups: dict[tuple[str, str, str], list[Ratio]] = {}
    for q in ratios:
        groups.setdefault((q.versus, q.workload, q.phase), []).append(q)
    for (versus, workload, phase), qs in groups.items():
        if all(q.gbps is None for q in qs):
            continue  # nothing moved on one side (a mixed run with no loads)
        line = f"  processes/{versus:<7} {workload} {phase:<10} GB/s {median_range([q.gbps for q in qs])}"
        line += f"  busy/idle {median_range([q.busy_idle for q in qs])}"
        if versus != "raw":
            line += f"  job p99 {median_range([q.job_p99 for q in qs])}  host CPU/GB {median_range([q.host_cpu_per_gb for q in qs])}"
        print(line)


def print_mixed(records: list[RunRecord]) -> None:
    for r in records:
        if r.workload != "mixed" or r.phase != "flood":
            continue
        flood, alone = r.load.job_ms if r.load else None, r.idle_load_ms
        print(
            f"  mixed {r.engine}: {flood.n if flood else 0} loads, p50/p99 {_num(_p50(flood), 1)}/{_num(_p99(flood), 1)} ms "
            f"under the store flood vs {_num(_p50(alone), 1)}/{_num(_p99(alone), 1)} ms alone: "
            f"p99 x{_num(ratio(_p99(flood), _p99(alone)))}"
        )


def print_trace(records: list[RunRecord]) -> None:
    for r in records:
        if r.trace:
            t = r.trace
            print(
                f"  trace {r.engine}: {t.requests} requests over {t.conversations} conversations (zipf {t.zipf:.2f}), "
                f"block hit rate {t.hit_rate:.1%} ({t.hit_blocks}/{t.prompt_blocks}, {t.inflight_blocks} in flight), "
                f"lookup_many us p50/p99 {_num(_p50(t.lookup_many_us), 1)}/{_num(_p99(t.lookup_many_us), 1)}"
            )


def jsonable(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as JSON values: a sweep as its key and the values as given."""
    out = dict(vars(args))
    if args.sweep:
        out["sweep"] = {"key": args.sweep[0], "values": [label for label, _ in args.sweep[1]]}
    return out


def write_json(path: str, args: argparse.Namespace, root: str, runs: list[RunRecord], ratios: list[Ratio]) -> None:
    doc = {
        "schema": SCHEMA,
        "args": jsonable(args),
        "platform": {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release(), "fs": fs_type(root)},
        "runs": [dataclasses.asdict(r) for r in runs],
        "ratios": [dataclasses.asdict(q) for q in ratios],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
