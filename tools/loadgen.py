#!/usr/bin/env python3
"""Load generator for mp_tier: throughput, latency and what the tier costs its host.

mp_tier moves KV blocks in worker processes so that the scheduler's process
keeps its GIL. This tool drives a tier the way a scheduler would (submit jobs,
poll ``get_finished()``, do its own pure-Python work for a short slice, repeat)
and measures what the tier delivers and what it costs the host, optionally
side by side with the same workload on the thread engine (``--compare
threads``: the vLLM-style baseline) and with plain ``os.pwrite``/``os.preadv``
loops over the same kind of files with no tier (``--compare raw``: the disk's
reachable ceiling).

    python tools/loadgen.py                      # the default run, about a minute
    python tools/loadgen.py --workload store,load --sweep block_size=256k,2m --compare threads,raw
    python tools/loadgen.py --sweep workers=1,2,4 --plot workers.png --json workers.json

Workloads
    store   fresh keys, ``--inflight`` jobs of ``--blocks-per-job`` blocks kept in flight.
    load    promotions of keys stored beforehand: ``cold`` (page cache dropped
            first) then ``warm`` (the same loads again).
    mixed   ``flood``: a store flood plus a trickle of loads (one at a time,
            ``--load-gap-ms`` after the previous one finished); ``idle-loads``:
            the same loads with no flood, the baseline for their latency.
    trace   multi-turn chats: Zipf-popular conversations come back with a longer
            prefix; each request looks up its prompt's keys, loads the leading
            hits and stores the misses.

Units: GB = 1e9 bytes; sizes given on the command line (256k, 2m, 1g) are binary.

JSON schema "mp_tier.loadgen/1" (``--json FILE``), an object with:
    schema    "mp_tier.loadgen/1"; a change that removes or renames a key bumps it.
    args      every option as parsed (sizes in bytes, workers as [read, write]).
    platform  python, cpus, kernel, and fs: the file system type under the root.
    runs      one RunRecord per run (fields below).
    ratios    one Ratio per (case, workload, phase) and compared engine:
              processes divided by threads or by raw.
A RunRecord holds: workload, phase, engine ("processes" | "threads" | "raw" |
"checksum": the process engine with ``checksum = true``),
sweep (the swept value as given, or null), block_bytes, blocks_per_job,
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
import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import json
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mp_tier import FileSystemTierManager, JobMetadata, JobResult, PrimaryCache, TierConfig  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # the bench extra is optional; the run just has no progress bar
    tqdm = None

SCHEMA = "mp_tier.loadgen/1"
WORKLOADS = ("store", "load", "mixed", "trace")
COMPARES = ("threads", "raw", "checksum")
SWEEP_KEYS = ("workers", "block_size", "blocks_per_job", "inflight")
GB = 1e9
MIXED_LOAD_POOL = 8  # staged load jobs the mixed trickle cycles through
MARKER = ".mp_tier_loadgen"  # marks a directory this tool created under --root
GROUP0 = (0).to_bytes(4, "big")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


# -- parsing -------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'256k', '2m', '1.5g', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(?:i?b)?", text.strip().lower())
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (expected e.g. 256k, 2m, 1g)")
    return int(float(m[1]) * _UNITS[m[2]])


def size_label(n: int) -> str:
    """The shortest exact binary label of ``n`` bytes: 262144 -> '256k'."""
    for unit in "tgmk":
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_workers(text: str) -> tuple[int, int]:
    """'2' -> 2 read-priority + 2 write-priority workers; '3+1' -> 3 + 1."""
    parts = text.split("+")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"not a worker count: {text!r} (expected N or R+W, e.g. 2 or 3+1)")
    read = int(parts[0])
    return read, int(parts[-1])


def parse_positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"] and "store" in choices:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return parse


SWEEP_PARSERS: dict[str, Callable[[str], Any]] = {
    "workers": parse_workers,
    "block_size": parse_size,
    "blocks_per_job": parse_positive,
    "inflight": parse_positive,
}


def parse_sweep(text: str) -> tuple[str, list[tuple[str, Any]]]:
    """'workers=1,2,4' -> ('workers', [('1', (1, 1)), ...]): each label with its value."""
    key, _, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if key not in SWEEP_PARSERS or not values.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    labels = [v.strip() for v in values.split(",") if v.strip()]
    return key, [(label, SWEEP_PARSERS[key](label)) for label in labels]


# -- result records ------------------------------------------------------------


@dataclass
class Dist:
    """A sample's size, median, 99th percentile, maximum and mean, in the unit its field name says."""

    n: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> "Dist | None":
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
    """Every figure of one run: one phase of one workload on one engine (see the module docstring)."""

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


# -- the scheduler stand-in ----------------------------------------------------


def spin(n: int) -> int:
    """Pure-Python work that holds the GIL for every bytecode: the scheduler's own work."""
    x = 0
    for i in range(n):
        x ^= i
    return x


def calibrate_spin(slice_us: int) -> int:
    """Iterations of ``spin`` that take about ``slice_us`` on an idle host (best of 5)."""
    if slice_us <= 0:
        return 0
    n = 20_000
    best = min(_timed(spin, n) for _ in range(5))
    return max(1, round(n * slice_us * 1e-6 / best))


def _timed(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


class Spinner:
    """Runs equal slices of ``spin`` between polls and keeps their speed, idle and busy apart.

    The ratio busy/idle is the share of its speed a scheduler keeps while the
    tier works: the GIL (thread engine) or the CPU cores (any engine) it loses.
    """

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.totals = {"idle": [0, 0.0], "busy": [0, 0.0]}  # iterations, seconds
        self.busy_cpu = 0.0  # this thread's CPU seconds in busy slices, to take out of the host's CPU
        self.mode = "busy"

    def slice(self) -> None:
        c0, t0 = time.thread_time(), time.perf_counter()
        spin(self.chunk)
        t1, c1 = time.perf_counter(), time.thread_time()
        totals = self.totals[self.mode]
        totals[0] += self.chunk
        totals[1] += t1 - t0
        if self.mode == "busy":
            self.busy_cpu += c1 - c0

    def measure_idle(self, poll: Callable[[], Any], seconds: float) -> None:
        """The same poll-and-spin loop with no work submitted."""
        if not self.chunk:
            return
        self.mode = "idle"
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            poll()
            self.slice()
        self.mode = "busy"

    def rate(self, mode: str) -> float | None:
        iterations, seconds = self.totals[mode]
        return iterations / seconds if seconds else None

    def busy_idle(self) -> float | None:
        busy, idle = self.rate("busy"), self.rate("idle")
        return busy / idle if busy and idle else None


class NoBar:
    """Stands in for tqdm when progress is off or tqdm is missing."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_bar(enabled: bool, desc: str, total: int) -> Any:
    """A byte progress bar on stderr that shows up only after a second."""
    if not enabled or tqdm is None:
        return NoBar()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, delay=1.0, leave=False, file=sys.stderr)


class Host:
    """Submits jobs to the tier, polls it and spins between polls; records every cost it sees."""

    def __init__(self, tier: FileSystemTierManager, spinner: Spinner, bar: Any):
        self.tier = tier
        self.spinner = spinner
        self.bar = bar
        self._ids = itertools.count(1)
        self.pending: dict[int, tuple[str, int, int]] = {}  # job id -> kind, blocks, submit time (ns)
        self.submit_ns: dict[str, list[int]] = {"store": [], "load": []}
        self.latency_ns: dict[str, list[int]] = {"store": [], "load": []}
        self.blocks: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.errors: list[str] = []
        self.poll_ns: list[int] = []

    def submit(self, kind: str, keys: list[bytes], block_ids: list[int]) -> int:
        """Submit one job; only the submit_* call itself is timed."""
        job = JobMetadata(job_id=next(self._ids), keys=keys, block_ids=block_ids, is_promotion=kind == "load")
        call = self.tier.submit_load if kind == "load" else self.tier.submit_store
        t0 = time.perf_counter_ns()
        call(job)
        self.submit_ns[kind].append(time.perf_counter_ns() - t0)
        self.pending[job.job_id] = (kind, len(keys), t0)
        return job.job_id

    def step(self) -> list[JobResult]:
        """One scheduler iteration: poll the tier, then do a slice of the host's own work."""
        t0 = time.perf_counter_ns()
        results = self.tier.get_finished()
        now = time.perf_counter_ns()
        self.poll_ns.append(now - t0)
        for result in results:
            self._account(result, now)
        if self.spinner.chunk:
            self.spinner.slice()
        elif self.pending and not results:
            self.tier.wait(0.05)
        return results

    def _account(self, result: JobResult, now: int) -> None:
        kind, blocks, submitted = self.pending.pop(result.job_id)
        self.latency_ns[kind].append(now - submitted)
        self.blocks[kind] += blocks
        self.bytes[kind] += result.transfer_size
        self.bar.update(result.transfer_size)
        if not result.success:
            self.failed[kind] += 1
            if result.error and len(self.errors) < 5 and result.error not in self.errors:
                self.errors.append(result.error)

    def op_stats(self, kind: str) -> OpStats | None:
        if not self.submit_ns[kind]:
            return None
        return OpStats(
            jobs=len(self.latency_ns[kind]),
            blocks=self.blocks[kind],
            bytes=self.bytes[kind],
            failed_jobs=self.failed[kind],
            job_ms=Dist.of(self.latency_ns[kind], 1e-6),
            submit_us=Dist.of(self.submit_ns[kind], 1e-3),
        )


class Window:
    """The jobs in flight, each moving blocks of its own slot of the primary cache.

    A slot is ``slot_blocks`` consecutive cache blocks, so two loads in flight
    never write the same block. Slots are handed out per lane ("store",
    "load", "request") up to that lane's limit; a slot frees when its last job ends.
    """

    def __init__(self, host: Host, slot_blocks: int, lanes: dict[str, int]):
        self.host = host
        self.slot_blocks = slot_blocks
        self._room = dict(lanes)
        self._free = list(range(sum(lanes.values())))
        self._lane_of_slot: dict[int, str] = {}
        self._jobs_in_slot: Counter[int] = Counter()
        self._slot_of_job: dict[int, int] = {}

    def has_room(self, lane: str) -> bool:
        return self._room[lane] > 0

    def open(self, lane: str) -> int:
        self._room[lane] -= 1
        slot = self._free.pop()
        self._lane_of_slot[slot] = lane
        return slot

    def release(self, slot: int) -> None:
        self._room[self._lane_of_slot.pop(slot)] += 1
        self._free.append(slot)

    def submit(self, slot: int, kind: str, keys: list[bytes], positions: Sequence[int] | None = None) -> int:
        base = slot * self.slot_blocks
        ids = [base + p for p in (positions if positions is not None else range(len(keys)))]
        job_id = self.host.submit(kind, keys, ids)
        self._slot_of_job[job_id] = slot
        self._jobs_in_slot[slot] += 1
        return job_id

    def step(self) -> list[JobResult]:
        results = self.host.step()
        for result in results:
            slot = self._slot_of_job.pop(result.job_id)
            self._jobs_in_slot[slot] -= 1
            if not self._jobs_in_slot[slot]:
                del self._jobs_in_slot[slot]
                self.release(slot)
        return results

    def drain(self, timeout: float = 600.0) -> None:
        end = time.monotonic() + timeout
        while self._slot_of_job:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self._slot_of_job)} jobs still in flight after {timeout:.0f} s")
            self.step()


# -- keys and the page cache ---------------------------------------------------


class Keys:
    """36-byte keys (32-byte hash + group 0) that no earlier run can have written."""

    def __init__(self) -> None:
        self._nonce = os.urandom(16)
        self._count = itertools.count()

    def named(self, name: str) -> bytes:
        return hashlib.blake2b(name.encode(), key=self._nonce, digest_size=32).digest() + GROUP0

    def fresh(self, n: int) -> list[bytes]:
        return [self.named(f"k{next(self._count)}") for _ in range(n)]


def _libc_mincore() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    return libc


_libc = _libc_mincore()
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of the file), by mincore(2).

    This is how a cold load is checked to be cold, not assumed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pages = -(-size // mmap.PAGESIZE)
        if not size:
            return 0, 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed", path)
        try:
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", path)
            return int((np.frombuffer(vec.raw, np.uint8) & 1).sum()), pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_share(paths: Sequence[str], sample: int = 256) -> float:
    """Share of the pages of (an even sample of) ``paths`` that are in the page cache."""
    step = max(1, len(paths) // sample)
    counts = [resident_pages(p) for p in paths[::step]]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def fadvise_out(paths: Sequence[str]) -> None:
    """Ask the kernel to drop these files' clean pages (no root needed); flush dirty ones first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache(paths: Sequence[str]) -> str:
    """Make the next reads of ``paths`` cold; return how, and whether it worked.

    posix_fadvise per file comes first: it needs no root and touches only these
    files. If pages stay resident, root's drop_caches (the whole machine's
    cache) is the fallback; if that is not possible either, the result says so.
    """
    fadvise_out(paths)
    left = resident_share(paths)
    if left == 0:
        return "fadvise DONTNEED: 0% of pages resident"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"NOT COLD: {left:.0%} of pages still resident after fadvise; drop_caches: {e.strerror}"
    left = resident_share(paths)
    if left == 0:
        return "fadvise + drop_caches: 0% of pages resident"
    return f"NOT COLD: {left:.0%} of pages still resident after fadvise and drop_caches"


# -- cases and tier runs -------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What one case runs with; ``--sweep`` replaces one field per case."""

    block_size: int
    blocks_per_job: int
    workers: tuple[int, int]
    inflight: int


@dataclass
class Case:
    """One point of the sweep: its settings, its directory, and what its first tier told."""

    settings: Settings
    args: argparse.Namespace
    root: str
    sweep: str | None
    spin_chunk: int
    path_of: Callable[[bytes], str] | None = None  # the tier's key -> file mapping, for the raw runs
    direct: bool | None = None

    @property
    def job_bytes(self) -> int:
        return self.settings.block_size * self.settings.blocks_per_job

    @property
    def n_jobs(self) -> int:
        return max(1, math.ceil(self.args.total / self.job_bytes))

    @property
    def tier_engines(self) -> list[str]:
        return ["processes"] + [e for e in ("threads", "checksum") if e in self.args.compare]

    def deadline(self) -> float:
        return time.perf_counter() + self.args.seconds if self.args.seconds else math.inf

    def paths(self, jobs: Sequence[list[bytes]]) -> list[str]:
        assert self.path_of is not None
        return [self.path_of(k) for keys in jobs for k in keys]


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
            config=TierConfig(o_direct=case.args.o_direct, checksum=engine == "checksum"),
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


def worker_cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


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


# -- workloads -----------------------------------------------------------------


def schedule(case: Case, with_raw: bool) -> list[tuple[int, str]]:
    """(round, engine) pairs; every other round runs the engines in reverse order.

    The disk's speed drifts by several times over seconds on a shared VM;
    alternating the order spreads that drift over every engine alike.
    """
    engines = case.tier_engines + (["raw"] if with_raw and "raw" in case.args.compare else [])
    return [(r, e) for r in range(case.args.repeat) for e in (engines if r % 2 == 0 else engines[::-1])]


def workload_store(case: Case) -> list[RunRecord]:
    bpj, inflight = case.settings.blocks_per_job, case.settings.inflight
    records = []
    for rnd, engine in schedule(case, with_raw=True):
        keys = Keys()
        jobs = [keys.fresh(bpj) for _ in range(case.n_jobs)]
        if engine == "raw":
            record = raw_run(case, "store", "fresh", case.paths(jobs))
        else:
            body = lambda win, jobs=jobs: run_jobs(win, "store", jobs, case.deadline())  # noqa: E731
            record = tier_run(case, engine, "store", "fresh", {"store": inflight}, bpj, case.n_jobs * case.job_bytes, body)
        record.round = rnd
        records.append(record)
    return records


def workload_load(case: Case) -> list[RunRecord]:
    """Cold (page cache dropped and checked) then warm, per engine, over the same staged files."""
    bpj, inflight = case.settings.blocks_per_job, case.settings.inflight
    staged = stage(case, case.n_jobs)
    paths = case.paths(staged)
    body = lambda win: run_jobs(win, "load", staged, case.deadline())  # noqa: E731
    records = []
    for rnd, engine in schedule(case, with_raw=True):
        for phase in ("cold", "warm"):
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
    bpj, inflight = case.settings.blocks_per_job, case.settings.inflight
    pool = stage(case, MIXED_LOAD_POOL)
    gap = case.args.load_gap_ms / 1e3
    make_cold = lambda keys: None if case.direct else fadvise_out(case.paths([keys]))  # noqa: E731
    records = []
    for rnd, engine in schedule(case, with_raw=False):
        stores = [Keys().fresh(bpj) for _ in range(case.n_jobs)]
        flood = tier_run(
            case, engine, "mixed", "flood", {"store": inflight, "load": 1}, bpj, case.n_jobs * case.job_bytes,
            lambda win, stores=stores: mixed_flood(win, stores, pool, gap, case.deadline(), make_cold),
        )
        n_loads = flood.load.jobs if flood.load else 0
        alone = tier_run(
            case, engine, "mixed", "idle-loads", {"load": 1}, bpj, n_loads * case.job_bytes,
            lambda win: load_trickle(win, pool, n_loads, gap, make_cold),
        )
        flood.idle_load_ms = alone.load.job_ms if alone.load else None
        flood.round = alone.round = rnd
        records += [flood, alone]
    return records


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


class ChatTrace:
    """Multi-turn chats: a request continues a Zipf-popular conversation with one more turn.

    A turn adds ``turn_blocks`` blocks to the conversation's prompt; after
    ``max_turns`` turns it starts over as a new conversation (new keys), so
    prompts stay within a cache slot. The same seed gives every engine the
    same request sequence.
    """

    def __init__(self, conversations: int, zipf: float, turn_blocks: int, max_turns: int, seed: int):
        self.conversations = conversations
        self.zipf = zipf
        weights = np.arange(1, conversations + 1, dtype=float) ** -zipf
        self._p = weights / weights.sum()
        self._rng = np.random.default_rng(seed)
        self._picks: Iterator[int] = iter(())
        self._keys = Keys()
        self._turn_blocks = turn_blocks
        self._max_turns = max_turns
        self._prompts: list[list[bytes]] = [[] for _ in range(conversations)]
        self._generation = [0] * conversations

    def next_prompt(self) -> list[bytes]:
        c = next(self._picks, None)
        if c is None:
            self._picks = iter(self._rng.choice(len(self._p), size=4096, p=self._p).tolist())
            c = next(self._picks)
        prompt = self._prompts[c]
        if len(prompt) == self._max_turns * self._turn_blocks:
            self._generation[c] += 1
            prompt.clear()
        start = len(prompt)
        prompt += [self._keys.named(f"c{c}.{self._generation[c]}.{i}") for i in range(start, start + self._turn_blocks)]
        return list(prompt)


def trace_requests(win: Window, trace: ChatTrace, budget: int, block_bytes: int, deadline: float) -> dict[str, Any]:
    """Serve requests until ``budget`` bytes were submitted: look up, load the leading hits, store the misses."""
    tier = win.host.tier
    lookup_ns: list[int] = []
    spent = requests = prompt_blocks = hit_blocks = inflight_blocks = 0
    while spent < budget and time.perf_counter() < deadline:
        if not win.has_room("request"):
            win.step()
            continue
        prompt = trace.next_prompt()
        t0 = time.perf_counter_ns()
        states = tier.lookup_many(prompt)
        lookup_ns.append(time.perf_counter_ns() - t0)
        hits = next((i for i, s in enumerate(states) if s is not True), len(states))
        missing = [i for i in range(hits, len(prompt)) if states[i] is False]
        slot = win.open("request")
        if hits:
            win.submit(slot, "load", prompt[:hits])
        if missing:
            win.submit(slot, "store", [prompt[i] for i in missing], missing)
        if not hits and not missing:
            win.release(slot)
        requests += 1
        prompt_blocks += len(prompt)
        hit_blocks += hits
        inflight_blocks += states.count(None)
        spent += (hits + len(missing)) * block_bytes
    win.drain()
    stats = TraceStats(
        conversations=trace.conversations,
        zipf=trace.zipf,
        requests=requests,
        prompt_blocks=prompt_blocks,
        hit_blocks=hit_blocks,
        inflight_blocks=inflight_blocks,
        hit_rate=hit_blocks / prompt_blocks if prompt_blocks else 0.0,
        lookup_many_us=Dist.of(lookup_ns, 1e-3),
    )
    return {"trace": stats}


def workload_trace(case: Case) -> list[RunRecord]:
    args = case.args
    slot_blocks = args.max_turns * args.turn_blocks
    records = []
    for rnd, engine in schedule(case, with_raw=False):
        trace = ChatTrace(args.conversations, args.zipf, args.turn_blocks, args.max_turns, args.seed)
        body = lambda win, trace=trace: trace_requests(win, trace, args.total, case.settings.block_size, case.deadline())  # noqa: E731
        record = tier_run(case, engine, "trace", "zipf", {"request": case.settings.inflight}, slot_blocks, args.total, body)
        record.round = rnd
        records.append(record)
    return records


WORKLOAD_RUNNERS: dict[str, Callable[[Case], list[RunRecord]]] = {
    "store": workload_store,
    "load": workload_load,
    "mixed": workload_mixed,
    "trace": workload_trace,
}


# -- raw: the same I/O with no tier --------------------------------------------


def raw_store(path: str, block: memoryview, direct_flag: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | direct_flag
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, flags, 0o600)
    try:
        done = 0
        while done < len(block):
            done += os.pwrite(fd, block[done:], done)
    finally:
        os.close(fd)


def raw_load(path: str, block: memoryview, direct_flag: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | direct_flag)
    try:
        done = 0
        while done < len(block):
            got = os.preadv(fd, [block[done:]], done)
            if not got:
                raise EOFError(f"{path} ended after {done} bytes")
            done += got
    finally:
        os.close(fd)


def raw_worker(op: str, paths: list[str], block_bytes: int, direct: bool, batch: int, conn: Any) -> None:
    """One raw process: open, pwrite or preadv the whole block, close, for each of its files.

    It reports ("ready"), waits for "go", reports ("blocks", n) every ``batch``
    files, and ends with ("done", CPU seconds of the loop) or ("error", message).
    """
    buffer = mmap.mmap(-1, block_bytes)  # page aligned, as O_DIRECT needs
    buffer.write(os.urandom(block_bytes))
    block = memoryview(buffer)
    move = raw_store if op == "store" else raw_load
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    conn.send(("ready", 0))
    conn.recv()
    t0 = os.times()
    try:
        for i, path in enumerate(paths, 1):
            move(path, block, flag)
            if i % batch == 0 or i == len(paths):
                conn.send(("blocks", (i - 1) % batch + 1))
    except (OSError, EOFError) as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    t1 = os.times()
    conn.send(("done", (t1.user - t0.user) + (t1.system - t0.system)))


def raw_run(case: Case, op: str, phase: str, paths: list[str]) -> RunRecord:
    """``paths`` split over as many processes as the tier has workers, the host spinning as with a tier."""
    os.sync()
    read, write = case.settings.workers
    n = read + write
    block = case.settings.block_size
    ctx = multiprocessing.get_context("forkserver")
    conns, procs = [], []
    try:
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=raw_worker, args=(op, paths[i::n], block, bool(case.direct), case.settings.blocks_per_job, child), daemon=True
            )
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        for conn in conns:
            conn.recv()  # ready: process start-up is not the disk's time
        return _raw_measure(case, op, phase, conns, len(paths))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _raw_measure(case: Case, op: str, phase: str, conns: list[Any], n_paths: int) -> RunRecord:
    block = case.settings.block_size
    spinner = Spinner(case.spin_chunk)
    running = set(conns)
    poll = lambda: multiprocessing.connection.wait(running, 0 if spinner.chunk else 0.05)  # noqa: E731
    spinner.measure_idle(poll, case.args.idle_seconds)
    bar = make_bar(case.args.progress, f"{op} {phase} {size_label(block)} raw", n_paths * block)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for conn in conns:
        conn.send("go")
    blocks, worker_cpu, errors = 0, 0.0, []
    while running:
        for conn in poll():
            kind, value = conn.recv()
            if kind == "blocks":
                blocks += value
                bar.update(value * block)
            else:
                running.discard(conn)
                worker_cpu += value if kind == "done" else 0.0
                errors += [value] if kind == "error" else []
        if spinner.chunk:
            spinner.slice()
    wall = time.perf_counter() - t0
    host_cpu = time.process_time() - cpu0 - spinner.busy_cpu
    bar.close()
    spinner.measure_idle(poll, case.args.idle_seconds)
    gb = blocks * block / GB
    read, write = case.settings.workers
    return RunRecord(
        workload="store" if op == "store" else "load",
        phase=phase,
        engine="raw",
        sweep=case.sweep,
        block_bytes=block,
        blocks_per_job=case.settings.blocks_per_job,
        read_workers=read,
        write_workers=write,
        inflight=case.settings.inflight,
        direct=bool(case.direct),
        wall_s=wall,
        bytes=blocks * block,
        blocks=blocks,
        gbps=gb / wall,
        blocks_per_s=blocks / wall,
        job_ms=None,
        submit_us=None,
        poll_us=None,
        host_cpu_s_per_gb=host_cpu / gb if gb else None,
        worker_cpu_s_per_gb=worker_cpu / gb if gb else None,
        busy_idle=spinner.busy_idle(),
        idle_loop_rate=spinner.rate("idle"),
        errors=errors,
    )


# -- the root directory --------------------------------------------------------


def _is_ours(path: str) -> bool:
    return os.path.basename(path).startswith("loadgen-") and os.path.isfile(os.path.join(path, MARKER))


def prepare_root(root: str | None) -> tuple[str, str | None]:
    """This invocation's own directory, and the directory to remove at the end if the tool created it.

    An existing ``--root`` may hold only directories an earlier run of this
    tool left (``--keep``): anything else is someone's data and is refused.
    """
    if root is None:
        run_dir = tempfile.mkdtemp(prefix="loadgen-")
        Path(run_dir, MARKER).touch()
        return run_dir, run_dir
    root = os.path.abspath(root)
    created = None
    if os.path.lexists(root):
        if not os.path.isdir(root):
            raise UsageError(f"--root {root} is not a directory")
        foreign = sorted(e for e in os.listdir(root) if not _is_ours(os.path.join(root, e)))
        if foreign:
            raise UsageError(
                f"refusing --root {root}: it holds {foreign[0]!r}, which loadgen did not create (give a new or empty directory)"
            )
    else:
        os.makedirs(root)
        created = root
    run_dir = tempfile.mkdtemp(prefix="loadgen-", dir=root)
    Path(run_dir, MARKER).touch()
    return run_dir, created


def cleanup(run_dir: str, created: str | None, keep: bool) -> None:
    if keep:
        print(f"kept the files under {run_dir}", file=sys.stderr)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if created and created != run_dir:
        with contextlib.suppress(OSError):
            os.rmdir(created)  # only if nothing else appeared in it meanwhile


def fs_type(path: str) -> str:
    """The type of the file system that holds ``path`` (longest mount point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount, fstype = fields[4], fields[fields.index("-") + 1]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind


# -- output --------------------------------------------------------------------


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _dist(d: Dist | None, digits: int = 0) -> str:
    return "-" if d is None else f"{d.p50:.{digits}f}/{d.p99:.{digits}f}/{d.max:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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


def _median_range(values: list[float | None], digits: int = 2) -> str:
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
        line = f"  processes/{versus:<7} {workload} {phase:<10} GB/s {_median_range([q.gbps for q in qs])}"
        line += f"  busy/idle {_median_range([q.busy_idle for q in qs])}"
        if versus != "raw":
            line += f"  job p99 {_median_range([q.job_p99 for q in qs])}  host CPU/GB {_median_range([q.host_cpu_per_gb for q in qs])}"
        print(line)


def print_mixed(records: list[RunRecord]) -> None:
    for r in records:
        if r.workload != "mixed" or r.phase != "flood":
            continue
        flood, alone = r.load.job_ms if r.load else None, r.idle_load_ms
        ratio = _ratio(flood.p99 if flood else None, alone.p99 if alone else None)
        print(
            f"  mixed {r.engine}: {flood.n if flood else 0} loads, p50/p99 {_num(flood and flood.p50, 1)}/{_num(flood and flood.p99, 1)} ms "
            f"under the store flood vs {_num(alone and alone.p50, 1)}/{_num(alone and alone.p99, 1)} ms alone: p99 x{_num(ratio)}"
        )


def print_trace(records: list[RunRecord]) -> None:
    for r in records:
        if r.trace:
            t = r.trace
            print(
                f"  trace {r.engine}: {t.requests} requests over {t.conversations} conversations (zipf {t.zipf:.2f}), "
                f"block hit rate {t.hit_rate:.1%} ({t.hit_blocks}/{t.prompt_blocks}, {t.inflight_blocks} in flight), "
                f"lookup_many us p50/p99 {_num(t.lookup_many_us and t.lookup_many_us.p50, 1)}/{_num(t.lookup_many_us and t.lookup_many_us.p99, 1)}"
            )


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
                    gbps=_ratio(p.gbps, o.gbps),
                    busy_idle=_ratio(p.busy_idle, o.busy_idle),
                    job_p99=_ratio(p.job_ms and p.job_ms.p99, o.job_ms and o.job_ms.p99),
                    host_cpu_per_gb=_ratio(p.host_cpu_s_per_gb, o.host_cpu_s_per_gb),
                )
            )
    return ratios


def jsonable(args: argparse.Namespace) -> dict[str, Any]:
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


def load_pyplot() -> Any:
    """matplotlib's pyplot without a display, or a UsageError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    return plt


def plot(path: str, key: str, labels: list[str], runs: list[RunRecord]) -> None:
    """Throughput and host busy/idle against the swept value, one line per workload phase and engine."""
    plt = load_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = dict.fromkeys((r.workload, r.phase, r.engine) for r in runs)
    x = range(len(labels))
    for workload, phase, engine in series:
        by_label = {r.sweep: r for r in runs if (r.workload, r.phase, r.engine) == (workload, phase, engine)}
        points = [by_label.get(label) for label in labels]
        name = f"{workload} {phase} ({engine})"
        style = {"processes": "-o", "threads": "--s", "raw": ":^", "checksum": "-.d"}[engine]
        left.plot(x, [r.gbps if r else np.nan for r in points], style, label=name)
        right.plot(x, [r.busy_idle if r and r.busy_idle else np.nan for r in points], style, label=name)
    for ax, title in ((left, "throughput (GB/s)"), (right, "host busy-loop speed, busy / idle")):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("workers (N read + N write, or R+W)" if key == "workers" else key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_ylim(0, 1.1)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loadgen.py",
        description="Drive an mp_tier tier like a scheduler and measure throughput, latency and host interference.",
        epilog="Sizes are binary: 256k, 2m, 1g. GB/s figures use GB = 1e9 bytes. The module docstring documents the --json schema.",
    )
    p.add_argument("--workload", type=parse_list(WORKLOADS), default=list(WORKLOADS), help="comma list of store, load, mixed, trace, or all (default: all)")
    p.add_argument("--block-size", type=parse_size, default=2 << 20, help="bytes per block (default 2m)")
    p.add_argument("--blocks-per-job", type=parse_positive, default=16, help="blocks per job, except in trace (default 16)")
    p.add_argument("--workers", type=parse_workers, default=(2, 2), help="N (N read + N write workers) or R+W (default 2)")
    p.add_argument("--inflight", type=parse_positive, default=4, help="jobs (trace: requests) kept in flight (default 4)")
    p.add_argument("--total", type=parse_size, default=1 << 30, help="bytes each phase moves (default 1g)")
    p.add_argument("--seconds", type=float, default=None, help="also stop submitting after this many seconds per phase")
    p.add_argument("--compare", type=parse_list(COMPARES), default=[], help="also run: threads (same workload on the thread engine), raw (pwrite/preadv, no tier), checksum (processes with CRC32 checksums)")
    p.add_argument("--o-direct", choices=("auto", "on", "off"), default="auto", help="the tier's o_direct setting; raw follows the tier (default auto)")
    p.add_argument("--spin-us", type=int, default=1000, help="host busy-loop slice between polls, microseconds; 0 = block in wait() (default 1000)")
    p.add_argument("--repeat", type=parse_positive, default=1, help="run every engine this many times, interleaved (default 1)")
    p.add_argument("--idle-seconds", type=float, default=0.3, help="busy-loop idle speed is measured this long before and after each run (default 0.3)")
    p.add_argument("--load-gap-ms", type=float, default=10.0, help="mixed: pause between one load's end and the next (default 10)")
    p.add_argument("--conversations", type=parse_positive, default=32, help="trace: conversations (default 32)")
    p.add_argument("--zipf", type=float, default=1.1, help="trace: Zipf exponent of conversation popularity (default 1.1)")
    p.add_argument("--turn-blocks", type=parse_positive, default=4, help="trace: blocks a turn adds to its conversation (default 4)")
    p.add_argument("--max-turns", type=parse_positive, default=8, help="trace: turns before a conversation starts over (default 8)")
    p.add_argument("--seed", type=int, default=0, help="trace: request sequence seed (default 0)")
    p.add_argument("--sweep", type=parse_sweep, default=None, help=f"KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    p.add_argument("--plot", metavar="PNG", help="with --sweep: draw GB/s and busy/idle against the swept value (needs the plot extra)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON (schema in the module docstring)")
    p.add_argument("--root", help="directory to work in: new, empty, or holding only earlier loadgen runs (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the block files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars on stderr")
    return p


def cases_of(args: argparse.Namespace, run_dir: str, spin_chunk: int) -> Iterator[Case]:
    base = Settings(args.block_size, args.blocks_per_job, args.workers, args.inflight)
    points = [(None, base)]
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
    spin_chunk = calibrate_spin(args.spin_us)
    print(
        f"mp_tier loadgen: {', '.join(args.workload)} under {os.path.dirname(run_dir)} ({fs_type(run_dir)}), "
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(run_dir, created, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
