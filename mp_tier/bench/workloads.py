"""The workloads, each a list of measured runs per engine: store, load (cold, warm), mixed and trace."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .case import Case, schedule
from .chat_trace import ChatTrace, trace_requests
from .driver import Window
from .keys import Keys
from .page_cache import drop_page_cache, fadvise_out
from .raw import raw_run
from .records import RunRecord
from .tier_runs import run_jobs, stage, tier_run

WORKLOADS = ("store", "load", "mixed", "trace")
MIXED_LOAD_POOL = 8  # staged load jobs the mixed trickle cycles through


def keep_full(case: Case, kind: str, jobs: Sequence[list[bytes]]) -> Callable[[Window], dict[str, Any]]:
    """A run body that keeps the window full of ``jobs``; ``--seconds`` counts from when the body starts."""
    return lambda win: run_jobs(win, kind, jobs, case.deadline())


def workload_store(case: Case) -> list[RunRecord]:
    bpj, inflight = case.settings.blocks_per_job, case.settings.inflight
    records = []
    for rnd, engine in schedule(case, with_raw=True):
        keys = Keys()
        jobs = [keys.fresh(bpj) for _ in range(case.n_jobs)]
        if engine == "raw":
            record = raw_run(case, "store", "fresh", case.paths(jobs))
        else:
            body = keep_full(case, "store", jobs)
            record = tier_run(case, engine, "store", "fresh", {"store": inflight}, bpj, case.n_jobs * case.job_bytes, body)
        record.round = rnd
        records.append(record)
    return records


def workload_load(case: Case, phases: tuple[str, ...] = ("cold", "warm")) -> list[RunRecord]:
    """Cold (page cache dropped and checked) then warm, per engine, over the same staged files.

    ``phases``: which of the two to run; ``mp-tier tune`` scores cold loads only.
    """
    bpj, inflight = case.settings.blocks_per_job, case.settings.inflight
    staged = stage(case, case.n_jobs)
    paths = case.paths(staged)
    body = keep_full(case, "load", staged)
    records = []
    for rnd, engine in schedule(case, with_raw=True):
        for phase in phases:
            dropped = drop_page_cache(paths) if phase == "cold" else None
            if engine == "raw":
                record = raw_run(case, "load", phase, paths)
            else:
                record = tier_run(case, engine, "load", phase, {"load": inflight}, bpj, len(staged) * case.job_bytes, body)
            record.round, record.cache_drop = rnd, dropped
            records.append(record)
    return records


def workload_mixed(case: Case) -> list[RunRecord]:
    """Per engine: the flood with its load trickle, then the same loads alone (the baseline)."""
    pool = stage(case, MIXED_LOAD_POOL)
    records = []
    for rnd, engine in schedule(case, with_raw=False):
        flood, alone = mixed_runs(case, engine, pool)
        flood.round = alone.round = rnd
        records += [flood, alone]
    return records


def mixed_runs(case: Case, engine: str, pool: list[list[bytes]]) -> tuple[RunRecord, RunRecord]:
    """One engine's store flood with its load trickle, then the same loads with nothing else going on."""
    bpj, inflight = case.settings.blocks_per_job, case.settings.inflight
    gap = case.args.load_gap_ms / 1e3
    stores = [Keys().fresh(bpj) for _ in range(case.n_jobs)]

    def make_cold(keys: list[bytes]) -> None:
        if not case.direct:
            fadvise_out(case.paths([keys]))

    flood = tier_run(
        case, engine, "mixed", "flood", {"store": inflight, "load": 1}, bpj, case.n_jobs * case.job_bytes,
        lambda win: mixed_flood(win, stores, pool, gap, case.deadline(), make_cold),
    )
    n_loads = flood.load.jobs if flood.load else 0
    alone = tier_run(
        case, engine, "mixed", "idle-loads", {"load": 1}, bpj, n_loads * case.job_bytes,
        lambda win: load_trickle(win, pool, n_loads, gap, make_cold),
    )
    flood.idle_load_ms = alone.load.job_ms if alone.load else None
    return flood, alone


def mixed_flood(
    win: Window, stores: list[list[bytes]], pool: list[list[bytes]], gap: float, deadline: float,
    make_cold: Callable[[list[bytes]], None],
) -> dict[str, Any]:
    """Keep the store window full; issue one load at a time, ``gap`` after the previous one ended."""
    queue = iter(stores)
    next_store = next(queue, None)
    load_job, loads, next_load = None, 0, 0.0
    while next_store is not None and time.perf_counter() < deadline:
        while next_store is not None and win.has_room("store"):
            win.submit(win.open("store"), "store", next_store)
            next_store = next(queue, None)
        if load_job is None and time.perf_counter() >= next_load:
            keys = pool[loads % len(pool)]
            make_cold(keys)
            load_job = win.submit(win.open("load"), "load", keys)
            loads += 1
        if any(r.job_id == load_job for r in win.step()):
            load_job, next_load = None, time.perf_counter() + gap
    win.drain()
    return {}


def load_trickle(
    win: Window, pool: list[list[bytes]], count: int, gap: float, make_cold: Callable[[list[bytes]], None]
) -> dict[str, Any]:
    """The mixed flood's loads, same order and gap, with nothing else going on."""
    for i in range(count):
        keys = pool[i % len(pool)]
        make_cold(keys)
        win.submit(win.open("load"), "load", keys)
        win.drain()
        end = time.perf_counter() + gap
        while time.perf_counter() < end:
            win.step()
    return {}


def workload_trace(case: Case) -> list[RunRecord]:
    records = []
    for rnd, engine in schedule(case, with_raw=False):
        record = trace_run(case, engine)
        record.round = rnd
        records.append(record)
    return records


def trace_run(case: Case, engine: str) -> RunRecord:
    """One engine serving the chat trace; the seed gives every engine the same requests."""
    args = case.args
    trace = ChatTrace(args.conversations, args.zipf, args.turn_blocks, args.max_turns, args.seed)
    return tier_run(
        case, engine, "trace", "zipf", {"request": case.settings.inflight}, args.max_turns * args.turn_blocks, args.total,
        lambda win: trace_requests(win, trace, args.total, case.settings.block_size, case.deadline()),
    )


WORKLOAD_RUNNERS: dict[str, Callable[[Case], list[RunRecord]]] = {
    "store": workload_store,
    "load": workload_load,
    "mixed": workload_mixed,
    "trace": workload_trace,
}
