"""mp_tier's default config against vLLM 0.33's FS tier on its C I/O path, on disk and on tmpfs, in one run.

    cd <checkout> && PYTHONPATH=$PWD <vllm-compat venv>/bin/python tools/vllm_bench.py --json out.json
    ... tools/vllm_bench.py --roots tmpfs --sizes 16k --shapes 1x16 --rounds 1      # a quick look
    ... tools/vllm_bench.py --variant direct-off:o_direct=off                       # an extra mp_tier column

Columns: vLLM's FS tier on its ``fs_io_C`` extension (``vLLM C``, the path
vLLM users run and the peer every target is against), the same tier forced
onto its pure-Python fallback (``vLLM Python``, a labelled extra), mp_tier's
adapter with its default config (``mp_tier``: no worker counts given), any
``--variant`` columns, and plain pwrite/preadv loops with no tier in as many
processes as mp_tier has workers (``raw``, the ceiling). Every tier is driven
through vLLM's own calls (``SharedOffloadRegion`` memory, ``TransferJob``,
``get_finished_jobs``) by a host that spins in Python between polls
(:mod:`mp_tier.bench.vllm_phase`).

The matrix: a disk root (ext4 here, O_DIRECT where the tier's probe says it
works) and a tmpfs root (/dev/shm: fast storage, where the software's CPU
decides); 2 MiB, 256 KiB and 16 KiB blocks; two job shapes, ``16x8`` (16
blocks per job, 8 jobs in flight: a prefill's store) and ``1x16`` (1 block,
16 in flight: a decode step's store). Per cell, ``--rounds`` rounds with the
columns interleaved and their order reversed every other round (the disk
drifts on a shared VM); the table shows medians with their range, and the
ratios are medians of the per-round ratios. Load phases read blocks staged
beforehand; on disk their pages are dropped first and checked with mincore
(``NOT COLD`` if that failed); on tmpfs the files are memory.

At the end it prints issue 18's targets for mp_tier's default, each PASS or
FAIL (:mod:`mp_tier.bench.vllm_targets`). The default run (2 roots x 3 sizes
x 2 shapes x 3 rounds x 4 columns, phases of at most --seconds 1.5) takes
about 10-13 minutes on the 2-vCPU dev VM; --roots, --sizes and --shapes
restrict it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mp_tier.bench.case import Case, Settings
from mp_tier.bench.driver import Spinner, calibrate_spin
from mp_tier.bench.errors import UsageError
from mp_tier.bench.keys import Keys
from mp_tier.bench.page_cache import drop_page_cache
from mp_tier.bench.raw import raw_run
from mp_tier.bench.records import GB, RunRecord
from mp_tier.bench.root_dir import MARKER, fs_type
from mp_tier.bench.tier_runs import settle
from mp_tier.bench.units import parse_positive, parse_size, parse_workers, size_label
from mp_tier.bench.vllm_peer import Column, Tier, VllmApi
from mp_tier.bench.vllm_phase import Drive, Phase, limit_note, per_block_us, remove_blocks, run_phase
from mp_tier.bench.vllm_table import Marks, fmt, header, rows, verdict_line
from mp_tier.bench.vllm_targets import MP, RAW, VLLM_C, VLLM_PY, Cell, Figures, Verdict, evaluate, host_loss_per_gb

SCHEMA = "mp_tier.vllm_bench/2"
ROOTS = ("disk", "tmpfs")
RAW_BATCH = 16  # blocks between a raw process's progress messages, whatever the job shape: its CPU is the loop's
TIMEOUT = 120.0  # seconds any single wait may take before the run is declared stuck


@dataclass(frozen=True)
class Shape:
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


def schedule(columns: list[Column], rounds: int) -> list[tuple[int, Column | None]]:
    """(round, column) pairs, None for the raw loops; every other round in reverse order."""
    order: list[Column | None] = [*columns, None]
    return [(r, c) for r in range(rounds) for c in (order if r % 2 == 0 else order[::-1])]


def phase_blocks(args: argparse.Namespace, block: int) -> int:
    """Blocks a phase moves at most: ``--total`` bytes and ``--max-blocks`` blocks (small blocks stay seconds)."""
    return max(1, min(int(args.total) // block, args.max_blocks))


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


def cold(paths: list[str], tmpfs: bool) -> str:
    return "tmpfs: the files are memory" if tmpfs else drop_page_cache(paths)


def measure(api: VllmApi, columns: list[Column], view: Any, root: str, kind: str, shapes: list[Shape], args: argparse.Namespace) -> list[CellRuns]:
    """Every shape at one root and block size: staged once, then every column and the raw loops, ``--rounds`` times."""
    block, tmpfs = args.block, kind == "tmpfs"
    n_blocks = phase_blocks(args, block)
    stage_slots = [np.arange(s * 16, (s + 1) * 16, dtype=np.int32) for s in range(8)]
    staged, stager = stage(api, view, root, n_blocks, stage_slots)
    staged_paths = [stager.path_of(k) for k in staged]
    drive = Drive(args.spin_chunk, args.idle_seconds, args.seconds, block)
    ids = itertools.count(1_000_000)  # job ids are never reused, as vLLM never reuses them
    out = []
    try:
        for shape in shapes:
            runs = CellRuns(Cell(kind, shape.label, block), len(staged_paths))
            bpj = shape.blocks_per_job
            slots = [np.arange(s * bpj, (s + 1) * bpj, dtype=np.int32) for s in range(shape.inflight)]
            case = Case(
                Settings(block, RAW_BATCH, stager.workers, shape.inflight),
                argparse.Namespace(idle_seconds=args.idle_seconds, progress=False),
                root,
                None,
                args.spin_chunk,
                stager.path_of,
                stager.direct,
            )
            loads = as_jobs(staged, shape)
            for rnd, column in schedule(columns, args.rounds):
                fresh = as_jobs(Keys().fresh(n_blocks), shape)
                fresh_paths = case.paths(fresh)
                os.sync()  # the previous run's dirty pages are not this run's work
                where = f"{kind} {shape.label} {size_label(block)} round {rnd + 1}"
                if column is None:
                    try:
                        store = raw_run(case, "store", "fresh", fresh_paths)
                    finally:
                        remove_blocks(fresh_paths)
                    dropped = cold(staged_paths, tmpfs)
                    load = raw_run(case, "load", "cold", staged_paths)
                    load.cache_drop = dropped
                    runs.raw.append({"round": rnd, "store": store, "load": load})
                    note(args, f"{where} raw: store {store.gbps:.3f}, load {load.gbps:.3f} GB/s")
                    continue
                tier = api.open(column, view, root)
                try:
                    tier.drain()  # its start-up sweep and scan are not this run's work
                    list(tier.poll())
                    settle(tier.pids)
                    store_phase = run_phase(tier, False, fresh, slots, ids, drive)
                    remove_blocks(fresh_paths)
                    dropped = cold(staged_paths, tmpfs)
                    load_phase = run_phase(tier, True, loads, slots, ids, drive)
                    load_phase.cache_drop = dropped
                    runs.tiers.append({"round": rnd, "column": column.name, "direct": tier.direct, "store": store_phase, "load": load_phase})
                finally:
                    tier.shutdown()
                    del tier
                note(
                    args,
                    f"{where} {column.name}: store {store_phase.gbps:.3f} GB/s{limit_note(store_phase)}, "
                    f"load {load_phase.gbps:.3f} GB/s{limit_note(load_phase)}, busy/idle {fmt(store_phase.busy_idle)}",
                )
            out.append(runs)
    finally:
        remove_blocks(staged_paths)
    return out


# -- from runs to figures ------------------------------------------------------------


def tier_metrics(store: Phase, load: Phase) -> dict[str, float | None]:
    return {
        "store_gbps": store.gbps,
        "load_gbps": load.gbps,
        "busy_idle": store.busy_idle,
        "loss_per_gb": host_loss_per_gb(store.busy_idle, store.gbps),
        "submit_p50_us": store.submit_us.p50 if store.submit_us else None,
        "submit_p99_us": store.submit_us.p99 if store.submit_us else None,
        "store_cpu_us_per_block": per_block_us(store.worker_cpu_s, store.blocks),
        "load_cpu_us_per_block": per_block_us(load.worker_cpu_s, load.blocks),
        "host_cpu_us_per_block": per_block_us(store.host_cpu_s, store.blocks),
    }


def raw_metrics(store: RunRecord, load: RunRecord) -> dict[str, float | None]:
    def cpu(r: RunRecord) -> float | None:
        return r.worker_cpu_s_per_gb * r.block_bytes / GB * 1e6 if r.worker_cpu_s_per_gb is not None else None

    return {
        "store_gbps": store.gbps,
        "load_gbps": load.gbps,
        "busy_idle": store.busy_idle,
        "loss_per_gb": host_loss_per_gb(store.busy_idle, store.gbps),
        "store_cpu_us_per_block": cpu(store),
        "load_cpu_us_per_block": cpu(load),
    }


def figures(runs: CellRuns, columns: list[Column]) -> tuple[Figures, Marks]:
    """Per column and metric, one value per round; marks for time-limited phases and loads that were not cold."""
    rounds = sorted({r["round"] for r in runs.tiers} | {r["round"] for r in runs.raw})
    by = {(r["round"], r["column"]): r for r in runs.tiers} | {(r["round"], RAW): r for r in runs.raw}
    out: Figures = {}
    marks: Marks = {}
    for name in [c.name for c in columns] + [RAW]:
        per = [by.get((rnd, name)) for rnd in rounds]
        metric = [(tier_metrics if name != RAW else raw_metrics)(r["store"], r["load"]) if r else {} for r in per]
        out[name] = {m: [values.get(m) for values in metric] for m in set().union(*metric)}
        for op in ("store", "load"):
            phases = [r[op] for r in per if r]
            if any(getattr(p, "time_limited", False) or getattr(p, "cut_short", False) for p in phases):
                marks[(name, f"{op}_gbps")] = "*"
            if any((p.cache_drop or "").startswith("NOT COLD") for p in phases if op == "load"):
                marks[(name, "load_gbps")] = marks.get((name, "load_gbps"), "") + " NOT COLD"
    return out, marks


def report(all_runs: list[CellRuns], columns: list[Column], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Verdict]]:
    names = [c.name for c in columns] + [RAW]
    cells, verdicts = [], []
    for kind, shape in itertools.product(args.roots, args.shapes):
        group = [r for r in all_runs if r.cell.root == kind and r.cell.shape == shape.label]
        if not group:
            continue
        print(f"\n{kind}, jobs of {shape.blocks_per_job} blocks, {shape.inflight} in flight:\n")
        print("\n".join(header(names)))
        for runs in group:
            figs, marks = figures(runs, columns)
            print("\n".join(rows(runs.cell, figs, names, marks)))
            found = evaluate(runs.cell, figs)
            verdicts += found
            cells.append({"cell": to_json(runs.cell), "figures": figs, "verdicts": [verdict_json(v) for v in found]})
    print(
        f"\nMedians of {args.rounds} rounds (range); ratios: median of the per-round ratios (range). {RAW}: pwrite/preadv loops in as many "
        f"processes as {MP} has workers, no tier. * = in some round the phase stopped submitting at the {args.seconds:g} s limit: it moved "
        "less, at the rate shown. host loss per GB = (1 - busy/idle) ÷ GB/s. Worker CPU: mp_tier's worker processes and the raw loops, "
        "from /proc; vLLM's threads are the host's (host CPU row). tmpfs loads read memory, not a cold disk."
    )
    print(f"\nTargets (issue 18), {MP} default ÷ the column named, {len(verdicts)} checks:")
    for v in verdicts:
        print("  " + verdict_line(v))
    print(f"targets met: {sum(v.passed for v in verdicts)} of {len(verdicts)}")
    return cells, verdicts


def verdict_json(v: Verdict) -> dict[str, Any]:
    t = v.target
    return {"target": t.label, "metric": t.metric, "against": t.against, "ratio": v.ratio, "low": v.low, "high": v.high} | {
        "bound": v.bound,
        "higher_is_better": t.higher_is_better,
        "passed": v.passed,
        "note": v.note,
    }


def first_results(api: VllmApi, columns: list[Column], view: Any, run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Per column: from the constructor's start (fresh root) to the first 16-block store's result, the host spinning."""
    chunk_ids = np.arange(16, dtype=np.int32)
    samples: dict[str, list[float]] = {c.name: [] for c in columns}
    for i in range(args.ttfr):
        for column in columns if i % 2 == 0 else columns[::-1]:
            root = os.path.join(run_dir, f"ttfr-{i}-{uuid.uuid4().hex[:8]}")
            spinner = Spinner(args.spin_chunk)
            t0 = time.perf_counter()
            tier = api.open(column, view, root)
            try:
                tier.submit_store(tier.make_job(1, Keys().fresh(16), chunk_ids, False))
                while not (results := list(tier.poll())):
                    if time.perf_counter() - t0 > TIMEOUT:
                        raise TimeoutError(f"{column.name}: no result {TIMEOUT:.0f} s after construction")
                    spinner.slice() if spinner.chunk else time.sleep(0.0002)
                samples[column.name].append(time.perf_counter() - t0)
                if not results[0].success:
                    raise RuntimeError(f"{column.name}: the first store failed: {results[0]}")
            finally:
                tier.shutdown()
                del tier
                shutil.rmtree(root, ignore_errors=True)
    return {name: {"first_result_s": s, "median_s": sorted(s)[len(s) // 2]} for name, s in samples.items() if s}


def check_columns(api: VllmApi, columns: list[Column], view: Any, run_dir: str) -> None:
    """Build every column's tier once, so a bad variant setting fails now and not after minutes of runs."""
    for column in columns:
        root = os.path.join(run_dir, f"check-{uuid.uuid4().hex[:8]}")
        try:
            api.open(column, view, root).shutdown()
        except (TypeError, ValueError) as e:
            raise UsageError(f"column {column.name!r} {column.settings}: {e}") from None
        finally:
            shutil.rmtree(root, ignore_errors=True)


def note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def to_json(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: to_json(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    return x


# -- the command line --------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """'2m,256k,16k' -> bytes; each a multiple of the page size, as vLLM's region requires."""
    sizes = [parse_size(t) for t in text.split(",") if t.strip()]
    page = os.sysconf("SC_PAGESIZE")
    if not sizes or any(s % page for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of sizes, each a multiple of {page} bytes")
    return sizes


def parse_shapes(text: str) -> list[Shape]:
    """'16x8,1x16' -> jobs of 16 blocks with 8 in flight, and of 1 block with 16 in flight."""
    shapes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        blocks, x, inflight = item.partition("x")
        if not x or not blocks.isdigit() or not inflight.isdigit() or int(blocks) < 1 or int(inflight) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected BLOCKSxINFLIGHT, e.g. 16x8")
        shapes.append(Shape(int(blocks), int(inflight)))
    if not shapes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of shapes, e.g. 16x8,1x16")
    return shapes


def parse_roots(text: str) -> list[str]:
    roots = [t.strip() for t in text.split(",") if t.strip()]
    if not roots or any(r not in ROOTS for r in roots):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(ROOTS)}")
    return list(dict.fromkeys(roots))


def parse_variant(text: str) -> Column:
    """'direct-off:o_direct=off' -> an mp_tier column; values are JSON where they parse (4, true, 0.5), else text."""
    name, sep, body = text.partition(":")
    if not sep or not name.strip() or name.strip() in (VLLM_C, VLLM_PY, MP, RAW):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:key=value,... with a new NAME (e.g. direct-off:o_direct=off)")
    settings: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not key=value")
        try:
            settings[key.strip()] = json.loads(value)
        except ValueError:
            settings[key.strip()] = value.strip()
    return Column(name.strip(), MP, settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="mp_tier's default config against vLLM 0.33's FS tier (C and Python I/O paths), on disk and tmpfs, with a busy host.",
        epilog="Sizes are binary (256k, 2m, 1g); GB = 1e9 bytes. Needs vLLM 0.33 with its fs_io_C extension built (see .ci/vllm-compat).",
    )
    p.add_argument("--roots", type=parse_roots, default=list(ROOTS), help="disk, tmpfs or both (default disk,tmpfs)")
    p.add_argument("--disk-dir", default=tempfile.gettempdir(), help="a directory on a disk file system; the run works in its own subdirectory")
    p.add_argument("--tmpfs-dir", default="/dev/shm", help="a directory on tmpfs (default /dev/shm); the run works in its own subdirectory")
    p.add_argument("--sizes", type=parse_sizes, default=[2 << 20, 256 << 10, 16 << 10], help="block sizes (default 2m,256k,16k)")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("16x8,1x16"), help="job shapes BLOCKSxINFLIGHT (default 16x8,1x16)")
    p.add_argument("--rounds", type=parse_positive, default=3, help="rounds per cell, column order reversed every other round (default 3)")
    p.add_argument("--total", type=parse_size, default=512 << 20, help="bytes each phase moves at most (default 512m)")
    p.add_argument("--max-blocks", type=parse_positive, default=8192, help="blocks each phase moves at most (default 8192)")
    p.add_argument("--seconds", type=float, default=1.5, help="a phase stops submitting after this long (default 1.5)")
    p.add_argument("--spin-us", type=int, default=1000, help="host busy-loop slice between polls, µs; 0 = sleep instead (default 1000)")
    p.add_argument("--idle-seconds", type=float, default=0.2, help="busy-loop idle speed measured this long before and after each phase")
    p.add_argument("--vllm-threads", type=parse_workers, default=(16, 16), help="vLLM's read+write threads, N or R+W (default 16+16, its own)")
    p.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME:K=V,...",
        help="add an mp_tier column with these adapter settings (any TierConfig field, e.g. o_direct=off); repeatable; not judged",
    )
    p.add_argument("--ttfr", type=int, default=3, help="constructions per column timed to the first result, first cell only (default 3; 0 skips)")
    p.add_argument("--json", metavar="FILE", help=f"write every figure as JSON (schema {SCHEMA})")
    p.add_argument("--quiet", action="store_true", help="no per-run lines on stderr")
    return p


def root_dirs(args: argparse.Namespace) -> dict[str, str]:
    """This run's own directory under each root's parent, of the file system that root names."""
    made: dict[str, str] = {}
    for kind in args.roots:
        parent = args.disk_dir if kind == "disk" else args.tmpfs_dir
        found = fs_type(parent) if os.path.isdir(parent) else "missing"
        if (kind == "tmpfs") != (found == "tmpfs") or found in ("missing", "ramfs"):
            for d in made.values():
                shutil.rmtree(d, ignore_errors=True)
            raise UsageError(f"--{kind}-dir {parent} is {found}, not a {'tmpfs' if kind == 'tmpfs' else 'disk file system'} directory")
        made[kind] = tempfile.mkdtemp(prefix="loadgen-", dir=parent)
        Path(made[kind], MARKER).touch()
    return made


def run(args: argparse.Namespace, dirs: dict[str, str]) -> dict[str, Any]:
    t_start = time.monotonic()
    api = VllmApi(args.vllm_threads)
    columns = [Column(VLLM_C, VLLM_C), Column(VLLM_PY, VLLM_PY), Column(MP, MP), *args.variant]
    if len({c.name for c in columns}) != len(columns):
        raise UsageError(f"column names must differ: {', '.join(c.name for c in columns)}")
    args.spin_chunk = calibrate_spin(args.spin_us)
    print(api.describe())
    shapes = ", ".join(f"{s.label} ({s.blocks_per_job} blocks per job, {s.inflight} in flight)" for s in args.shapes)
    print(
        f"roots {', '.join(f'{k} {d} ({fs_type(d)})' for k, d in dirs.items())}; {os.cpu_count()} CPUs; shapes {shapes}; host spins "
        f"{args.spin_us} µs between polls; <= {size_label(args.total)}, {args.max_blocks} blocks or {args.seconds:g} s per phase; "
        f"{args.rounds} rounds, order alternated",
        flush=True,
    )
    chunks = max(128, *(s.blocks_per_job * s.inflight for s in args.shapes))  # staging uses 8 jobs of 16 blocks
    all_runs: list[CellRuns] = []
    ttfr: dict[str, Any] = {}
    for kind, block in itertools.product(args.roots, args.sizes):
        args.block = block
        with api.memory(chunks, block) as view:
            if not all_runs:
                check_columns(api, columns, view, dirs[kind])
                ttfr = first_results(api, columns, view, dirs[kind], args) if args.ttfr > 0 else {}
            root = os.path.join(dirs[kind], size_label(block))
            runs = measure(api, columns, view, root, kind, args.shapes, args)
            all_runs += runs
            directs = {(r["column"], r["direct"]) for c in runs for r in c.tiers}
            note(args, f"{kind} {size_label(block)}: O_DIRECT " + ", ".join(f"{c}={'on' if d else 'off'}" for c, d in sorted(directs)))
            shutil.rmtree(root, ignore_errors=True)
            del view  # the region unmaps only once no view of it is left
    cells, verdicts = report(all_runs, columns, args)
    if ttfr:
        print(f"\nTime to first result (constructor start -> the first 16-block store's result, host spinning; median of {args.ttfr}):")
        for name, t in ttfr.items():
            print(f"  {name}: {t['median_s']:.3f} s")
    elapsed = time.monotonic() - t_start
    print(f"\ncommand: {shlex.join(sys.orig_argv)}\nelapsed: {elapsed:.0f} s")
    return {
        "schema": SCHEMA,
        "command": sys.orig_argv,
        "header": api.describe(),
        "elapsed_s": elapsed,
        "args": {k: to_json(v) for k, v in vars(args).items() if k != "block"},
        "platform": {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release()},
        "roots": {k: {"dir": d, "fs": fs_type(d)} for k, d in dirs.items()},
        "columns": [to_json(c) for c in columns],
        "runs": [to_json(r) for r in all_runs],
        "cells": cells,
        "targets_met": sum(v.passed for v in verdicts),
        "targets": len(verdicts),
        "time_to_first_result": ttfr,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 2 on a usage error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    dirs: dict[str, str] = {}
    try:
        dirs = root_dirs(args)
        document = run(args, dirs)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(document, f, indent=1)
    except UsageError as e:
        print(f"vllm_bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vllm_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
