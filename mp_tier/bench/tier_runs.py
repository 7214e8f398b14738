"""A measured run on a fresh tier: the tier and its cache, the host's CPU and the workers', and one RunRecord."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mp_tier import FileSystemTierManager, PrimaryCache, TierConfig

from .case import Case
from .driver import Host, Spinner, Window
from .keys import Keys
from .progress import make_bar
from .records import GB, Dist, RunRecord
from .units import size_label

CLK_TCK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def tier_session(case: Case, engine: str, num_blocks: int) -> Iterator[FileSystemTierManager]:
    """A tier on a fresh primary cache of random bytes, shut down and unlinked afterwards."""
    block = case.settings.block_size
    cache = PrimaryCache.create(num_blocks=num_blocks, block_bytes=block)
    try:
        # Random bytes, so no layer below can compress them; writing also faults
        # every page in now (first touches cost several times a memcpy).
        rng = np.random.default_rng()
        cache.array.reshape(-1)[:] = np.frombuffer(rng.bytes(num_blocks * block), np.uint8)
        read, write = case.settings.workers
        tier = FileSystemTierManager(
            primary_kv_view=cache,
            root_dir=case.root,
            n_read_workers=read,
            n_write_workers=write,
            engine="threads" if engine == "threads" else "processes",
            config=TierConfig(o_direct=case.args.o_direct, checksum=engine == "checksum", io_depth=case.args.io_depth),
        )
        try:
            yield tier
        finally:
            tier.shutdown()
    finally:
        cache.close()


def learn_layout(case: Case) -> None:
    """Ask a one-block tier where blocks go and whether it uses O_DIRECT: the raw runs do the same."""
    with tier_session(case, "threads", 1) as tier:
        tier.drain(30)
        case.path_of, case.direct = tier.block_path, tier.direct


def _schedstat_works() -> bool:
    """Whether the kernel keeps per-thread run times (``/proc/<pid>/schedstat``; "0 0 0" where it does not)."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[2]) > 0  # times this process was scheduled: at least once, as it runs
    except (OSError, IndexError, ValueError):
        return False


_NANOSECONDS = _schedstat_works()


def worker_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of these processes' threads: from ``/proc/<pid>/task/*/schedstat`` in nanoseconds, where the
    kernel keeps it, else utime + stime from ``/proc/<pid>/stat`` in clock ticks (10 ms: a phase of a few
    thousand 16 KiB blocks lasts a few ticks, so a per-block figure would move by 5-10 µs with rounding)."""
    total = 0
    for pid in pids:
        if not _NANOSECONDS:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK
            continue
        for tid in os.listdir(f"/proc/{pid}/task"):
            # A thread that ended meanwhile is skipped: lanes live as long as their worker.
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


def settle(pids: Sequence[int], timeout: float = 3.0) -> None:
    """Wait until freshly started workers stop using CPU (start-up imports), so idle is idle."""
    end = time.monotonic() + timeout
    last = worker_cpu_seconds(pids)
    while pids and time.monotonic() < end:
        time.sleep(0.05)
        now = worker_cpu_seconds(pids)
        if now == last:
            return
        last = now


def tier_run(
    case: Case,
    engine: str,
    workload: str,
    phase: str,
    lanes: dict[str, int],
    slot_blocks: int,
    planned_bytes: int,
    body: Callable[[Window], dict[str, Any]],
) -> RunRecord:
    """Run ``body`` on a fresh tier and measure it; ``body`` returns extra record fields."""
    os.sync()  # the previous run's dirty pages are not this run's work
    with tier_session(case, engine, sum(lanes.values()) * slot_blocks) as tier:
        spinner = Spinner(case.spin_chunk)
        bar = make_bar(case.args.progress, f"{workload} {phase} {size_label(case.settings.block_size)} {engine}", planned_bytes)
        host = Host(tier, spinner, bar)
        pids = tier.worker_pids()
        tier.drain(30)  # the tier's start-up sweep of temp files is not this run's work
        settle(pids)
        spinner.measure_idle(host.step, case.args.idle_seconds)
        cpu0, wcpu0, t0 = time.process_time(), worker_cpu_seconds(pids), time.perf_counter()
        try:
            extra = body(Window(host, slot_blocks, lanes))
        finally:
            bar.close()
        wall = time.perf_counter() - t0
        host_cpu = time.process_time() - cpu0 - spinner.busy_cpu
        worker_cpu = worker_cpu_seconds(pids) - wcpu0 if pids else None
        spinner.measure_idle(host.step, case.args.idle_seconds)
        direct = tier.direct
    return make_record(case, engine, workload, phase, host, spinner, wall, host_cpu, worker_cpu, direct, extra)


def make_record(
    case: Case,
    engine: str,
    workload: str,
    phase: str,
    host: Host,
    spinner: Spinner,
    wall: float,
    host_cpu: float,
    worker_cpu: float | None,
    direct: bool,
    extra: dict[str, Any],
) -> RunRecord:
    """The figures of a tier run from what the host saw and the clocks read around it."""
    nbytes = sum(host.bytes.values())
    blocks = sum(host.blocks.values())
    gb = nbytes / GB
    return RunRecord(
        workload=workload,
        phase=phase,
        engine=engine,
        sweep=case.sweep,
        block_bytes=case.settings.block_size,
        blocks_per_job=case.settings.blocks_per_job,
        read_workers=case.settings.workers[0],
        write_workers=case.settings.workers[1],
        inflight=case.settings.inflight,
        direct=direct,
        wall_s=wall,
        bytes=nbytes,
        blocks=blocks,
        gbps=gb / wall,
        blocks_per_s=blocks / wall,
        job_ms=Dist.of(host.latency_ns["store"] + host.latency_ns["load"], 1e-6),
        submit_us=Dist.of(host.submit_ns["store"] + host.submit_ns["load"], 1e-3),
        poll_us=Dist.of(host.poll_ns, 1e-3),
        host_cpu_s_per_gb=host_cpu / gb if gb else None,
        worker_cpu_s_per_gb=worker_cpu / gb if worker_cpu is not None and gb else None,
        busy_idle=spinner.busy_idle(),
        idle_loop_rate=spinner.rate("idle"),
        store=host.op_stats("store"),
        load=host.op_stats("load"),
        errors=list(host.errors),
        **extra,
    )


def run_jobs(win: Window, kind: str, jobs: Sequence[list[bytes]], deadline: float) -> dict[str, Any]:
    """Keep the window full of ``kind`` jobs until the list or the time runs out, then drain."""
    for keys in jobs:
        while not win.has_room(kind):
            win.step()
        if time.perf_counter() >= deadline:
            break
        win.submit(win.open(kind), kind, keys)
    win.drain()
    return {}


def stage(case: Case, n_jobs: int) -> list[list[bytes]]:
    """Store ``n_jobs`` jobs of fresh keys for later loads (not measured); returns those that made it."""
    keys = Keys()
    jobs = [keys.fresh(case.settings.blocks_per_job) for _ in range(n_jobs)]
    bpj = case.settings.blocks_per_job
    with tier_session(case, "processes", case.settings.inflight * bpj) as tier:
        bar = make_bar(case.args.progress, f"staging {size_label(case.settings.block_size)}", n_jobs * case.job_bytes)
        host = Host(tier, Spinner(0), bar)
        run_jobs(Window(host, bpj, {"store": case.settings.inflight}), "store", jobs, case.deadline())
        bar.close()
        stored = [keys for keys in jobs if all(tier.lookup(k) for k in keys)]
    if not stored:
        raise RuntimeError(f"staging stored nothing under {case.root}: {host.errors}")
    return stored
