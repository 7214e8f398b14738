"""The figures of a run and the ratios between engines: what the table, the JSON and the plot show.

The field names are the JSON schema's (see :mod:`mp_tier.bench.report`):
renaming or removing one bumps the schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

COMPARES = ("threads", "raw", "checksum")
GB = 1e9  # GB/s and s/GB figures are decimal; sizes on the command line are binary


@dataclass
class Dist:
    """A sample's size, median, 99th percentile, maximum and mean, in the unit its field name says."""

    n: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Dist | None:
        """None for an empty sample, so a run that moved nothing shows '-' rather than zeros."""
        if not len(values):
            return None
        a = np.asarray(values, dtype=float) * scale
        return cls(len(a), float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max()), float(a.mean()))


@dataclass
class OpStats:
    """One direction (store or load) of a run: job latency runs from the submit call to the poll that returned it."""

    jobs: int
    blocks: int
    bytes: int
    failed_jobs: int
    job_ms: Dist | None
    submit_us: Dist | None


@dataclass
class TraceStats:
    """Prefix reuse of the trace workload: hit_rate = hit_blocks / prompt_blocks."""

    conversations: int
    zipf: float
    requests: int
    prompt_blocks: int
    hit_blocks: int
    inflight_blocks: int  # found with a store still in flight: neither loaded nor stored again
    hit_rate: float
    lookup_many_us: Dist | None  # one lookup_many() call per request, for the whole prompt


@dataclass
class RunRecord:
    """Every figure of one run: one phase of one workload on one engine (see mp_tier.bench.report)."""

    workload: str
    phase: str
    engine: str
    sweep: str | None
    block_bytes: int
    blocks_per_job: int
    read_workers: int
    write_workers: int
    inflight: int
    direct: bool
    wall_s: float
    bytes: int
    blocks: int
    gbps: float
    blocks_per_s: float
    job_ms: Dist | None
    submit_us: Dist | None
    poll_us: Dist | None
    host_cpu_s_per_gb: float | None
    worker_cpu_s_per_gb: float | None
    busy_idle: float | None
    idle_loop_rate: float | None
    store: OpStats | None = None
    load: OpStats | None = None
    idle_load_ms: Dist | None = None
    trace: TraceStats | None = None
    cache_drop: str | None = None
    round: int = 0  # with --repeat: which repetition
    errors: list[str] = field(default_factory=list)


@dataclass
class Ratio:
    """processes divided by ``versus`` (threads, raw or checksum) for one workload phase of one case."""

    sweep: str | None
    round: int
    workload: str
    phase: str
    versus: str
    gbps: float | None
    busy_idle: float | None
    job_p99: float | None
    host_cpu_per_gb: float | None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is zero (no division by a run that moved nothing)."""
    return a / b if a is not None and b else None


def _p99(d: Dist | None) -> float | None:
    return d.p99 if d else None


def compute_ratios(records: list[RunRecord]) -> list[Ratio]:
    """processes divided by every compared engine, for every workload phase both ran."""
    by_key = {(r.round, r.workload, r.phase, r.engine): r for r in records}
    ratios = []
    for (rnd, workload, phase, engine), p in by_key.items():
        if engine != "processes":
            continue
        for versus in COMPARES:
            o = by_key.get((rnd, workload, phase, versus))
            if o is None:
                continue
            ratios.append(
                Ratio(
                    sweep=p.sweep,
                    round=rnd,
                    workload=workload,
                    phase=phase,
                    versus=versus,
                    gbps=ratio(p.gbps, o.gbps),
                    busy_idle=ratio(p.busy_idle, o.busy_idle),
                    job_p99=ratio(_p99(p.job_ms), _p99(o.job_ms)),
                    host_cpu_per_gb=ratio(p.host_cpu_s_per_gb, o.host_cpu_s_per_gb),
                )
            )
    return ratios
