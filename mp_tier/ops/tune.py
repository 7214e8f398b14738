"""``mp-tier tune ROOT``: short store and cold-load runs of the load generator over a few settings, and a preset.

The sweep is a table of (setting, values), tried one setting at a time: each
value runs with the best values found so far for the settings before it, so
a run costs the sum of the value counts, not their product. Each point runs
the load generator's own store workload and cold loads (a real tier, the host
spinning between polls as a scheduler does) beside its raw loops (the same
I/O with no tier: the file system's ceiling).

Best = the highest store + cold-load GB/s among the points whose host kept
busy/idle >= 0.9 in both (the scheduler kept 90% of its speed); if no point
did, the one with the highest busy/idle, and the preset says so.

Points start only within the first START_POINTS_WITHIN seconds, so a busy
host skips (and lists) what it cannot fit rather than running long.

Everything happens in a directory of its own under ROOT, removed at the
end, so a run leaves nothing behind (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..bench.case import Case, Settings
from ..bench.cli import build_parser
from ..bench.driver import calibrate_spin
from ..bench.records import RunRecord
from ..bench.root_dir import fs_label
from ..bench.tier_runs import learn_layout
from ..bench.workloads import workload_load, workload_store
from ..config import TierConfig
from .tree import UsageError, open_root, shown

# (setting, values), tuned in this order. A setting is a field of the load generator's Settings or
# of its options; "workers" is n_read_workers = n_write_workers.
SWEEP: list[tuple[str, tuple[Any, ...]]] = [
    ("workers", (1, 2, 4)),
    ("o_direct", ("off", "on")),
    ("io_depth", (1, 4)),
]
START = {"workers": 2, "o_direct": "off", "io_depth": 4}
MIN_BUSY_IDLE = 0.9
# No point starts after this many seconds of sweeping: with a point's own time (its phases, tier starts,
# syncs) a default run ends in under 2 minutes on an idle host, and a busy one skips what it cannot fit.
START_POINTS_WITHIN = 90.0


@dataclass
class Point:
    """One measured point: its settings, and the tier's and raw loops' figures."""

    values: dict[str, Any]
    store: float | None = None
    raw_store: float | None = None
    cold: float | None = None
    raw_cold: float | None = None
    store_busy: float | None = None
    cold_busy: float | None = None
    error: str = ""

    @property
    def eligible(self) -> bool:
        return not self.error and min(self.store_busy or 0, self.cold_busy or 0) >= MIN_BUSY_IDLE

    @property
    def score(self) -> float:
        return (self.store or 0) + (self.cold or 0)


def _args(block_size: int, seconds: float, total: int) -> argparse.Namespace:
    args = build_parser().parse_args(["--workload", "store,load", "--compare", "raw", "--idle-seconds", "0.2"])
    args.block_size, args.seconds, args.total, args.progress = block_size, seconds, total, sys.stderr.isatty()
    return args


def _case(base: argparse.Namespace, values: dict[str, Any], work_dir: str, spin_chunk: int) -> Case:
    """A load-generator case with ``values`` applied: to Settings where it has the field, else to the options."""
    args = argparse.Namespace(**vars(base))
    settings = Settings(args.block_size, args.blocks_per_job, args.workers, args.inflight)
    fields = {f.name for f in dataclasses.fields(Settings)}
    for name, value in values.items():
        if name == "workers":
            settings = dataclasses.replace(settings, workers=(value, value))
        elif name in fields:
            settings = dataclasses.replace(settings, **{name: value})
        else:
            setattr(args, name, value)
    root = tempfile.mkdtemp(prefix="point-", dir=work_dir)
    return Case(settings, args, root, None, spin_chunk)


def _pick(records: list[RunRecord], engine: str, workload: str, phase: str) -> RunRecord | None:
    return next((r for r in records if (r.engine, r.workload, r.phase) == (engine, workload, phase)), None)


def _gbps(record: RunRecord | None) -> float | None:
    return record.gbps if record else None


def measure(point: Point, base: argparse.Namespace, work_dir: str, spin_chunk: int) -> None:
    case = _case(base, point.values, work_dir, spin_chunk)
    try:
        learn_layout(case)
        records = workload_store(case) + workload_load(case, phases=("cold",))
    except (OSError, ValueError, RuntimeError) as e:
        point.error = str(e).split("\n")[0]
        return
    finally:
        shutil.rmtree(case.root, ignore_errors=True)
    tier_store, tier_cold = _pick(records, "processes", "store", "fresh"), _pick(records, "processes", "load", "cold")
    raw_store, raw_cold = _pick(records, "raw", "store", "fresh"), _pick(records, "raw", "load", "cold")
    point.store, point.cold = _gbps(tier_store), _gbps(tier_cold)
    point.raw_store, point.raw_cold = _gbps(raw_store), _gbps(raw_cold)
    point.store_busy = tier_store.busy_idle if tier_store else None
    point.cold_busy = tier_cold.busy_idle if tier_cold else None
    errors = [e for r in records for e in r.errors]
    point.error = errors[0] if errors else ""


def sweep(work_dir: str, base: argparse.Namespace, table: Sequence[tuple[str, tuple[Any, ...]]], log: Any = print) -> tuple[list[Point], Point]:
    """Every point measured, one setting at a time, and the best by the rule above."""
    spin_chunk = calibrate_spin(base.spin_us)
    deadline = time.monotonic() + START_POINTS_WITHIN
    best = dict(START)
    done: dict[tuple[Any, ...], Point] = {}
    for name, values in table:
        tried = []
        for value in values:
            values_now = {**best, name: value}
            key = tuple(sorted(values_now.items()))
            if key not in done:
                done[key] = Point(values_now)
                if time.monotonic() < deadline:
                    measure(done[key], base, work_dir, spin_chunk)
                else:
                    done[key].error = f"not run: no point starts after {START_POINTS_WITHIN:g} s"
                log(row(done[key]))
            tried.append(done[key])
        best = choose(tried).values
    points = list(done.values())
    return points, choose(points)


def choose(points: Sequence[Point]) -> Point:
    eligible = [p for p in points if p.eligible]
    if eligible:
        return max(eligible, key=lambda p: p.score)
    return max(points, key=lambda p: (not p.error, min(p.store_busy or 0, p.cold_busy or 0)))


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


HEADER = f"{'settings':<24} {'store GB/s':>10} {'(raw)':>7} {'cold GB/s':>10} {'(raw)':>7} {'busy/idle st':>12} {'cold':>5}  ok"


def row(p: Point) -> str:
    settings = " ".join(f"{k}={v}" for k, v in p.values.items())
    figures = f"{_fmt(p.store):>10} {_fmt(p.raw_store):>7} {_fmt(p.cold):>10} {_fmt(p.raw_cold):>7} {_fmt(p.store_busy):>12} {_fmt(p.cold_busy):>5}"
    return f"{settings:<24} {figures}  {'yes' if p.eligible else 'no'}" + (f"  error: {p.error}" if p.error else "")


def preset(best: Point, points: Sequence[Point], about: str) -> str:
    """The TOML preset: the table as comments, then the chosen settings as TierConfig fields."""
    fields: dict[str, Any] = {}
    for name, value in best.values.items():
        if name == "workers":
            fields.update(n_read_workers=value, n_write_workers=value)
        else:
            fields[name] = value
    config = TierConfig(**fields)  # checks every value as a tier would
    lines = [f"# {line}" for line in [about, HEADER, *map(row, points)]]
    rule = f"best: highest store + cold-load GB/s with host busy/idle >= {MIN_BUSY_IDLE} in both"
    lines.append(f"# {rule}" if best.eligible else f"# no point kept busy/idle >= {MIN_BUSY_IDLE}: this one came closest")
    chosen = [line for line in config.to_toml().splitlines() if line.split(" = ")[0] in fields]
    return "\n".join([*lines, *chosen]) + "\n"


def run(root: str, block_size: int, seconds: float, out: str | None) -> int:
    os.close(open_root(root))
    if seconds <= 0 or seconds > 600:
        raise UsageError(f"--seconds {seconds}: expected a number > 0 and <= 600")
    work_dir = tempfile.mkdtemp(prefix=".mp-tier-tune-", dir=root)
    try:
        base = _args(block_size, seconds, total=max(block_size * 16, int(4e9 * seconds)))
        about = (
            f"mp-tier tune on {shown(root)} ({fs_label(work_dir)}), block {block_size} bytes, {seconds:g} s a phase, "
            f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
        )
        print(about)
        print(HEADER)
        points, best = sweep(work_dir, base, SWEEP)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    text = preset(best, points, about)
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"best: {' '.join(f'{k}={v}' for k, v in best.values.items())}; preset written to {out}")
    else:
        print(text, end="")
    return 0
