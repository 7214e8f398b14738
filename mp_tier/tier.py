"""The tier API: the coordinator that lives in the host process.

It validates and splits jobs into tasks, writes them to the task pipes, and
turns completions into one ``JobResult`` per job. It runs only inside the
host's own calls (no thread of its own), so between calls it costs the host
nothing, and ``submit_*`` never touches a file.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

import msgspec
import numpy as np

from . import block_io
from .channels import FRAME_BYTES, encode_frame
from .config import FILE_MODES, TierConfig
from .capacity import CapacityFull, CapacityIndex
from .jobs import JobMetadata, JobResult, TierEvent
from .layout import MIN_KEY_BYTES, describe_run, prepare_namespace
from .messages import EVICT, LOAD, PROBE, SCAN, STORE, SWEEP, TOUCH, Completion, Task
from .pool import WorkerPool
from .shared_cache import PrimaryCache
from .worker import WorkerSpec

log = logging.getLogger("mp_tier")

# Bytes a Task needs besides its keys, and per block besides the key itself
# (msgpack bin header and a block id up to 2**63).
_TASK_OVERHEAD = 32
_BLOCK_OVERHEAD = 12


class TierClosed(RuntimeError):
    """The tier was shut down; it takes no more work."""


class TierBroken(TierClosed):
    """Workers kept dying as they started, so the tier stopped replacing them.

    Like ``BrokenProcessPool``: every job in flight was failed, and every
    later call raises this instead of waiting on workers that cannot run.
    """


# Workers that die before they are ready, in a row, before the tier gives up.
MAX_STARTUP_DEATHS = 3
# A claim takes microseconds; one still open after this is a stopped worker.
CLAIM_SETTLE_SECONDS = 1.0


class _Job:
    """A submitted job while its tasks are out, or the tier's own housekeeping (``job_id`` None).

    ``evict`` holds the blocks its tasks delete first, aligned with ``keys``.
    """

    __slots__ = ("job_id", "op", "keys", "ids", "evict", "tasks_left", "nbytes", "failed", "error", "start")

    def __init__(
        self,
        job_id: int | None,
        op: int,
        keys: list[bytes],
        ids: list[int],
        start: float,
        evict: Sequence[bytes],
    ):
        self.job_id = job_id
        self.op = op
        self.keys = keys
        self.ids = ids
        self.evict = evict
        self.tasks_left = 0  # counted as its tasks are sent
        self.nbytes = 0
        self.failed: list[int] = []
        self.error: str | None = None
        self.start = start


def _release(counter: collections.Counter[bytes], keys: Iterable[bytes]) -> None:
    """Count ``keys`` out, dropping the ones that reach zero so membership stays exact."""
    for key in keys:
        left = counter[key] - 1
        if left:
            counter[key] = left
        else:
            del counter[key]


def _checked_keys(keys: Sequence[bytes]) -> list[bytes]:
    """``keys`` as a list, or ValueError naming the first that is not a key."""
    keys = list(keys)
    if keys and (set(map(type, keys)) != {bytes} or min(map(len, keys)) < MIN_KEY_BYTES):
        bad = next(k for k in keys if type(k) is not bytes or len(k) < MIN_KEY_BYTES)
        raise ValueError(f"key {bad!r} is not bytes of at least {MIN_KEY_BYTES}")
    return keys


class FileSystemTierManager:
    """A file-system KV tier whose block I/O runs in worker processes."""

    def __init__(
        self,
        offloading_spec: Any = None,
        primary_kv_view: Any = None,
        tier_type: str = "mp_fs",
        root_dir: str | None = None,
        n_read_workers: int | None = None,
        n_write_workers: int | None = None,
        config: TierConfig | None = None,
        *,
        n_read_threads: int | None = None,
        n_write_threads: int | None = None,
        engine: str | None = None,
    ):
        self._closed = True  # until the pool is up, shutdown() has nothing to do
        cache = PrimaryCache.backing(primary_kv_view)
        if cache is None:
            raise ValueError(
                f"primary_kv_view must be a PrimaryCache or its whole .array/.view, got {type(primary_kv_view).__name__}"
            )
        overrides = {
            "root_dir": root_dir,
            "n_read_workers": n_read_workers if n_read_workers is not None else n_read_threads,
            "n_write_workers": n_write_workers if n_write_workers is not None else n_write_threads,
            "engine": engine,
        }
        config = msgspec.structs.replace(
            config or TierConfig(), **{k: v for k, v in overrides.items() if v is not None}
        )
        config.validate()
        if not config.root_dir:
            raise ValueError("root_dir is required (argument or TierConfig.root_dir)")
        self.config = config
        self.tier_type = tier_type
        self.cache = cache
        self.num_blocks = cache.num_blocks
        self.block_bytes = cache.block_bytes

        file_mode, dir_mode = FILE_MODES[config.file_mode]
        run, rank = describe_run(cache.block_bytes, offloading_spec)
        self.layout = prepare_namespace(config.root_dir, run, rank, dir_mode)
        self.direct = self._choose_direct()
        if config.checksum and (why_not := block_io.probe_xattr(self.layout.base)):
            raise ValueError(f"checksum = true needs user xattrs under {self.layout.base}: {why_not}")

        n_workers = config.n_read_workers + config.n_write_workers
        specs = [
            WorkerSpec(
                i,
                i < config.n_read_workers,
                self.layout,
                cache.block_bytes,
                self.direct,
                file_mode,
                dir_mode,
                config.checksum,
                touch_on_load=config.max_bytes > 0,
            )
            for i in range(n_workers)
        ]
        self._n_workers = n_workers
        # A job is split over the workers that take its kind first.
        self._group_size = {LOAD: config.n_read_workers, STORE: config.n_write_workers}
        self._pool = WorkerPool(specs, cache, config.engine, config.start_method)
        self._jobs: dict[int, _Job] = {}
        self._tasks: dict[int, tuple[_Job, int, int]] = {}
        self._inflight_stores: collections.Counter[bytes] = collections.Counter()
        self._inflight_loads: collections.Counter[bytes] = collections.Counter()
        self._evicting: collections.Counter[bytes] = collections.Counter()
        # Blocks of other instances sharing the root that probes found, and keys being probed.
        self._elsewhere: set[bytes] = set()
        self._probing: set[bytes] = set()
        self._capacity = CapacityIndex(cache.block_bytes, config.max_bytes, evict=config.eviction == "lru")
        self._events: list[TierEvent] | None = [] if config.events else None
        self._finished: list[JobResult] = []
        self._next_seq = 0
        self._stats = collections.Counter()
        self._worker_tasks = [0] * n_workers
        self._retried: set[int] = set()
        self._startup_deaths = 0
        self._broken: str | None = None
        self._closed = False
        self._housekeeping(SWEEP, [])
        self._housekeeping(SCAN, [])

    def _housekeeping(self, op: int, keys: list[bytes], evict: Sequence[bytes] = ()) -> _Job:
        """Send the tier's own work (not a job: no result) to the workers.

        SWEEP and SCAN with no keys cover the whole namespace in one task; the
        others are split over every worker.
        """
        job = _Job(None, op, keys, [], time.perf_counter(), evict)
        blocks = keys or evict
        self._send(job, self._per_task(blocks, evicting=False, workers=self._n_workers) if blocks else 1)
        return job

    def _send(self, job: _Job, per_task: int) -> None:
        """Split ``job`` into tasks of ``per_task`` blocks (one task if it has none) and queue them."""
        frames = bytearray()
        count = max(len(job.keys), len(job.evict))
        for first in range(0, count or 1, per_task):
            last = first + per_task
            self._tasks[self._next_seq] = (job, first, min(last, count) - first)
            encode_frame(Task(self._next_seq, job.op, job.ids[first:last], job.keys[first:last], job.evict[first:last]), frames)
            self._next_seq += 1
            job.tasks_left += 1
        self._pool.submit(job.op, frames)

    def _per_task(self, keys: list[bytes], evicting: bool, workers: int) -> int:
        """Blocks per task: one task per worker of the group, as many as fit a frame."""
        per_key = (max(map(len, keys)) + _BLOCK_OVERHEAD) * (2 if evicting else 1)
        return min(-(-len(keys) // workers), (FRAME_BYTES - _TASK_OVERHEAD) // per_key)

    def _choose_direct(self) -> bool:
        mode = self.config.o_direct
        if mode == "off":
            return False
        if self.block_bytes % block_io.DIRECT_ALIGN:
            why_not = f"block_bytes {self.block_bytes} is not a multiple of {block_io.DIRECT_ALIGN}"
        else:
            why_not = block_io.probe_direct(self.layout.base)
        if why_not is None:
            return True
        if mode == "on":
            raise ValueError(f"o_direct = 'on' but O_DIRECT is unusable under {self.layout.base}: {why_not}")
        log.warning("O_DIRECT unusable under %s (%s); using buffered I/O", self.layout.base, why_not)
        return False

    # -- submitting ---------------------------------------------------------

    def submit_store(self, job: JobMetadata) -> None:
        """Queue the blocks of ``job`` for writing; returns at once."""
        self._submit(job, STORE)

    def submit_load(self, job: JobMetadata) -> None:
        """Queue the blocks of ``job`` for reading into the cache; returns at once."""
        self._submit(job, LOAD)

    def _submit(self, job: JobMetadata, op: int) -> None:
        if self._closed:
            self._check_open()
        try:
            job_id, keys, block_ids = job.job_id, job.keys, job.block_ids
        except AttributeError:
            raise ValueError(f"expected a JobMetadata, got {job!r}") from None
        if type(job_id) is not int:
            raise ValueError(f"job_id must be an int, got {job_id!r}")
        if job_id in self._jobs:
            raise ValueError(f"job_id {job_id} is still active")
        keys, ids = self._validate(job_id, keys, block_ids, op)
        start = time.perf_counter()
        if not keys:
            self._finished.append(JobResult(job_id=job_id, success=True, successful_keys=None, transfer_size=0, transfer_time=0.0))
            return
        limit = self.config.max_queued_tasks
        if limit and self._pool.backlog(op) >= limit:
            self._fail_at_once(job_id, f"EAGAIN: {limit} tasks already wait on the host (max_queued_tasks)")
            return
        victims: list[bytes] = []
        if op == STORE:
            if self._evicting and (busy := next((k for k in keys if k in self._evicting), None)):
                # its old file may still be unlinked after a new one is written: refuse rather than lose it
                self._fail_at_once(job_id, f"EBUSY: block {busy.hex()} is being evicted; store it again later")
                return
            try:
                victims = self._capacity.admit(keys, (self._inflight_loads, self._inflight_stores))
            except CapacityFull as e:
                self._fail_at_once(job_id, str(e))
                return
            if victims:
                self._removed(victims)
        else:
            self._capacity.refresh(keys)
        state = _Job(job_id, op, keys, ids, start, victims)
        self._jobs[job_id] = state
        (self._inflight_stores if op == STORE else self._inflight_loads).update(keys)
        self._send(state, self._per_task(keys, bool(victims), self._group_size[op]))

    def _fail_at_once(self, job_id: int, error: str) -> None:
        self._stats["jobs_failed"] += 1
        self._finished.append(
            JobResult(job_id=job_id, success=False, successful_keys=(), transfer_size=0, transfer_time=0.0, error=error)
        )

    def _forget(self, keys: Iterable[bytes]) -> None:
        """Stop counting blocks found missing, unless a store of them is in flight: its outcome decides."""
        self._capacity.discard(k for k in keys if k not in self._inflight_stores)

    def _removed(self, keys: list[bytes]) -> None:
        """Evicted from the index now; their files go when the task carrying them runs."""
        self._evicting.update(keys)
        self._stats["blocks_evicted"] += len(keys)
        if self._events is not None:
            self._events.append(TierEvent("removed", tuple(keys)))

    def _validate(self, job_id: int, keys: Sequence[bytes], block_ids: Any, op: int) -> tuple[list[bytes], list[int]]:
        """Checked copies of a job's keys and block ids; raises ValueError naming the bad value."""
        if isinstance(block_ids, np.ndarray):
            if block_ids.ndim != 1 or block_ids.dtype.kind not in "iu":
                raise ValueError(f"job {job_id}: block_ids must be a 1-D integer array, got {block_ids.dtype}{block_ids.shape}")
            ids = block_ids.tolist()
        elif isinstance(block_ids, (str, bytes)) or not hasattr(block_ids, "__iter__"):
            raise ValueError(f"job {job_id}: block_ids must be a sequence of ints, got {block_ids!r}")
        else:
            ids = list(block_ids)
        if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
            raise ValueError(f"job {job_id}: keys must be a sequence of bytes, got {keys!r}")
        keys = list(keys)
        if len(keys) != len(ids):
            raise ValueError(f"job {job_id}: {len(keys)} keys but {len(ids)} block_ids")
        if not keys:
            return keys, ids
        if set(map(type, ids)) != {int}:
            bad = next(b for b in ids if type(b) is not int)
            raise ValueError(f"job {job_id}: block id {bad!r} is not an int")
        for bad in (min(ids), max(ids)):
            if not 0 <= bad < self.num_blocks:
                raise ValueError(f"job {job_id}: block id {bad} is out of range [0, {self.num_blocks})")
        if set(map(type, keys)) != {bytes}:
            bad = next(k for k in keys if type(k) is not bytes)
            raise ValueError(f"job {job_id}: key {bad!r} is not bytes")
        if min(map(len, keys)) < MIN_KEY_BYTES:
            bad = next(k for k in keys if len(k) < MIN_KEY_BYTES)
            raise ValueError(f"job {job_id}: key {bad!r} is shorter than {MIN_KEY_BYTES} bytes (hash + 4-byte group)")
        if len(set(keys)) != len(keys):
            bad = next(k for k, c in collections.Counter(keys).items() if c > 1)
            raise ValueError(f"job {job_id}: key {bad!r} appears twice")
        if op == LOAD and len(set(ids)) != len(ids):
            bad = next(b for b, c in collections.Counter(ids).items() if c > 1)
            raise ValueError(f"job {job_id}: block id {bad} is loaded twice")
        longest = max(map(len, keys))
        if longest + _BLOCK_OVERHEAD > FRAME_BYTES - _TASK_OVERHEAD:
            raise ValueError(f"job {job_id}: a key of {longest} bytes is longer than {FRAME_BYTES - _TASK_OVERHEAD - _BLOCK_OVERHEAD}")
        return keys, ids

    # -- completions --------------------------------------------------------

    def get_finished(self) -> list[JobResult]:
        """Results of the jobs finished since the last call; never blocks.

        This call is also where a dead worker is noticed and replaced.
        """
        if not self._closed:
            self._pump()
        if self._broken and not self._finished:
            raise TierBroken(self._broken)
        finished, self._finished = self._finished, []
        return finished

    def _pump(self) -> None:
        pool = self._pool
        pool.flush()
        completions, dead = pool.poll()
        for completion in completions:
            self._on_completion(completion)
        if dead:
            self._recover(dead)

    def _recover(self, dead: list[int]) -> None:
        """Retry (once) or fail what dead workers held, then replace them.

        The host takes back the queues, waits out any live worker's claim (see
        ``worker``), and collects every completion: an outstanding task that is
        then neither queued nor named in a live worker's slot was held by a
        dead one. So no task ever runs twice, and no worker writes a block
        after its job's result.
        """
        pool = self._pool
        queued = pool.reclaim()
        dead = dead + pool.settle_claims(CLAIM_SETTLE_SECONDS)
        reason = "; ".join(pool.exit_reason(i) for i in dead)
        startup_deaths = sum(pool.starting(i) for i in dead)
        self._startup_deaths = self._startup_deaths + startup_deaths if startup_deaths else 0
        held = pool.held()
        for completion in pool.results.read():
            self._on_completion(completion)
        taken = {task.seq for task in queued} | held
        orphans = [self._rebuild(seq) for seq in self._tasks if seq not in taken]
        retry = [task for task in orphans if task.seq not in self._retried]
        self._retried.update(task.seq for task in retry)
        for task in orphans:
            if task not in retry:
                self._fail_task(task.seq, f"{reason}; the task had already been retried once")
        if stores := [key for task in orphans if task.op == STORE for key in task.keys]:
            self._housekeeping(SWEEP, stores)  # the temp files their writers left
        if self._startup_deaths >= MAX_STARTUP_DEATHS:
            self._break(f"{self._startup_deaths} workers in a row died while starting; last: {reason}")
            return
        pool.requeue(retry + queued)
        for index in dead:
            pool.start(index)
            self._stats["workers_restarted"] += 1

    def _rebuild(self, seq: int) -> Task:
        job, first, count = self._tasks[seq]
        last = first + count
        return Task(seq, job.op, job.ids[first:last], job.keys[first:last], job.evict[first:last])

    def _break(self, reason: str) -> None:
        log.error("mp_tier tier broken: %s", reason)
        self._broken = reason
        self._closed = True
        self._stop_workers(0, f"tier broken: {reason}")

    def _stop_workers(self, timeout: float, reason: str) -> None:
        """Stop the pool, then fail every task it did not finish.

        Workers killed at the deadline may have left temp files beside the
        blocks they were storing; with no worker left, the host removes them.
        """
        self._pool.stop(timeout, self._on_completion)
        unfinished = list(self._tasks)
        tasks = [self._rebuild(seq) for seq in unfinished]
        paths = [self.layout.path(key) for task in tasks if task.op == STORE for key in task.keys]
        if paths:
            block_io.remove_stale_temps(self.layout.base, paths)
        for seq in unfinished:
            self._fail_task(seq, reason)
        self._pool.close()

    def _on_completion(self, completion: Completion) -> None:
        if completion.more:
            if completion.seq in self._tasks:
                self._capacity.adopt(completion.found)
            return
        entry = self._tasks.pop(completion.seq, None)
        if entry is None:
            return
        if self._retried:
            self._retried.discard(completion.seq)
        job, first, count = entry
        if job.evict:
            _release(self._evicting, job.evict[first : first + count])
        job.nbytes += completion.nbytes
        if completion.worker >= 0 and job.job_id is not None:
            self._worker_tasks[completion.worker] += 1
        self._stats["blocks_skipped"] += completion.skipped
        self._stats["files_removed"] += completion.swept + len(completion.corrupt)
        if completion.corrupt:
            corrupt = [job.keys[first + i] for i in completion.corrupt]
            self._forget(corrupt)
            if self._events is not None:
                self._events.append(TierEvent("removed", tuple(corrupt)))
        if completion.failed:
            job.failed.extend(first + i for i in completion.failed)
            if job.error is None:
                job.error = completion.error
        job.tasks_left -= 1
        if job.tasks_left == 0:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        if job.job_id is None:
            if job.op == SCAN:
                self._evict_over_budget()
            elif job.op == PROBE:
                missing = set(job.failed)
                self._probing.difference_update(job.keys)
                self._elsewhere.update(k for i, k in enumerate(job.keys) if i not in missing)
            return  # the tier's own housekeeping: no result
        del self._jobs[job.job_id]
        _release(self._inflight_stores if job.op == STORE else self._inflight_loads, job.keys)
        kind = "loaded" if job.op == LOAD else "stored"
        successful_keys = None
        if job.failed:
            self._stats["jobs_failed"] += 1
            failed = set(job.failed)
            successful_keys = tuple(k for i, k in enumerate(job.keys) if i not in failed)
            if job.op == STORE:
                self._forget(job.keys[i] for i in failed)
            else:  # no count changes: its file may be back by the time this result is read
                self._elsewhere.difference_update(job.keys[i] for i in failed)
        else:
            self._stats[f"jobs_{kind}"] += 1
        if job.op == STORE and self._events is not None:
            stored = successful_keys if successful_keys is not None else tuple(job.keys)
            if stored:
                self._events.append(TierEvent("stored", stored))
        self._stats[f"bytes_{kind}"] += job.nbytes
        self._finished.append(
            JobResult(
                job_id=job.job_id,
                success=not job.failed,
                successful_keys=successful_keys,
                transfer_size=job.nbytes,
                transfer_time=time.perf_counter() - job.start,
                error=job.error,
            )
        )

    def _fail_task(self, seq: int, reason: str) -> None:
        entry = self._tasks.get(seq)
        if entry is not None:
            job, _, count = entry
            job.error = reason  # why the task never ran outranks any block error
            self._on_completion(Completion(seq, -1, 0, list(range(count)), reason))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a result is ready for get_finished(); False on timeout.

        For a host with nothing else to do; a scheduler loop just polls.
        """
        return self._block_until(lambda: bool(self._finished) or not self._jobs, timeout) and bool(self._finished)

    def drain(self, timeout: float | None = None) -> None:
        """Block until every submitted job has finished; results stay for get_finished().

        It also waits for the tier's own housekeeping, so the workers are idle after it.
        """
        if not self._block_until(lambda: not self._tasks, timeout):
            raise TimeoutError(f"{len(self._jobs)} jobs still active after {timeout} s")

    def _block_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._pump()
            if done():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._pool.wait(remaining)

    # -- queries ------------------------------------------------------------

    def lookup(self, key: bytes) -> bool | None:
        """True if the block is on disk, False if not, None while a store of it is in flight."""
        self._check_open()
        _checked_keys([key])
        if key in self._inflight_stores:
            return None
        return os.path.exists(self.layout.path(key))

    def lookup_many(self, keys: Sequence[bytes]) -> list[bool | None]:
        """``lookup`` for many keys at once, from memory only: it never waits for a disk.

        True for blocks this tier stored, found at start, or learned of; None
        for blocks with a store in flight; False otherwise. Keys it answers
        False are also probed on disk by a worker in the background, so a block
        another instance sharing the root wrote is answered True once that
        probe's completion has been read (by any later ``get_finished``,
        ``wait`` or ``drain``). A block another instance deleted is forgotten
        when a load of it fails.
        """
        self._check_open()
        keys = _checked_keys(keys)
        inflight, index, elsewhere = self._inflight_stores, self._capacity, self._elsewhere
        answers: list[bool | None] = [
            None if k in inflight else True if k in index or k in elsewhere else False for k in keys
        ]
        probing = self._probing
        unknown = [k for k, answer in zip(keys, answers) if answer is False and k not in probing]
        if unknown:
            probing.update(unknown)
            self._housekeeping(PROBE, unknown)
        return answers

    def touch(self, keys: Sequence[bytes]) -> None:
        """Mark blocks as just used, for LRU eviction; persisted in their files' mtime."""
        self._check_open()
        keys = [k for k in _checked_keys(keys) if k in self._capacity]
        self._capacity.refresh(keys)
        if keys:
            self._housekeeping(TOUCH, keys)

    def take_events(self) -> list[TierEvent]:
        """Events recorded since the last call (``events = true`` only)."""
        if self._events is None:
            raise ValueError("events are off: construct the tier with TierConfig(events=True)")
        if not self._closed:
            self._pump()
        events, self._events = self._events, []
        return events

    def _evict_over_budget(self) -> None:
        """After the start-up scan: delete the oldest blocks if the root held more than fits."""
        victims = self._capacity.over_budget((self._inflight_loads, self._inflight_stores))
        if victims:
            self._removed(victims)
            self._housekeeping(EVICT, [], victims)

    def block_path(self, key: bytes) -> str:
        """The file that holds (or would hold) the block of ``key``."""
        return self.layout.path(key)

    def stats(self) -> dict[str, Any]:
        """Counters since construction."""
        counters = {
            name: self._stats[name]
            for name in (
                "jobs_stored",
                "jobs_loaded",
                "jobs_failed",
                "bytes_stored",
                "bytes_loaded",
                "blocks_skipped",
                "blocks_evicted",
                "files_removed",
                "workers_restarted",
            )
        }
        counters["jobs_active"] = len(self._jobs)
        counters["bytes_counted"] = self._capacity.used_bytes
        counters["blocks_seen_elsewhere"] = len(self._elsewhere)
        counters["tasks_queued"] = self._pool.loads.backlog + self._pool.stores.backlog
        counters["workers_alive"] = 0 if self._closed else self._pool.alive()
        counters["tasks_by_worker"] = list(self._worker_tasks)
        return counters

    def worker_pids(self) -> list[int]:
        return [] if self._closed else self._pool.pids()

    def _check_open(self) -> None:
        if self._broken:
            raise TierBroken(self._broken)
        if self._closed:
            raise TierClosed("the tier is shut down")

    # -- shutdown -----------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the workers; every unfinished job gets a ``cancelled`` result.

        Tasks no worker has taken are cancelled at once; tasks in progress get
        ``stop_timeout`` seconds to finish. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        pool = self._pool
        pool.flush()
        for completion in pool.results.read():
            self._on_completion(completion)
        for task in pool.reclaim():
            self._fail_task(task.seq, "cancelled: the tier shut down before the task started")
        self._stop_workers(self.config.stop_timeout, "cancelled: the worker stopped before finishing")

    def __enter__(self) -> "FileSystemTierManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
