#!/usr/bin/env python3
"""Soak test for mp_tier: a store flood and a trickle of verified loads while workers are SIGKILLed.

A tier that survives one killed worker in a unit test can still leak a file
descriptor, a segment, a process or memory per death, or hand back a torn
block once in ten thousand loads. This tool runs the tier for as long as you
ask under a steady flood of stores, a trickle of loads and a SIGKILL of a
random worker every few seconds, then checks what the run left behind.

    python tools/soak.py --seconds 600
    python tools/soak.py --seconds 600 --stall-every 2 --kill-helpers   # also stalls (SIGSTOP) and helper kills
    python tools/soak.py --seconds 60 --kill-every 1 --block-size 2m --read-workers 4 --write-workers 4
    python tools/soak.py --seconds 600 --sigchld ignore --starve-every 20   # a host that reaps, and fd shortages

With ``--stall-every`` a random worker is stopped for ``--stall`` seconds;
one that holds a task past the tier's ``task_timeout`` is killed by the tier
and its task sent again. ``--kill-helpers`` also kills every other child of
the host (its segment janitor) with each worker kill.

``--sigchld ignore`` makes the host set SIGCHLD to SIG_IGN (the kernel reaps
every child at once), ``--sigchld reap`` installs a handler that waits for
every child: the tier must reap nothing itself. ``--starve-every`` opens a
window of ``--starve`` seconds in which the host has no free fd (its soft
RLIMIT_NOFILE drops below every fd number it does not already use) and kills
a worker at its start: the replacement cannot be spawned until the window
closes, and the workers left serve meanwhile.

Every block's bytes are a function of its key, so every loaded block is
verified in full. The disk is bounded by the tier's own LRU budget
(``--max-disk``); evicted keys, learnt from the tier's events, are not loaded.

It prints a progress line on stderr every ``--progress-every`` seconds and a
summary on stdout, one line per invariant ending in "ok" or "FAIL", then
PASS or FAIL. The exit status is 0 when every invariant holds, else 1:

    results     every submitted job got exactly one result
    failures    a job failed only because a worker died or stalled twice
    torn reads  every loaded block holds its key's bytes
    restarts    every killed worker was replaced, and every one the tier killed
    temp files  none left once the tier is drained
    open fds, /dev/shm, processes
                the same after shutdown as before the tier started; measured
                after a warm-up tier, so the janitor (which lives as long as
                the host) is in both counts
    host RSS    anonymous memory grew by at most ``--max-rss-growth``
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mp_tier import (
    FileSystemTierManager,
    JobMetadata,
    JobResult,
    PrimaryCache,
    TierBroken,
    TierConfig,
)
from mp_tier.bench.units import parse_size
from mp_tier.shared_cache import SEGMENT_PREFIX

MIB = 1 << 20
# A worker this old is surely past its start; killing younger ones could break
# the tier on purpose (it gives up after three deaths in a row while starting).
MIN_VICTIM_AGE = 1.0
SETTLE_SECONDS = 30  # for the final drain, and for the last deaths to be noticed
RECENT_KEYS = 1024  # loads pick among the most recently stored keys
_WORD = np.uint64(0x9E3779B97F4A7C15)  # odd, so word i of a block differs for every i


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) above zero."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soak.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seconds", type=positive(float), default=600.0, help="how long the workload runs")
    parser.add_argument("--kill-every", type=positive(float), default=3.0, help="seconds between worker SIGKILLs")
    parser.add_argument(
        "--stall-every", type=float, default=0.0, help="seconds between SIGSTOPs of a worker (SIGCONT after --stall); 0 = none"
    )
    parser.add_argument("--stall", type=positive(float), default=1.0, help="how long a stalled worker stays stopped")
    parser.add_argument("--task-timeout", type=positive(float), default=0.5, help="the tier's task_timeout, for stalls")
    parser.add_argument(
        "--kill-helpers", action="store_true", help="also SIGKILL the host's other children (the segment janitor) with each kill"
    )
    parser.add_argument(
        "--sigchld", choices=["default", "ignore", "reap"], default="default", help="the host's SIGCHLD: SIG_IGN, or a reaping handler"
    )
    parser.add_argument("--starve-every", type=float, default=0.0, help="seconds between windows without free fds; 0 = none")
    parser.add_argument("--starve", type=positive(float), default=3.0, help="how long a window without free fds lasts")
    parser.add_argument("--block-size", type=parse_size, default="256k", help="bytes per block")
    parser.add_argument("--num-blocks", type=positive(int), default=256, help="blocks in the primary cache")
    parser.add_argument("--blocks-per-job", type=positive(int), default=4, help="blocks per store or load job")
    parser.add_argument("--load-gap", type=float, default=0.02, help="seconds from a load's result to the next load")
    parser.add_argument("--read-workers", type=positive(int), default=2, help="workers that take loads first")
    parser.add_argument("--write-workers", type=positive(int), default=2, help="workers that take stores first")
    parser.add_argument("--max-disk", type=parse_size, default="1g", help="the tier's byte budget (LRU)")
    parser.add_argument("--root-dir", default=tempfile.gettempdir(), help="parent of the run's own directory")
    parser.add_argument("--max-rss-growth", type=parse_size, default="64m", help="host RSS growth allowed")
    parser.add_argument("--progress-every", type=positive(float), default=10.0, help="seconds between progress lines")
    parser.add_argument("--seed", type=int, default=0, help="seed for the choice of victims and loads")
    args = parser.parse_args(argv)
    if args.block_size % 8:
        parser.error("--block-size must be a multiple of 8")
    if args.num_blocks < 4 * args.blocks_per_job:
        parser.error("--num-blocks must be at least 4 x --blocks-per-job (3/4 for stores, 1/4 for loads)")
    if args.load_gap < 0:
        parser.error("--load-gap must be >= 0")
    if args.stall_every < 0:
        parser.error("--stall-every must be >= 0")
    if args.starve_every < 0:
        parser.error("--starve-every must be >= 0")
    if args.max_disk < 2 * args.num_blocks * args.block_size:
        parser.error("--max-disk must hold at least twice the cache, or stores would find nothing to evict")
    return args


# -- what a block holds ----------------------------------------------------------


def make_key(n: int) -> bytes:
    """Key number ``n``: a 32-byte hash and a 4-byte group.

    The hash's first two bytes are zero, so keys share one top directory and
    16 x 4 leaf directories of the layout: fresh keys would otherwise make a
    directory per block, and removing a million of them takes longer than the soak.
    """
    digest = hashlib.blake2b(n.to_bytes(8, "big"), digest_size=32).digest()
    return bytes(2) + digest[2:] + (n % 4).to_bytes(4, "big")


class Pattern:
    """Word i of key k's block is seed(k) + i * _WORD: a torn, shifted or stale block cannot match."""

    def __init__(self, block_bytes: int):
        self._ramp = np.arange(block_bytes // 8, dtype=np.uint64) * _WORD

    @staticmethod
    def _seed(key: bytes) -> np.uint64:
        return np.uint64(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))

    def fill(self, block: np.ndarray, key: bytes) -> None:
        np.add(self._ramp, self._seed(key), out=block.view(np.uint64))

    def holds(self, block: np.ndarray, key: bytes) -> bool:
        return bool(np.array_equal(block.view(np.uint64), self._ramp + self._seed(key)))


# -- what the host holds -----------------------------------------------------------


def descendants(root: int) -> set[int]:
    """Every process below ``root``: the workers and the janitor, and anything they started."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children[ppid].append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def rss_anon(pid: int | str = "self") -> int:
    """Anonymous resident bytes: RSS without the shared cache, whose pages would swamp any leak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass
class Snapshot:
    """What the host holds that a leak would grow."""

    fds: int
    segments: int
    processes: set[int]
    rss: int

    @classmethod
    def take(cls) -> Snapshot:
        mine = f"{SEGMENT_PREFIX}{os.getpid()}_"
        return cls(
            fds=len(os.listdir("/proc/self/fd")),
            segments=sum(name.startswith(mine) for name in os.listdir("/dev/shm")),
            processes=descendants(os.getpid()),
            rss=rss_anon(),
        )


def warm_up(args: argparse.Namespace, parent: str) -> None:
    """Run a tiny tier once, so the janitor (which lives as long as the host) exists before the first count."""
    root = tempfile.mkdtemp(prefix="mp_tier_soak_warmup_", dir=parent)
    try:
        with PrimaryCache.create(1, args.block_size) as cache:
            config = TierConfig(root_dir=root, n_read_workers=1, n_write_workers=1)
            with FileSystemTierManager(primary_kv_view=cache, config=config) as tier:
                tier.drain(SETTLE_SECONDS)
    finally:
        shutil.rmtree(root)


# -- what the host does to itself ---------------------------------------------------


def reap_every_child(signum: int, frame: object) -> None:
    """A SIGCHLD handler of the kind daemons install: it waits for every child, the tier's workers included."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def set_sigchld(mode: str) -> None:
    if mode == "ignore":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps every child as it exits
    elif mode == "reap":
        signal.signal(signal.SIGCHLD, reap_every_child)


class FdShortage:
    """Windows in which the host has no free fd.

    The host first takes every fd number up to a floor (as its own sockets
    would), so every fd the tier opens later lies above it. A window lowers
    the soft RLIMIT_NOFILE to the floor: no new fd can be made, not even in
    the number of one the tier has just closed.
    """

    def __init__(self, minimum: int):
        highest = max(map(int, os.listdir("/proc/self/fd")))
        self.held = [os.open(os.devnull, os.O_RDONLY)]
        while self.held[-1] <= max(highest, minimum):  # a new fd takes the lowest free number: holes fill first
            self.held.append(os.open(os.devnull, os.O_RDONLY))
        self.floor = self.held[-1] + 1
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.until = 0.0  # when the current window ends; 0 outside one

    def begin(self, now: float, seconds: float) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.floor, self.limits[1]))
        self.until = now + seconds

    def end(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)
        self.until = 0.0

    def close(self) -> None:
        for fd in self.held:
            os.close(fd)


# -- the workload ----------------------------------------------------------------


@dataclass
class Counts:
    """What the run saw, for the progress lines and the report."""

    submitted: int = 0
    results: int = 0
    duplicates: int = 0
    stored_blocks: int = 0
    stored_bytes: int = 0
    loaded_blocks: int = 0
    torn: int = 0
    died: int = 0
    timed_out: int = 0
    stalled: int = 0
    starved: int = 0
    helpers_killed: int = 0
    other_failures: list[str] = field(default_factory=list)
    worker_rss_max: int = 0
    broken: str | None = None


class Soak:
    """Keeps 3/4 of the cache in store jobs and one load job into the rest in flight; kills workers on a timer."""

    def __init__(self, tier: FileSystemTierManager, cache: PrimaryCache, args: argparse.Namespace, shortage: FdShortage | None):
        self.tier = tier
        self.shortage = shortage
        self.cache = cache
        self.args = args
        self.pattern = Pattern(cache.block_bytes)
        self.rng = random.Random(args.seed)
        split = cache.num_blocks * 3 // 4
        self.store_free = list(range(split))
        self.load_free = collections.deque(range(split, cache.num_blocks))  # rotated, so loads land all over
        self.jobs: dict[int, tuple[str, list[bytes], list[int]]] = {}
        self.loadable: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.next_key = 0
        self.next_job = 0
        self.counts = Counts()
        self.first_seen = dict.fromkeys(tier.worker_pids(), time.monotonic())
        self.next_load = 0.0
        self.killed: set[int] = set()
        self.stalled: dict[int, float] = {}  # stopped workers -> when to continue them

    def run_for(self, seconds: float) -> None:
        start = time.monotonic()
        end = start + seconds
        next_kill = start + self.args.kill_every
        next_stall = start + self.args.stall_every if self.args.stall_every else float("inf")
        next_starve = start + self.args.starve_every if self.shortage else float("inf")
        next_report = start + self.args.progress_every
        try:
            while (now := time.monotonic()) < end:
                self.submit_stores()
                self.submit_load(now)
                if self.shortage and self.shortage.until and now >= self.shortage.until:
                    self.shortage.end()
                if self.shortage and now >= next_starve:  # no fd for a while, and a worker to replace meanwhile
                    next_starve = now + self.args.starve_every
                    self.shortage.begin(now, self.args.starve)
                    self.counts.starved += 1
                    next_report = max(next_report, self.shortage.until)  # a progress line needs fds
                    self.kill_one(now)
                if now >= next_kill:
                    next_kill = now + self.args.kill_every
                    self.kill_one(now)
                if now >= next_stall:
                    next_stall = now + self.args.stall_every
                    self.stall_one(now)
                self.continue_stalled(now)
                if now >= next_report:
                    next_report = now + self.args.progress_every
                    self.report_progress(now - start)
                starved_until = (self.shortage.until or float("inf")) if self.shortage else float("inf")
                times = (next_kill, next_stall, next_starve, starved_until, next_report, end, max(self.next_load, now))
                self.tier.wait(min(*times, *self.stalled.values()) - now)
                self.collect()
        finally:
            if self.shortage and self.shortage.until:
                self.shortage.end()
        self.continue_stalled(float("inf"))
        self.sample_workers()

    def submit_stores(self) -> None:
        per_job = self.args.blocks_per_job
        while len(self.store_free) >= per_job:
            ids = [self.store_free.pop() for _ in range(per_job)]
            keys = [make_key(self.next_key + i) for i in range(per_job)]
            self.next_key += per_job
            for key, block in zip(keys, ids):
                self.pattern.fill(self.cache.array[block], key)
            self.submit("store", keys, ids)
        self.forget_evicted()  # stores evict as they are admitted: before picking keys to load

    def submit_load(self, now: float) -> None:
        """The trickle: one load job at a time, ``--load-gap`` after the last one finished."""
        per_job = self.args.blocks_per_job
        if now >= self.next_load and len(self.loadable) >= per_job:
            self.next_load = float("inf")  # until its result
            keys = self.rng.sample(list(self.loadable)[-RECENT_KEYS:], per_job)
            self.submit("load", keys, [self.load_free.popleft() for _ in range(per_job)])

    def submit(self, op: str, keys: list[bytes], ids: list[int]) -> None:
        job_id = self.next_job
        self.next_job += 1
        self.jobs[job_id] = (op, keys, ids)
        self.counts.submitted += 1
        job = JobMetadata(job_id=job_id, keys=keys, block_ids=ids)
        (self.tier.submit_store if op == "store" else self.tier.submit_load)(job)

    def forget_evicted(self) -> None:
        for event in self.tier.take_events():
            if event.kind == "removed":
                for key in event.keys:
                    self.loadable.pop(key, None)

    def collect(self) -> None:
        for result in self.tier.get_finished():
            self.counts.results += 1
            job = self.jobs.pop(result.job_id, None)
            if job is None:
                self.counts.duplicates += 1
                continue
            op, keys, ids = job
            done = keys if result.success else result.successful_keys
            self.check_failure(op, result)
            if op == "store":
                self.on_stored(done, result)
                self.store_free.extend(ids)
            else:
                self.verify(keys, ids, set(done))
                self.load_free.extend(ids)
                self.next_load = time.monotonic() + self.args.load_gap

    def check_failure(self, op: str, result: JobResult) -> None:
        if result.success:
            return
        if result.error_code == "EOWNERDEAD":
            self.counts.died += 1
        elif result.error_code == "ETIMEDOUT":
            self.counts.timed_out += 1
        else:
            self.counts.other_failures.append(f"{op} job {result.job_id}: {result.error}")

    def on_stored(self, keys: Sequence[bytes], result: JobResult) -> None:
        self.counts.stored_blocks += len(keys)
        self.counts.stored_bytes += result.transfer_size
        self.loadable.update(dict.fromkeys(keys))

    def verify(self, keys: list[bytes], ids: list[int], loaded: set[bytes]) -> None:
        for key, block in zip(keys, ids):
            if key in loaded:
                self.counts.loaded_blocks += 1
                self.counts.torn += not self.pattern.holds(self.cache.array[block], key)

    def kill_one(self, now: float) -> None:
        pids = self.tier.worker_pids()
        for pid in pids:
            self.first_seen.setdefault(pid, now)
        victims = [pid for pid in pids if pid not in self.killed and now - self.first_seen[pid] >= MIN_VICTIM_AGE]
        if victims:
            victim = self.rng.choice(victims)
            os.kill(victim, signal.SIGKILL)
            self.killed.add(victim)
        if self.args.kill_helpers and not (self.shortage and self.shortage.until):  # listing /proc needs fds
            for helper in descendants(os.getpid()) - set(pids):
                os.kill(helper, signal.SIGKILL)
                self.counts.helpers_killed += 1

    def stall_one(self, now: float) -> None:
        """SIGSTOP a worker: if it holds a task past task_timeout the tier kills it; else it continues later."""
        candidates = [pid for pid in self.tier.worker_pids() if pid not in self.stalled and pid not in self.killed]
        if candidates:
            victim = self.rng.choice(candidates)
            os.kill(victim, signal.SIGSTOP)
            self.stalled[victim] = now + self.args.stall
            self.counts.stalled += 1

    def continue_stalled(self, now: float) -> None:
        for pid, until in list(self.stalled.items()):
            if until <= now:
                del self.stalled[pid]
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass  # the tier killed it for holding a task too long

    def sample_workers(self) -> None:
        workers = max((rss_anon(pid) for pid in self.tier.worker_pids()), default=0)
        self.counts.worker_rss_max = max(self.counts.worker_rss_max, workers)

    def report_progress(self, elapsed: float) -> None:
        c = self.counts
        self.sample_workers()
        print(
            f"[{elapsed:5.0f}s] jobs {c.submitted} submitted, {c.results} done | stored {c.stored_blocks} blocks,"
            f" loaded {c.loaded_blocks}, torn {c.torn} | killed {len(self.killed)}, stalled {c.stalled}, restarted"
            f" {self.tier.stats().workers_restarted} | failed: {c.died} died, {c.timed_out} timed out, {len(c.other_failures)} other"
            f" | host RSS {rss_anon() / MIB:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )

    def settle(self) -> tuple[int, int]:
        """Finish every job and let the tier notice the last deaths; return (restarted, temp files left).

        A death is noticed in get_finished once the process is gone, and its
        replacement may wait out a back-off, so this polls for a while.
        """
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            try:
                self.tier.drain(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break  # the results check reports the jobs left
            self.collect()
            restarted = self.tier.stats().workers_restarted
            if restarted >= len(self.killed) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return self.tier.stats().workers_restarted, self.temp_files()

    def temp_files(self) -> int:
        return sum(1 for _ in Path(self.tier.config.root_dir).rglob("*.tmp"))


# -- the report --------------------------------------------------------------------


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    passed: bool = True

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.passed &= ok
        self.lines.append(f"  {name:<11} {detail:<66} {'ok' if ok else 'FAIL'}")

    def note(self, name: str, detail: str) -> None:
        self.lines.append(f"  {name:<11} {detail}")

    def print(self, header: str) -> None:
        print(header)
        print("\n".join(self.lines))
        print("PASS" if self.passed else "FAIL", flush=True)


def report(
    soak: Soak, restarted: int, temps: int, before: Snapshot, after: Snapshot, args: argparse.Namespace
) -> Report:
    """One line per invariant; what the host holds is compared from before the tier to after it is gone."""
    c = soak.counts
    out = Report()
    received = f"submitted {c.submitted}, received {c.results}, {len(soak.jobs)} without a result, {c.duplicates} extra"
    out.check("results", c.submitted == c.results and not soak.jobs and not c.duplicates, received)
    failures = (
        f"{c.died} jobs failed because a worker died, {c.timed_out} because one stalled, {len(c.other_failures)} for another reason"
    )
    if c.broken:
        failures += f"; tier broken: {c.broken}"
    out.check("failures", not c.other_failures and not c.broken, failures)
    out.check("torn reads", c.torn == 0, f"{c.torn} of {c.loaded_blocks} loaded blocks")
    stalled_kills = soak.tier.stats().tasks_timed_out if c.stalled else 0
    restarts_ok = len(soak.killed) <= restarted <= len(soak.killed) + stalled_kills
    restarts = f"killed {len(soak.killed)} workers, the tier {stalled_kills} stalled ones; restarted {restarted}"
    out.check("restarts", restarts_ok, restarts)
    out.check("temp files", temps == 0, f"{temps} left after drain")
    out.check("open fds", after.fds == before.fds, f"start {before.fds}, end {after.fds}")
    segments = f"start {before.segments}, end {after.segments} (this host's segments)"
    out.check("/dev/shm", after.segments == before.segments, segments)
    workers = sum(b"mp_tier.worker_process" in cmdline(pid) for pid in after.processes)
    processes = f"start {len(before.processes)}, end {len(after.processes)} (the janitor; {workers} workers left)"
    out.check("processes", len(after.processes) == len(before.processes) and not workers, processes)  # a killed janitor has a successor
    growth = after.rss - before.rss
    rss = f"start {before.rss / MIB:.1f} MiB, end {after.rss / MIB:.1f} MiB, growth {growth / MIB:+.1f} MiB"
    out.check("host RSS", growth <= args.max_rss_growth, f"{rss} (limit {args.max_rss_growth / MIB:.0f})")
    if args.sigchld != "default":
        out.note("SIGCHLD", {"ignore": "SIG_IGN: the kernel reaped every child", "reap": "a handler reaped every child"}[args.sigchld])
    if args.starve_every:
        spawns = f"{soak.tier.stats().spawns_failed} worker spawns failed and were retried"
        out.note("starved", f"{c.starved} windows of {args.starve:g} s without a free fd; {spawns}")
    out.note("worker RSS", f"max {c.worker_rss_max / MIB:.1f} MiB anonymous, per worker at progress lines and the end")
    written = f"{c.stored_bytes / 1e9:.2f} GB written"
    out.note("throughput", f"stored {c.stored_blocks} blocks ({written}), loaded {c.loaded_blocks}")
    return out


def run(args: argparse.Namespace) -> int:
    set_sigchld(args.sigchld)
    warm_up(args, args.root_dir)
    shortage = FdShortage(args.read_workers + args.write_workers + 16) if args.starve_every else None  # poll takes <= limit fds
    before = Snapshot.take()
    run_dir = tempfile.mkdtemp(prefix="mp_tier_soak_", dir=args.root_dir)
    started = time.monotonic()
    try:
        with PrimaryCache.create(args.num_blocks, args.block_size) as cache:
            config = TierConfig(
                root_dir=run_dir,
                n_read_workers=args.read_workers,
                n_write_workers=args.write_workers,
                max_bytes=args.max_disk,
                events=True,
                task_timeout=args.task_timeout,
            )
            with FileSystemTierManager(primary_kv_view=cache, config=config) as tier:
                soak = Soak(tier, cache, args, shortage)
                restarted, temps = drive(soak, args.seconds)
    finally:
        shutil.rmtree(run_dir)
    after = Snapshot.take()
    if shortage:
        shortage.close()
    header = (
        f"mp_tier soak: {args.seconds:g} s of load ({time.monotonic() - started:.1f} s with shutdown),"
        f" {args.block_size >> 10} KiB blocks, {args.read_workers} read + {args.write_workers} write workers,"
        f" a kill every {args.kill_every:g} s"
        + (f", a {args.stall:g} s stall every {args.stall_every:g} s" if args.stall_every else "")
        + (f", {soak.counts.helpers_killed} helpers killed" if args.kill_helpers else "")
        + (f", SIGCHLD {args.sigchld}" if args.sigchld != "default" else "")
        + (f", {args.starve:g} s without fds every {args.starve_every:g} s" if args.starve_every else "")
    )
    out = report(soak, restarted, temps, before, after, args)
    out.print(header)
    for failure in soak.counts.other_failures[:5]:
        print(f"  failure: {failure}", file=sys.stderr)
    return 0 if out.passed else 1


def drive(soak: Soak, seconds: float) -> tuple[int, int]:
    """The workload, then the settling; Ctrl-C or a broken tier ends the workload early but still gets a report."""
    try:
        try:
            soak.run_for(seconds)
        except KeyboardInterrupt:
            print("soak: interrupted; settling", file=sys.stderr)
        return soak.settle()
    except TierBroken as e:
        soak.counts.broken = str(e)
        return soak.tier.stats().workers_restarted, soak.temp_files()


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
