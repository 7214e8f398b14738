"""Random stores, loads, lookups, drains and worker kills, checked against a small model.

Hypothesis drives a real tier (worker processes, shared memory, files) and,
after every step, checks that each result it handed back and every byte it
left in the cache is something the model allows. Kills are real SIGKILLs of
worker processes, so the model allows what a death may do to a job in flight
(fail it, saying a worker died) and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import wait_exit
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from mp_tier import FileSystemTierManager, JobMetadata, JobResult, PrimaryCache
from mp_tier.layout import TEMP_SUFFIX

BLOCK = 16 << 10
NUM_BLOCKS = 32
KEYS = [hashlib.sha256(bytes([i])).digest() + (i % 2).to_bytes(4, "big") for i in range(6)]
# Each key's block is a pure function of the key, so a loaded block is checked exactly.
CONTENT = {key: np.frombuffer(hashlib.shake_256(key).digest(BLOCK), dtype=np.uint8) for key in KEYS}
# Stores read block i, which always holds KEYS[i]; loads write only the blocks after them.
SOURCE = {key: i for i, key in enumerate(KEYS)}
LOAD_BLOCKS = range(len(KEYS), NUM_BLOCKS)
MAX_KEYS_PER_JOB = 3
SECONDS = 30  # for any one wait: far beyond what a 16 KiB block needs, short of a hang
key_lists = st.lists(st.sampled_from(KEYS), max_size=MAX_KEYS_PER_JOB, unique=True)


def deferred(step: Callable[..., None]) -> Callable[..., None]:
    """Keep a step's failure for teardown to raise, and skip every step after it.

    Results arrive when workers finish, so a replay of the same steps may see
    a fault one step earlier; hypothesis takes a replay that ends at another
    step for inconsistent data generation and reports that instead of the
    fault. Raised in teardown, a failure ends every replay at the same place.
    """

    @functools.wraps(step)
    def run(self: TierModel, **kwargs: Any) -> None:
        if self.failure is None:
            try:
                step(self, **kwargs)
            except Exception as error:  # an assertion, a drain timeout, a broken tier
                self.failure = (step.__name__, error)

    return run


@dataclass
class Job:
    """What the model knew about a job when it was submitted, and since."""

    op: str
    keys: list[bytes]
    block_ids: list[int]
    must_hit: frozenset[bytes] = frozenset()  # load: on disk at submit, and files stay, so they must load
    may_hit: frozenset[bytes] = frozenset()  # load: a store could have put these on disk before the read
    new: frozenset[bytes] = frozenset()  # store: not known on disk, so each may cost one block
    exact: bool = False  # store: nothing raced it, so exactly its new keys cost a block
    exposed: bool = False  # a worker was killed while it was active: it may fail with "died"


class TierModel(RuleBasedStateMachine):
    """One tier with 1 read + 1 write worker, checked against the model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.root: str | None = None
        self.cache: PrimaryCache | None = None
        self.tier: FileSystemTierManager | None = None
        self.next_job = 0
        self.active: dict[int, Job] = {}
        self.on_disk: set[bytes] = set()
        self.unknown: set[bytes] = set()  # a store of these failed when a worker died: on disk or not
        self.holds: dict[int, bytes | None] = {}  # load block -> the key whose bytes it holds, None if unknown
        self.killed: set[int] = set()
        self.failure: tuple[str, Exception] | None = None

    @initialize()
    @deferred
    def start(self) -> None:
        self.root = tempfile.mkdtemp(prefix="mp_tier_model_")
        self.cache = PrimaryCache.create(num_blocks=NUM_BLOCKS, block_bytes=BLOCK)
        for key, block in SOURCE.items():
            self.cache.array[block] = CONTENT[key]
        self.tier = FileSystemTierManager(
            primary_kv_view=self.cache, root_dir=self.root, n_read_workers=1, n_write_workers=1
        )

    # -- rules ----------------------------------------------------------------

    @rule(keys=key_lists)
    @deferred
    def store(self, keys: list[bytes]) -> None:
        racing = [job for job in self.active_jobs("store") if set(job.keys) & set(keys)]
        for job in racing:
            job.exact = False
        for job in self.active_jobs("load"):
            job.may_hit |= set(keys)
        new = frozenset(keys) - self.on_disk
        exact = not racing and not new & self.unknown
        self.submit(Job("store", keys, [SOURCE[k] for k in keys], new=new, exact=exact))

    @rule(keys=key_lists, first=st.integers(0, len(LOAD_BLOCKS) - 1))
    @deferred
    def load(self, keys: list[bytes], first: int) -> None:
        while len(self.free_load_blocks()) < len(keys):
            assert self.tier.wait(SECONDS), "no load finished to free its blocks"
            self.collect()
        free = self.free_load_blocks()
        block_ids = [free[(first + i) % len(free)] for i in range(len(keys))]
        storing = {k for job in self.active_jobs("store") for k in job.keys}
        must = frozenset(keys) & self.on_disk
        may = frozenset(keys) & (self.unknown | storing)
        self.submit(Job("load", keys, block_ids, must_hit=must, may_hit=may))

    @rule(key=st.sampled_from(KEYS))
    @deferred
    def lookup(self, key: bytes) -> None:
        found = self.tier.lookup(key)
        if any(key in job.keys for job in self.active_jobs("store")):
            assert found is None, "a store of the key is in flight"
        elif key in self.unknown:
            assert found in (True, False), f"lookup {found!r} with no store in flight"
            if found:
                self.learn_on_disk({key})
        else:
            assert found is (key in self.on_disk), f"lookup {found!r}, the model says {key in self.on_disk}"

    @rule()
    @deferred
    def drain(self) -> None:
        self.finish_all()

    def finish_all(self) -> None:
        self.tier.drain(SECONDS)
        self.collect()
        assert not self.active, f"jobs {sorted(self.active)} have no result after drain"

    @rule(choice=st.integers(0, 1))
    @deferred
    def kill_worker(self, choice: int) -> None:
        """SIGKILL a worker that is past its start.

        Only such a worker: three deaths in a row while starting rightly break
        the tier. With none, drain first: whichever worker ran the tier's
        housekeeping has started. Whether one has depends on timing, which
        hypothesis must not see in a precondition, so a step that still finds
        none does nothing.
        """
        started = self.started_workers()
        if not started:
            self.finish_all()
            started = self.started_workers()
        if not started:
            return
        pid = started[choice % len(started)]
        os.kill(pid, signal.SIGKILL)
        assert wait_exit(pid, SECONDS), f"worker {pid} survived SIGKILL"
        self.killed.add(pid)
        for job in self.active.values():
            job.exposed = True

    # -- checks after every step ----------------------------------------------

    @invariant()
    @deferred
    def results_and_cache_agree(self) -> None:
        self.collect()
        for key, block in SOURCE.items():
            assert np.array_equal(self.cache.array[block], CONTENT[key]), f"source block {block} changed"
        busy = {b for job in self.active_jobs("load") for b in job.block_ids}
        for block, key in self.holds.items():
            if key is not None and block not in busy:
                assert np.array_equal(self.cache.array[block], CONTENT[key]), f"block {block} no longer holds its load"

    def collect(self) -> None:
        for result in self.tier.get_finished():
            job = self.active.pop(result.job_id, None)
            assert job is not None, f"job {result.job_id}: a second result, or one never submitted"
            self.check_successful_keys(job, result)
            (self.check_store if job.op == "store" else self.check_load)(job, result)
        self.deaths_unnoticed()

    def check_successful_keys(self, job: Job, result: JobResult) -> None:
        if result.success:
            assert result.successful_keys is None and result.error is None, result
        else:
            done = set(result.successful_keys)
            assert list(result.successful_keys) == [k for k in job.keys if k in done], "not the job's keys in job order"
            assert done != set(job.keys), "a failed job with every key done"

    def check_store(self, job: Job, result: JobResult) -> None:
        stored = set(self.done_keys(job, result))
        if not result.success:
            assert job.exposed and result.error_code == "EOWNERDEAD", f"store failed with no worker killed: {result.error}"
        size = result.transfer_size
        written = len(job.new & stored)
        assert size % BLOCK == 0 and size <= BLOCK * written, f"{size} bytes for {written} new keys"
        if job.exact and not job.exposed:
            assert size == BLOCK * len(job.new), f"{size} bytes for {len(job.new)} new keys, none raced"
        self.learn_on_disk(stored)
        self.unknown |= set(job.keys) - self.on_disk

    def check_load(self, job: Job, result: JobResult) -> None:
        loaded = self.done_keys(job, result)
        missed = set(job.keys) - set(loaded)
        assert set(loaded) <= job.must_hit | job.may_hit, "loaded a key that was never stored"
        if missed & job.must_hit:
            assert job.exposed and result.error_code == "EOWNERDEAD", f"a stored key failed to load: {result.error}"
        elif missed:
            assert result.error_code == "ENOENT" or (job.exposed and result.error_code == "EOWNERDEAD"), result.error
        assert result.transfer_size == BLOCK * len(loaded), f"{result.transfer_size} bytes for {len(loaded)} blocks"
        for key, block in zip(job.keys, job.block_ids):
            self.holds[block] = key if key in loaded else None
        self.learn_on_disk(set(loaded))

    def started_workers(self) -> list[int]:
        """Live workers past their start."""
        return [pid for pid in self.tier.worker_pids(ready=True) if pid not in self.killed]

    def deaths_unnoticed(self) -> bool:
        restarted = self.tier.stats().workers_restarted
        assert restarted <= len(self.killed), "a worker died that nobody killed"
        return restarted < len(self.killed)

    # -- model helpers --------------------------------------------------------

    def submit(self, job: Job) -> None:
        job.exposed = self.deaths_unnoticed()  # a dead worker's tasks are only retried once it is noticed
        job_id = self.next_job
        self.next_job += 1
        self.active[job_id] = job
        if job.op == "load":
            self.holds.update(dict.fromkeys(job.block_ids))  # unknown until its result says
        metadata = JobMetadata(job_id=job_id, keys=job.keys, block_ids=job.block_ids)
        (self.tier.submit_store if job.op == "store" else self.tier.submit_load)(metadata)

    def active_jobs(self, op: str) -> list[Job]:
        return [job for job in self.active.values() if job.op == op]

    def free_load_blocks(self) -> list[int]:
        busy = {b for job in self.active_jobs("load") for b in job.block_ids}
        return [b for b in LOAD_BLOCKS if b not in busy]

    def learn_on_disk(self, keys: set[bytes]) -> None:
        """Files are never deleted (none is corrupt here), so a key seen on disk stays there."""
        self.on_disk |= keys
        self.unknown -= keys

    @staticmethod
    def done_keys(job: Job, result: JobResult) -> tuple[bytes, ...]:
        return tuple(job.keys) if result.success else result.successful_keys

    def teardown(self) -> None:
        """Every job answered, no temp file left; then no worker, segment or directory outlives the example."""
        try:
            if self.tier is not None:
                self.drain()
                self.no_temp_files()
        finally:
            self.release()
        if self.failure is not None:
            step, error = self.failure
            raise AssertionError(f"{step}: {error!r}") from error

    @deferred
    def no_temp_files(self) -> None:
        assert list(Path(self.root).rglob(f"*{TEMP_SUFFIX}")) == [], "a temp file outlived drain"

    def release(self) -> None:
        """Shut down what the example made, even after a failure; then check that none of it is left."""
        pids: list[int] = []
        if self.tier is not None:
            pids = self.tier.worker_pids()
            self.tier.shutdown()
        if self.cache is not None:
            self.cache.close()
        if self.root is not None:
            shutil.rmtree(self.root)
        assert [pid for pid in pids if not wait_exit(pid, SECONDS)] == [], "a worker outlived shutdown"
        assert self.cache is None or not os.path.exists(f"/dev/shm/{self.cache.name}"), "the segment outlived close"


@pytest.mark.timeout(120)
def test_tier_agrees_with_model() -> None:
    """60 runs of up to 40 steps, each on a fresh tier.

    No shrinking: every replay starts worker processes, so shrinking a run
    takes minutes, and timing makes a shorter run an unreliable witness. A
    failure prints the steps of the run that failed.
    """
    run_state_machine_as_test(
        TierModel,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            database=None,  # keep no example database in the checkout
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
