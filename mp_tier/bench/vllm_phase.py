"""One measured phase (store or cold load) of one tier, driven as vLLM's scheduler drives a secondary tier.

The host keeps a number of jobs in flight, polls ``get_finished_jobs()`` every
step and runs pure-Python work for a slice between polls (a scheduler holds
the GIL that way); only the submit call is timed. A phase stops submitting
after ``seconds`` and waits at most as long again for the jobs in flight: a
tier that all but stops under a busy host is measured, not waited for. GB/s
counts completed jobs over the time from the first submit to the last result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .driver import Spinner
from .records import GB, Dist
from .tier_runs import worker_cpu_seconds
from .vllm_peer import Tier


@dataclass
class Phase:
    """One direction of one tier's run, as the host saw it."""

    gbps: float
    bytes: int
    blocks: int
    wall_s: float
    jobs: int
    failed_jobs: int
    time_limited: bool  # stopped submitting at the time limit before its last job
    cut_short: bool  # gave up at twice the limit with jobs still in flight
    busy_idle: float | None
    idle_loop_rate: float | None
    submit_us: Dist | None
    job_ms: Dist | None
    host_cpu_s: float  # the host's CPU less the busy loop's: vLLM's threads are the host's
    worker_cpu_s: float | None  # mp_tier's worker processes, from /proc
    cache_drop: str | None = None


@dataclass(frozen=True)
class Drive:
    """How the host drives a phase."""

    spin_chunk: int  # busy-loop iterations per slice; 0 = sleep between polls
    idle_seconds: float  # busy-loop idle speed measured this long before and after
    seconds: float  # stop submitting after this long
    block_bytes: int


def run_phase(tier: Tier, load: bool, jobs: Sequence[list[bytes]], slots: Sequence[np.ndarray], ids: Iterator[int], drive: Drive) -> Phase:
    """Keep ``len(slots)`` jobs in flight, poll every step and spin between polls."""
    spinner = Spinner(drive.spin_chunk)
    spinner.measure_idle(tier.poll, drive.idle_seconds)
    submit = tier.submit_load if load else tier.submit_store
    done_submitting = 0  # jobs submitted so far
    free = list(range(len(slots)))
    pending: dict[int, tuple[int, int, int]] = {}  # job id -> slot, blocks, submit time (ns)
    submit_ns: list[int] = []
    latency_ns: list[int] = []
    blocks = failed = 0
    cut = limited = False
    cpu0, wcpu0 = time.process_time(), worker_cpu_seconds(tier.pids)
    t0 = time.perf_counter_ns()
    stop_submitting = t0 + int(drive.seconds * 1e9)
    give_up = stop_submitting + int(drive.seconds * 1e9)
    last = t0
    while True:
        while free and done_submitting < len(jobs) and time.perf_counter_ns() < stop_submitting:
            keys = jobs[done_submitting]
            done_submitting += 1
            slot = free.pop()
            job = tier.make_job(next(ids), keys, slots[slot][: len(keys)], load)
            start = time.perf_counter_ns()
            submit(job)
            submit_ns.append(time.perf_counter_ns() - start)
            pending[job.job_id] = (slot, len(keys), start)
        results = tier.poll()
        now = time.perf_counter_ns()
        for result in results:
            slot, n, start = pending.pop(result.job_id)
            free.append(slot)
            latency_ns.append(now - start)
            last = now
            if result.success:
                blocks += n
            else:
                failed += 1
        exhausted = done_submitting == len(jobs)
        if not exhausted and now >= stop_submitting:
            limited = True
        if not pending and (exhausted or limited):
            break
        if now >= give_up:
            cut, last = True, now
            break
        if spinner.chunk:
            spinner.slice()
        else:
            time.sleep(0.0002)  # a host with nothing else to do
    host_cpu = time.process_time() - cpu0 - spinner.busy_cpu
    worker_cpu = worker_cpu_seconds(tier.pids) - wcpu0 if tier.pids else None
    if pending:
        tier.drain()  # the rest finishes untimed, the host asleep in drain_jobs()
        list(tier.poll())
    spinner.measure_idle(tier.poll, drive.idle_seconds)
    wall = (last - t0) / 1e9
    nbytes = blocks * drive.block_bytes
    return Phase(
        gbps=nbytes / GB / wall if wall > 0 else 0.0,
        bytes=nbytes,
        blocks=blocks,
        wall_s=wall,
        jobs=len(submit_ns),
        failed_jobs=failed,
        time_limited=limited,
        cut_short=cut,
        busy_idle=spinner.busy_idle(),
        idle_loop_rate=spinner.rate("idle"),
        submit_us=Dist.of(submit_ns, 1e-3),
        job_ms=Dist.of(latency_ns, 1e-6),
        host_cpu_s=host_cpu,
        worker_cpu_s=worker_cpu,
    )


def per_block_us(cpu_s: float | None, blocks: int) -> float | None:
    return cpu_s / blocks * 1e6 if cpu_s is not None and blocks else None


def limit_note(phase: Phase) -> str:
    return " (cut off with jobs in flight)" if phase.cut_short else f" ({phase.blocks} blocks by the time limit)" if phase.time_limited else ""


def remove_blocks(paths: Iterable[str]) -> None:
    """Unlink a run's block files and the directories that held only them.

    Every run then starts from the same directory tree: a new leaf directory
    costs a store ~0.25 ms here, so runs that inherit another's directories
    would look faster than they are.
    """
    dirs = set()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        dirs.add(os.path.dirname(path))
    for leaf in dirs:
        for d in (leaf, os.path.dirname(leaf)):
            try:
                os.rmdir(d)  # only if empty: staged blocks and other runs' files stay
            except OSError:
                pass
