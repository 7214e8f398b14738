"""Capacity, eviction, recency across restarts, lookup_many and events, measured on real directories."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import BLOCK, NAMESPACE, SHIM_FD_PATH, bytes_read, fill_random, libc_shim, make_keys, overlay, run_job, stop_processes, wait_ready

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
from mp_tier.capacity import CapacityIndex
from mp_tier.jobs import TierEvent
from mp_tier.layout import BLOCK_SUFFIX, HOST_TAG, TEMP_SUFFIX
from mp_tier.messages import Op
from mp_tier.residency import Residency


def disk_bytes(base: str) -> int:
    """Bytes of block and temp files under the namespace, as the directory holds them."""
    total = 0
    for parent, _, names in os.walk(base):
        for name in names:
            if name.endswith((BLOCK_SUFFIX, TEMP_SUFFIX)):
                try:
                    total += os.stat(os.path.join(parent, name)).st_size
                except FileNotFoundError:
                    pass  # evicted or renamed while we walked
    return total


def store_one_by_one(tier, keys, first_job=0) -> None:
    for j, key in enumerate(keys):
        assert run_job(tier, "store", JobMetadata(job_id=first_job + j, keys=[key], block_ids=[j % 200])).success


def age_in_order(tier, keys) -> None:
    """Give the stored blocks distinct mtimes in the past, oldest first: file times are only jiffy-coarse."""
    now = time.time()
    for i, key in enumerate(keys):
        os.utime(tier.block_path(key), (now - 100 + i, now - 100 + i))


def present(tier, keys) -> list[bool]:
    return [os.path.exists(tier.block_path(k)) for k in keys]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_budget_never_exceeded_under_random_work(make_tier, cache, seed):
    budget_blocks = 20
    tier = make_tier(config=TierConfig(max_bytes=budget_blocks * BLOCK))
    rng = np.random.default_rng(seed)
    fill_random(cache, range(256), seed=seed)
    universe = make_keys(80, seed=seed)
    storing = 0  # blocks of the stores submitted since the last drain: all that may be in flight
    for job_id in range(150):
        n = int(rng.integers(1, 7))
        keys = [universe[i] for i in rng.choice(len(universe), n, replace=False)]
        kind = rng.choice(["store", "store", "load", "touch"])
        if kind == "touch":
            tier.touch(keys)
        else:
            getattr(tier, f"submit_{kind}")(JobMetadata(job_id=job_id, keys=keys, block_ids=list(range(n))))
            storing += n if kind == "store" else 0
        assert disk_bytes(tier.layout.base) <= (budget_blocks + storing) * BLOCK  # mid-flight: a victim per block in flight
        if job_id % 5 == 0:
            tier.drain(30)
            storing = 0
            assert disk_bytes(tier.layout.base) <= budget_blocks * BLOCK
            assert tier.stats().bytes_counted == disk_bytes(tier.layout.base)
    tier.drain(30)
    assert disk_bytes(tier.layout.base) <= budget_blocks * BLOCK
    errors = {r.error_code for r in tier.get_finished() if r.error}
    assert errors <= {"ENOENT", "ENOSPC", "EBUSY"}, errors
    assert tier.stats().blocks_evicted > 0


def test_lru_evicts_the_least_recently_used(make_tier):
    tier = make_tier(config=TierConfig(max_bytes=4 * BLOCK))
    a, b, c, d, e, f = make_keys(6)
    store_one_by_one(tier, [a, b, c, d])
    assert run_job(tier, "load", JobMetadata(job_id=10, keys=[a], block_ids=[50])).success
    tier.touch([b])
    store_one_by_one(tier, [e], first_job=20)
    assert present(tier, [a, b, c, d, e]) == [True, True, False, True, True]
    store_one_by_one(tier, [f], first_job=30)
    assert present(tier, [a, b, c, d, e, f]) == [True, True, False, False, True, True]


def test_a_block_being_loaded_is_never_evicted(make_tier):
    tier = make_tier(config=TierConfig(max_bytes=2 * BLOCK))
    a, b, c = make_keys(3)
    store_one_by_one(tier, [a, b])
    tier.submit_load(JobMetadata(job_id=10, keys=[a, b], block_ids=[50, 51]))
    tier.submit_store(JobMetadata(job_id=11, keys=[c], block_ids=[0]))  # nothing may be evicted now
    tier.drain(30)
    results = {r.job_id: r for r in tier.get_finished()}
    assert results[10].success
    assert not results[11].success and results[11].error_code == "ENOSPC" and "free to evict" in results[11].error
    store_one_by_one(tier, [c], first_job=12)  # loads done: now it fits
    assert present(tier, [a, b, c]) == [False, True, True]


def test_fail_mode_fails_stores_that_do_not_fit(make_tier):
    tier = make_tier(config=TierConfig(max_bytes=3 * BLOCK, eviction="fail"))
    keys = make_keys(4)
    store_one_by_one(tier, keys[:3])
    result = run_job(tier, "store", JobMetadata(job_id=9, keys=keys[3:], block_ids=[0]))
    assert not result.success and result.successful_keys == ()
    assert result.error_code == "ENOSPC" and f"max_bytes {3 * BLOCK}" in result.error
    assert present(tier, keys) == [True, True, True, False]
    again = run_job(tier, "store", JobMetadata(job_id=10, keys=keys[:2], block_ids=[0, 1]))
    assert again.success  # already counted blocks still fit


@pytest.mark.parametrize("checksum", [False, True], ids=["one-call load", "checksummed load in Python"])
def test_a_block_whose_touch_fails_fails_naming_it_and_is_read_once(make_tier, tmp_path, checksum):
    """A budgeted tier (a load records its use in the block's mtime) whose root is an overlayfs over the blocks
    it stored: the middle block of a load is still in the lower layer and the upper layer is full, so its
    touch (a copy-up) fails with ENOSPC while its read works. That block fails naming it, with that error,
    its bytes read once and not counted as moved; the others land, and nothing on disk or in the accounting
    changes. Before, the one-call load left the block to Python, which read it whole again before its touch
    failed the same way; and there, the error named no file and the block's bytes counted as moved."""
    big = PrimaryCache.create(16, 1 << 20)  # a second read of a block could not hide among the load's other reads
    try:
        config = TierConfig(max_bytes=16 * big.block_bytes, checksum=checksum)
        keys = make_keys(3)
        fill_random(big, range(3))
        tier = make_tier(view=big, root_dir=str(tmp_path / "lower"), config=config)
        assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2])).success
        tier.shutdown()
        with overlay(tmp_path / "lower", tmp_path, room="4m") as (mount, fill):
            tier = make_tier(view=big, root_dir=str(mount), config=config)
            wait_ready(tier)
            tier.drain(30)  # the start-up scan
            paths = [tier.block_path(k) for k in keys]
            for path in paths[::2]:
                os.utime(path)  # copied up to the upper layer: their touches need no room
            fill()
            with open(paths[1], "rb") as f:
                bad = os.stat(paths[1]).st_mtime_ns, f.read()
            counted, files = tier.stats().bytes_counted, sorted(mount.rglob("*"))
            readers = [os.getpid(), *tier.worker_pids()]
            read = sum(map(bytes_read, readers))
            loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[10, 11, 12]))
            read = sum(map(bytes_read, readers)) - read
            assert not loaded.success and loaded.successful_keys == (keys[0], keys[2]) and loaded.transfer_size == 2 * big.block_bytes
            assert loaded.error_code == "ENOSPC" and loaded.error.endswith("/".join(paths[1].split("/")[-3:])), loaded.error
            assert 3 * big.block_bytes <= read < 4 * big.block_bytes, f"{read} bytes read for 3 blocks of {big.block_bytes}"
            assert np.array_equal(big.array[[10, 12]], big.array[[0, 2]])
            with open(paths[1], "rb") as f:
                assert (os.stat(paths[1]).st_mtime_ns, f.read()) == bad
            assert (tier.stats().bytes_counted, sorted(mount.rglob("*"))) == (counted, files)
            assert tier.lookup_many(keys, probe=False) == [True] * 3
            tier.shutdown()
    finally:
        big.close()


GONE_ON_THE_SERVER = (  # a touch of the open file (the one-call load) or by its path (the Python path)
    "#include <errno.h>\n#include <stdlib.h>\n#include <sys/stat.h>\n"
    'int futimens(int fd, const struct timespec t[2]) { errno = atoi(getenv("FUTIMENS_ERRNO")); return -1; }\n'
    "int utimensat(int dir, const char *path, const struct timespec t[2], int flags) { return futimens(-1, t); }\n"
)
LOADED_THEN_GONE_HOST = textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
    with PrimaryCache.create(4, 65536) as cache:
        cache.array[0] = 7
        config = TierConfig(max_bytes=4 * 65536, checksum=sys.argv[2] == "checksum")
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], config=config)
        done = []
        for job in (JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]), JobMetadata(job_id=2, keys=[bytes(36)], block_ids=[1])):
            (tier.submit_store if job.job_id == 1 else tier.submit_load)(job)
            tier.drain(30)
            done += [(r.job_id, r.success, r.error_code, r.transfer_size) for r in tier.get_finished()]
        print(json.dumps([done, int(cache.array[1].min()), tier.lookup(bytes(36))]))
        tier.shutdown()
    """
)


@pytest.mark.parametrize("checksum", ["plain", "checksum"])
@pytest.mark.parametrize("code", ["ESTALE", "ENOENT"])
def test_a_loaded_block_removed_on_the_server_before_its_touch_is_loaded(tmp_path, code, checksum):
    """On NFS, a block another host removes between a load's read and its touch fails the touch (futimens on
    the open file) with ESTALE, or ENOENT on some FUSE file systems; a libc shim stands in for that server.
    The bytes were read whole from the file as it was: the block is loaded, as ``note_use`` has it for one
    removed meanwhile; a checksummed load's touch, by path, too. Each failed with that errno (the checksummed
    one with ESTALE only)."""
    env = {**libc_shim(tmp_path, "gone", GONE_ON_THE_SERVER), "FUTIMENS_ERRNO": str(getattr(errno, code))}
    host = subprocess.run(
        [sys.executable, "-c", LOADED_THEN_GONE_HOST, str(tmp_path / "blocks"), checksum], env=env, capture_output=True, text=True, timeout=60
    )
    assert host.returncode == 0, host.stderr
    assert json.loads(host.stdout) == [[[1, True, None, 65536], [2, True, None, 65536]], 7, True], host.stderr[-2000:]


@pytest.mark.parametrize("use", ["load", "store"])
def test_recency_and_accounting_survive_a_restart(make_tier, use):
    """A block used last (loaded, or stored again and found whole on disk) outlives older ones after a restart."""
    config = TierConfig(max_bytes=4 * BLOCK)
    tier = make_tier(config=config)
    a, b, c, d, e = make_keys(5)
    store_one_by_one(tier, [a, b, c, d])
    age_in_order(tier, [a, b, c, d])
    used = run_job(tier, use, JobMetadata(job_id=10, keys=[a], block_ids=[50]))
    assert used.success and tier.stats().blocks_skipped == (use == "store")
    tier.shutdown()
    restarted = make_tier(config=config)
    restarted.drain(30)  # the start-up scan runs in a worker
    assert restarted.stats().bytes_counted == 4 * BLOCK
    store_one_by_one(restarted, [e], first_job=20)
    assert present(restarted, [a, b, c, d, e]) == [True, False, True, True, True]


def test_a_restart_over_a_fuller_root_evicts_down_to_the_budget(make_tier):
    tier = make_tier()
    keys = make_keys(10)
    store_one_by_one(tier, keys)
    age_in_order(tier, keys)
    tier.shutdown()
    smaller = make_tier(config=TierConfig(max_bytes=6 * BLOCK))
    smaller.drain(30)
    smaller.drain(30)  # the evictions the scan triggered
    assert present(smaller, keys) == [False] * 4 + [True] * 6
    assert disk_bytes(smaller.layout.base) == 6 * BLOCK


def test_a_block_the_tier_evicted_is_never_answered_as_seen_elsewhere(make_tier):
    """A restarted tier probes a key before its start-up scan is read, so the probe counts it as seen on
    disk; then a store evicts it. lookup_many must stop answering True once the tier deleted it itself."""
    first = make_tier()
    old, new = make_keys(2)
    store_one_by_one(first, [old])
    first.shutdown()
    tier = make_tier(config=TierConfig(max_bytes=BLOCK))
    assert tier.lookup_many([old]) == [False]  # the scan's answer not read yet: a probe goes out
    tier.drain(30)
    assert tier.lookup_many([old]) == [True]
    store_one_by_one(tier, [new], first_job=1)
    assert present(tier, [old, new]) == [False, True]
    assert tier.lookup_many([old], probe=False) == [False]
    assert tier.lookup(old) is False


@pytest.fixture
def immutable():
    """``immutable(path)`` makes a file immutable (chattr +i: not even root unlinks it); undone after the test."""
    made: list[str] = []

    def make(path: str) -> None:
        done = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"chattr +i refused here: {done.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", path], check=True)


def test_a_block_that_cannot_be_deleted_stays_counted_and_the_budget_holds(make_tier, immutable, caplog):
    """The oldest block's file refuses its unlink (EPERM). The store that evicted it succeeds, the block
    counts again (as just used), no event calls it removed, and the host says why; the next store makes
    room among the others, so the disk is back within budget and the count matches the disk throughout."""
    tier = make_tier(config=TierConfig(max_bytes=4 * BLOCK, events=True))
    a, b, c, d, e, f = make_keys(6)
    store_one_by_one(tier, [a, b, c, d])
    age_in_order(tier, [a, b, c, d])
    immutable(tier.block_path(a))
    store_one_by_one(tier, [e], first_job=10)
    assert present(tier, [a, b, c, d, e]) == [True] * 5
    assert tier.stats().bytes_counted == disk_bytes(tier.layout.base) == 5 * BLOCK
    assert tier.lookup(a) is True
    assert any("EPERM" in r.getMessage() and "stay counted" in r.getMessage() for r in caplog.records)
    assert [event for event in tier.take_events() if event.kind == "removed"] == []  # a is still there
    store_one_by_one(tier, [f], first_job=11)
    assert present(tier, [a, b, c, d, e, f]) == [True, False, False, True, True, True]
    assert tier.stats().bytes_counted == disk_bytes(tier.layout.base) == 4 * BLOCK
    assert {key for event in tier.take_events() if event.kind == "removed" for key in event.keys} == {b, c}


@pytest.mark.parametrize("engine", ["processes"])
def test_evictions_of_a_task_that_never_ran_stay_counted_and_unreported(make_tier, engine):
    """Workers stopped, a store that evicts two blocks waits in the pipe, and shutdown cancels it: the
    two files were never deleted, so no event calls them removed and a restart still finds them."""
    tier = make_tier(config=TierConfig(max_bytes=4 * BLOCK, events=True, stop_timeout=1))
    keys = make_keys(6)
    store_one_by_one(tier, keys[:4])
    age_in_order(tier, keys[:4])
    tier.take_events()
    stop_processes(tier.worker_pids())
    tier.submit_store(JobMetadata(job_id=9, keys=keys[4:], block_ids=[4, 5]))
    tier.shutdown()  # kills the stopped workers after stop_timeout
    assert [(r.job_id, r.error_code) for r in tier.get_finished()] == [(9, "ECANCELED")]
    assert present(tier, keys) == [True] * 4 + [False] * 2
    assert [event for event in tier.take_events() if event.kind == "removed"] == []
    restarted = make_tier(config=TierConfig(max_bytes=4 * BLOCK))
    restarted.drain(30)
    assert restarted.lookup_many(keys[:4], probe=False) == [True] * 4


@pytest.mark.parametrize("engine", ["processes"])
def test_a_store_cancelled_before_any_worker_took_it_stops_counting(make_tier, engine):
    """Workers stopped, a store waits in the pipe and shutdown cancels it: no worker ever saw it, so its
    blocks are surely not on disk and stop counting, as a store a worker failed does."""
    tier = make_tier(config=TierConfig(stop_timeout=1))
    store_one_by_one(tier, make_keys(2, seed=1))
    stop_processes(tier.worker_pids())
    keys = make_keys(2, seed=2)
    tier.submit_store(JobMetadata(job_id=9, keys=keys, block_ids=[2, 3]))
    assert tier.stats().bytes_counted == 4 * BLOCK
    tier.shutdown()  # kills the stopped workers after stop_timeout
    assert [(r.job_id, r.error_code) for r in tier.get_finished()] == [(9, "ECANCELED")]
    assert present(tier, keys) == [False, False]
    assert tier.stats().bytes_counted == 2 * BLOCK, "blocks no worker ever saw are still counted"


@pytest.mark.parametrize("engine", ["processes"])
def test_a_store_sent_again_after_its_worker_died_stays_counted_when_shutdown_cancels_it(make_tier, tmp_path, monkeypatch, engine):
    """Both workers die partway through a store; it is sent again, but their replacements hang in their
    start, so shutdown cancels it in the pipe. The dead worker wrote some of its blocks, so they stay
    counted (under-counting would let the disk outgrow max_bytes), unlike a store no worker ever took."""
    from mp_tier import PrimaryCache
    from mp_tier.worker_process import TEST_PAUSE

    with PrimaryCache.create(20, 1 << 20) as big:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off", stop_timeout=1))
        wait_ready(tier)
        keys, pids = make_keys(20), tier.worker_pids()
        tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=list(range(20))))
        deadline = time.monotonic() + 20
        while not os.path.exists(tier.block_path(keys[0])):
            assert time.monotonic() < deadline, "the store never began"
        stop_processes(pids)
        written = sum(os.path.exists(tier.block_path(k)) for k in keys)
        marker = tmp_path / "booting"
        monkeypatch.setenv(TEST_PAUSE, f"boot:30:{marker}")  # the replacements' environment
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        while tier.stats().workers_restarted < 2 or len(marker.read_text().split() if marker.exists() else ()) < 2:
            assert time.monotonic() < deadline, "the dead workers were not replaced"
            tier.wait(0.05)
        for _ in range(3):  # the death settled: the task is back in the pipe, sent again
            tier.wait(0.05)
        assert tier.get_finished() == [] and 0 < written < 20
        tier.shutdown()
        assert [(r.job_id, r.error_code) for r in tier.get_finished()] == [(1, "ECANCELED")]
        assert tier.stats().bytes_counted == 20 << 20, "blocks a dead worker may have written stopped counting"


@pytest.mark.parametrize("engine", ["processes"])
def test_a_store_whose_worker_died_stays_counted_when_shutdown_comes_before_the_death_is_settled(make_tier, tmp_path, monkeypatch, engine):
    """The writer is SIGKILLed partway through a store while the other worker sits between reading a load
    and naming it, so the death cannot be settled yet (nor the writer replaced), and shutdown() comes then.
    The store is failed from the dead writer's slot: its blocks may be on disk (some are), so they stay
    counted, and the temp file it left is swept."""
    from mp_tier import PrimaryCache
    from mp_tier.worker_process import TEST_PAUSE

    marker = tmp_path / "claiming"
    monkeypatch.setenv(TEST_PAUSE, f"claim:5:{marker}")
    with PrimaryCache.create(20, 1 << 20) as big:
        config = TierConfig(o_direct="off", stop_timeout=1, io_depth=1)  # one lane: the other worker cannot take the store
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=config)
        wait_ready(tier)
        tier.submit_load(JobMetadata(job_id=1, keys=make_keys(1, seed=9), block_ids=[0]))
        deadline = time.monotonic() + 20
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline, "no worker took the load"
        claiming = int(marker.read_text())
        [writer] = [pid for pid in tier.worker_pids() if pid != claiming]
        keys = make_keys(20)
        tier.submit_store(JobMetadata(job_id=2, keys=keys, block_ids=list(range(20))))
        while not os.path.exists(tier.block_path(keys[0])):
            assert time.monotonic() < deadline, "the store never began"
        stop_processes([writer])
        written = sum(os.path.exists(tier.block_path(k)) for k in keys)
        os.kill(writer, signal.SIGKILL)
        while tier.stats().workers_alive > 1:  # its death seen; no replacement while it is being settled
            assert time.monotonic() < deadline, "the writer's death was not seen"
            tier.wait(0.005)
        assert tier.stats().workers_restarted == 0, "the death was settled already: nothing was tested"
        tier.shutdown()
        codes = {r.job_id: r.error_code for r in tier.get_finished()}
        assert codes.get(2) is not None and 0 < written < 20, (codes, written)
        assert tier.stats().bytes_counted == 20 << 20, "blocks a dead worker wrote stopped counting"
        assert list((tmp_path / "blocks").rglob(f"*{TEMP_SUFFIX}")) == []


OTHER_WRITER = textwrap.dedent(
    """
    import sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    if __name__ == "__main__":
        keys = [bytes([7, i]) * 16 + bytes(4) for i in range(int(sys.argv[2]))]
        with PrimaryCache.create(len(keys), {block}) as cache, FileSystemTierManager(
            primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1
        ) as tier:
            tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=list(range(len(keys)))))
            tier.drain(30)
            assert tier.get_finished()[0].success
    """
).format(block=BLOCK)


def test_lookup_many_agrees_with_the_file_system(make_tier, tmp_path):
    tier = make_tier()
    own = make_keys(30)
    tier.submit_store(JobMetadata(job_id=1, keys=own[:20], block_ids=list(range(20))))
    in_flight = tier.lookup_many(own[:20])
    assert all(answer in (None, True) for answer in in_flight)
    tier.drain(30)
    subprocess.run([sys.executable, "-c", OTHER_WRITER, str(tmp_path / "blocks"), "10"], check=True, timeout=60)
    theirs = [bytes([7, i]) * 16 + bytes(4) for i in range(10)]
    keys = own + theirs + make_keys(5, seed=99)
    first = tier.lookup_many(keys)  # from memory: the other instance's blocks are not known yet
    assert first == [True] * 20 + [False] * 25
    tier.drain(30)  # the background probes' completions are read
    assert [r.job_id for r in tier.get_finished()] == [1]
    answers = tier.lookup_many(keys)
    assert answers == [os.path.exists(tier.block_path(k)) for k in keys]
    assert answers == [True] * 20 + [False] * 10 + [True] * 10 + [False] * 5
    os.unlink(tier.block_path(theirs[0]))  # the other instance evicts one
    assert not run_job(tier, "load", JobMetadata(job_id=2, keys=theirs[:1], block_ids=[0])).success
    assert tier.lookup_many(theirs[:1]) == [False]
    assert tier.lookup_many([]) == []
    with pytest.raises(ValueError, match="not bytes"):
        tier.lookup_many(["nope"])


def test_events_for_store_eviction_and_corruption(make_tier):
    tier = make_tier(config=TierConfig(max_bytes=2 * BLOCK, events=True))
    a, b, c = make_keys(3)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[a, b], block_ids=[0, 1])).success
    assert tier.take_events() == [TierEvent("stored", (a, b))]
    assert run_job(tier, "store", JobMetadata(job_id=2, keys=[c], block_ids=[2])).success
    assert tier.take_events() == [TierEvent("removed", (a,)), TierEvent("stored", (c,))]
    os.truncate(tier.block_path(b), 10)
    assert not run_job(tier, "load", JobMetadata(job_id=3, keys=[b, c], block_ids=[5, 6])).success
    assert tier.take_events() == [TierEvent("removed", (b,))]
    assert tier.take_events() == []


def test_events_are_off_by_default(tier):
    with pytest.raises(ValueError, match="events are off"):
        tier.take_events()


SHARER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig

    def content(key):
        return np.frombuffer(key * ({block} // len(key)) + bytes({block} % len(key)), dtype=np.uint8)

    if __name__ == "__main__":
        root, name, budget, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        rng = np.random.default_rng(name)
        keys = [bytes([name, i % 256, i // 256]) * 11 + bytes(1) + bytes(4) for i in range(200)]
        torn = failed_loads = results = submitted = 0
        with PrimaryCache.create(64, {block}) as cache, FileSystemTierManager(
            primary_kv_view=cache, root_dir=root, n_read_workers=1, n_write_workers=1,
            config=TierConfig(max_bytes=budget)
        ) as tier:
            deadline = time.monotonic() + seconds
            job = 0
            while time.monotonic() < deadline:
                job += 1
                chosen = [keys[i] for i in rng.choice(200, 8, replace=False)]
                for slot, key in enumerate(chosen):
                    cache.array[slot] = content(key)
                tier.submit_store(JobMetadata(job_id=2 * job, keys=chosen, block_ids=list(range(8))))
                probe = [keys[i] for i in rng.choice(200, 8, replace=False)]
                known = [k for k, here in zip(probe, tier.lookup_many(probe)) if here]
                cache.array[32:40] = 0
                tier.submit_load(JobMetadata(job_id=2 * job + 1, keys=known, block_ids=list(range(32, 32 + len(known)))))
                submitted += 2
                tier.drain(30)
                for r in tier.get_finished():
                    results += 1
                    if r.job_id % 2 == 1:
                        ok = set(known) if r.success else set(r.successful_keys)
                        failed_loads += len(known) - len(ok)
                        torn += sum(not (cache.array[32 + i] == content(k)).all() for i, k in enumerate(known) if k in ok)
        print(submitted, results, torn, failed_loads)
    """
).format(block=BLOCK)


@pytest.mark.timeout(120)
def test_two_instances_with_budgets_share_a_root(tmp_path):
    """Both run at once, each with its own budget: no torn load, no lost result, and the
    directory never holds more than both budgets (plus one in-flight job each)."""
    root = str(tmp_path / "blocks")
    budgets = (12 * BLOCK, 20 * BLOCK)
    procs = [
        subprocess.Popen([sys.executable, "-c", SHARER, root, str(n), str(b), "4"], stdout=subprocess.PIPE, text=True)
        for n, b in zip((1, 2), budgets)
    ]
    base = os.path.join(root, NAMESPACE)
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, disk_bytes(base))  # nothing until the namespace exists
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for submitted, results, torn, _ in outputs:
        assert int(submitted) == int(results) > 0 and int(torn) == 0
    assert peak <= sum(budgets) + 2 * 8 * BLOCK
    assert disk_bytes(base) <= sum(budgets)


def test_a_store_of_a_block_being_evicted_is_refused_not_lost(make_tier):
    tier = make_tier(config=TierConfig(max_bytes=2 * BLOCK))
    a, b, c = make_keys(3)
    store_one_by_one(tier, [a, b])
    tier.submit_store(JobMetadata(job_id=10, keys=[c], block_ids=[2]))  # evicts a
    tier.submit_store(JobMetadata(job_id=11, keys=[a], block_ids=[0]))  # before a's file is surely gone
    tier.drain(30)
    results = {r.job_id: r for r in tier.get_finished()}
    assert results[10].success
    assert not results[11].success and results[11].error_code == "EBUSY"
    store_one_by_one(tier, [a], first_job=12)  # the eviction is done: now it stores (evicting b)
    assert present(tier, [a, b, c]) == [True, False, True]


def test_a_block_a_load_finds_missing_stops_counting_but_not_others(make_tier, tmp_path):
    tier = make_tier(config=TierConfig(max_bytes=8 * BLOCK))
    gone, planted, kept = make_keys(3)
    store_one_by_one(tier, [gone, planted, kept])
    os.unlink(tier.block_path(gone))  # another instance deleted it
    os.unlink(tier.block_path(planted))
    os.mkdir(tier.block_path(planted))  # something is there, just not a block: it still takes room
    result = run_job(tier, "load", JobMetadata(job_id=10, keys=[gone, planted, kept], block_ids=[0, 1, 2]))
    assert result.successful_keys == (kept,)
    assert tier.lookup_many([gone, planted, kept]) == [False, True, True]
    assert tier.stats().bytes_counted == 2 * BLOCK


def test_a_store_that_lands_while_a_load_misses_keeps_counting():
    """Completions of different workers arrive in any order: a load's ENOENT that a store has since
    made stale must not uncount the new file (else the budget under-counts the disk)."""
    residency = Residency(CapacityIndex(BLOCK, 8 * BLOCK, evict=True), events=False, namespace=(0, 0))
    key = make_keys(1)[0]
    residency.commit(Op.LOAD, [key], residency.prepare(Op.LOAD, [key]))  # the load runs first and finds no file...
    residency.commit(Op.STORE, [key], residency.prepare(Op.STORE, [key]))
    residency.store_done([key], [])  # ...the store's completion arrives first
    residency.missing([key])
    residency.load_done([key])
    assert key in residency.capacity and not residency.restored
    residency.commit(Op.LOAD, [key], residency.prepare(Op.LOAD, [key]))  # a later miss, with no store since, is believed
    residency.missing([key])
    residency.load_done([key])
    assert key not in residency.capacity
    residency.probed([key], [])  # another instance wrote it, a probe found it ...
    residency.commit(Op.LOAD, [key], residency.prepare(Op.LOAD, [key]))
    residency.commit(Op.STORE, [key], residency.prepare(Op.STORE, [key]))
    residency.store_done([key], [0])  # ... our store of it failed, landing nothing: the miss is believed
    residency.missing([key])
    residency.load_done([key])
    assert residency.lookup_many([key]) == ([False], [key])


def test_a_probe_that_crossed_a_deletion_is_not_believed():
    """A probe sees a block's file; before its answer is read this tier evicts the block. The stale answer
    must not make lookups say True, no second probe of the key goes out meanwhile, and after the stale
    one is read a new probe may go out; a probe that finds the file gone clears the key."""
    residency = Residency(CapacityIndex(BLOCK, 2 * BLOCK, evict=True), events=True, namespace=(0, 0))
    key, a, b = make_keys(3)
    residency.commit(Op.STORE, [key], residency.prepare(Op.STORE, [key]))
    residency.store_done([key], [])
    residency.capacity.discard([key])  # counted by nobody now, as after a restart before the scan is read
    assert residency.lookup_many([key]) == ([False], [key])
    residency.probe_sent([key])
    residency.capacity.adopt([key])  # the scan's answer arrives: counted again
    for other in (a, b):
        residency.commit(Op.STORE, [other], admission := residency.prepare(Op.STORE, [other]))
        residency.store_done([other], [])
        residency.evicted(admission.victims, [], None)
    assert key not in residency.capacity and TierEvent("removed", (key,)) in residency.take_events()
    assert residency.lookup_many([key]) == ([False], [])  # the first probe is still out
    residency.probed([key], [])  # it saw the file before the eviction deleted it
    assert residency.lookup_many([key]) == ([False], [key])
    residency.probe_sent([key])
    residency.probed([key], [])  # another instance stored it since: believed
    assert residency.lookup_many([key]) == ([True], [])
    residency.probe_sent([key])  # (a caller may probe anyway, as lookup() does)
    residency.probed([key], [0])  # and deleted it again
    assert residency.lookup_many([key]) == ([False], [key])


def test_a_restart_over_a_fuller_root_with_eviction_off_deletes_nothing(make_tier):
    """eviction = "fail" promises that the tier never deletes a block to make room: restarted with a budget
    smaller than what the root holds, it keeps every block, counts them all, and fails the next store of a new
    block (ENOSPC) rather than delete others. The start-up scan evicted the oldest as if eviction were on."""
    tier = make_tier()
    keys = make_keys(7)
    store_one_by_one(tier, keys[:6])
    tier.shutdown()
    fail = make_tier(config=TierConfig(max_bytes=4 * BLOCK, eviction="fail"))
    fail.drain(30)
    fail.drain(30)  # any evictions the scan triggered
    assert present(fail, keys[:6]) == [True] * 6
    assert fail.stats().bytes_counted == disk_bytes(fail.layout.base) == 6 * BLOCK and fail.stats().blocks_evicted == 0
    refused = run_job(fail, "store", JobMetadata(job_id=9, keys=keys[6:], block_ids=[0]))
    assert not refused.success and refused.error_code == "ENOSPC" and "eviction is off" in (refused.error or "")
    assert present(fail, keys) == [True] * 6 + [False]


def test_a_block_removed_by_someone_else_is_reported_removed_once_a_load_finds_it_gone(make_tier):
    """An operator (or another instance) deletes one block file while the tier runs. The tier reported it
    stored; once a load finds it gone the tier forgets it, and says so in a "removed" event, as it does for a
    namespace removed whole: a router told where the block lives would otherwise keep sending requests for it.
    A key the tier never counted (never stored here) gets no event."""
    tier = make_tier(config=TierConfig(max_bytes=8 * BLOCK, events=True))
    gone, kept, never = make_keys(3)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[gone, kept], block_ids=[0, 1])).success
    assert tier.take_events() == [TierEvent("stored", (gone, kept))]
    os.unlink(tier.block_path(gone))
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=[gone, kept, never], block_ids=[5, 6, 7]))
    assert loaded.successful_keys == (kept,) and loaded.error_code == "ENOENT"
    assert tier.lookup_many([gone, kept], probe=False) == [False, True] and tier.stats().bytes_counted == BLOCK
    assert tier.take_events() == [TierEvent("removed", (gone,))]


def test_a_store_over_a_block_of_another_size_replaces_it_and_the_count_matches_the_disk(make_tier, cache):
    """Someone cut one counted block short and grew another to three blocks: a store of both keys writes
    them again whole (a file of the wrong size is no block to skip), and the count still matches the disk."""
    tier = make_tier(config=TierConfig(max_bytes=4 * BLOCK))
    short, long = make_keys(2)
    fill_random(cache, range(4))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[short, long], block_ids=[0, 1])).success
    os.truncate(tier.block_path(short), 10)
    os.truncate(tier.block_path(long), 3 * BLOCK)
    again = run_job(tier, "store", JobMetadata(job_id=2, keys=[short, long], block_ids=[2, 3]))
    assert again.success and again.transfer_size == 2 * BLOCK, again
    assert [os.path.getsize(tier.block_path(k)) for k in (short, long)] == [BLOCK, BLOCK]
    assert tier.stats().bytes_counted == disk_bytes(tier.layout.base) == 2 * BLOCK
    assert run_job(tier, "load", JobMetadata(job_id=3, keys=[short, long], block_ids=[10, 11])).success
    assert np.array_equal(cache.array[10:12], cache.array[2:4])


def test_a_file_of_another_size_at_a_blocks_name_is_no_block_for_lookups_or_probes(tier):
    """Someone cuts a stored block short, and plants a short file at another key's name. A load would fail
    both (EBADMSG) and a store would write them again, so neither is a block: ``lookup`` (exact) says False,
    and a background probe does not teach ``lookup_many`` True. A whole block planted beside them is found."""
    cut, planted, whole = make_keys(3)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[cut], block_ids=[0])).success
    os.truncate(tier.block_path(cut), BLOCK // 2)
    for key, size in ((planted, 100), (whole, BLOCK)):
        os.makedirs(os.path.dirname(tier.block_path(key)), exist_ok=True)
        with open(tier.block_path(key), "wb") as f:
            f.write(bytes(size))
    assert [tier.lookup(k) for k in (cut, planted, whole)] == [False, False, True]
    assert tier.lookup_many([planted, whole]) == [False, False]
    tier.drain(30)  # the probes' completions are read
    assert tier.lookup_many([planted, whole], probe=False) == [False, True]
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=[cut, planted], block_ids=[5, 6]))
    assert not loaded.success and loaded.successful_keys == () and loaded.error_code == "EBADMSG"


def test_a_failed_store_of_a_counted_block_leaves_it_counted(make_tier, tmp_path):
    """A failed store never changes the file at its block's name (it writes a temp file and renames it), so a
    block counted before the store is still on disk after it failed. Here the root is an overlayfs whose upper
    layer is full, as a full btrfs refuses even a metadata update: a store of a block already whole in the
    lower layer skips the write, and its touch (a copy-up) fails with ENOSPC. The store fails, naming it, but
    the block stays counted: the tier forgot it, so the count fell below the disk and lookup_many said False
    for a block lookup found, and the disk could outgrow max_bytes."""
    config = TierConfig(max_bytes=4 * BLOCK)
    counted, other = make_keys(2)
    tier = make_tier(root_dir=str(tmp_path / "lower"), config=config)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[counted, other], block_ids=[0, 1])).success
    tier.shutdown()
    with overlay(tmp_path / "lower", tmp_path, room="1m") as (mount, fill):
        tier = make_tier(root_dir=str(mount), config=config)
        wait_ready(tier)
        tier.drain(30)  # the start-up scan
        fill()
        again = run_job(tier, "store", JobMetadata(job_id=2, keys=[counted], block_ids=[0]))
        assert not again.success and again.error_code == "ENOSPC" and again.error.endswith(os.path.basename(tier.block_path(counted)))
        assert tier.stats().bytes_counted == disk_bytes(tier.layout.base) == 2 * BLOCK
        assert tier.lookup_many([counted, other], probe=False) == [True, True] and tier.lookup(counted) is True
        tier.shutdown()


def test_a_restart_over_thousands_of_blocks_and_stale_temp_files_keeps_the_newest_and_this_runs_stores(make_tier):
    """3,000 blocks of a crashed run (their mtimes in LRU order) and the temp files its dead writers left; the
    restarted tier, budgeted for 1,000, stores 48 new blocks while its start-up scan runs. The scan arrives in
    dozens of completions: every block it found is older than this run's, so exactly the 2,048 oldest are
    evicted (and reported removed), the temp files are swept and never counted, and the count matches the disk."""
    with PrimaryCache.create(64, 4096) as small:
        first = make_tier(view=small)
        old, new = make_keys(3000, seed=5), make_keys(48, seed=6)
        paths = [first.block_path(k) for k in old]
        first.shutdown()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        now = time.time()
        for i, path in enumerate(paths):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            for name in (path, f"{path}.{HOST_TAG}.{int(dead.stdout)}.{i}{TEMP_SUFFIX}") if i % 100 == 0 else (path,):
                with open(name, "wb") as f:
                    f.write(bytes(4096))
            os.utime(path, (now - 10_000 + i, now - 10_000 + i))
        tier = make_tier(view=small, config=TierConfig(max_bytes=1000 * 4096, events=True))
        for job in range(6):
            tier.submit_store(JobMetadata(job_id=job, keys=new[8 * job : 8 * job + 8], block_ids=list(range(8))))
        tier.drain(30)
        tier.drain(30)  # the evictions the scan triggered
        assert [r.success for r in tier.get_finished()] == [True] * 6
        assert present(tier, new) == [True] * 48 and present(tier, old) == [False] * 2048 + [True] * 952
        assert tier.stats().bytes_counted == disk_bytes(tier.layout.base) == 1000 * 4096 and tier.stats().files_removed == 30
        assert sorted(k for event in tier.take_events() if event.kind == "removed" for k in event.keys) == sorted(old[:2048])
        tier.shutdown()


GONE_AT_ITS_STAT = (  # NFS: a name another client removed since it was listed can stat as ESTALE, not ENOENT
    "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <errno.h>\n#include <stdlib.h>\n#include <string.h>\n#include <sys/stat.h>\n"
    "int fstatat64(int dir, const char *path, struct stat64 *st, int flags) {\n"
    '    static int (*real)(int, const char *, struct stat64 *, int);\n    const char *gone = getenv("STALE_NAME");\n'
    "    if (gone && strstr(path, gone)) { errno = ESTALE; return -1; }\n"
    '    if (!real) real = (int (*)(int, const char *, struct stat64 *, int))dlsym(RTLD_NEXT, "fstatat64");\n'
    "    return real(dir, path, st, flags);\n}\n"
)
COUNTING_HOST = textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, PrimaryCache, TierConfig
    with PrimaryCache.create(4, 65536) as cache:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], config=TierConfig(max_bytes=8 * 65536))
        tier.drain(30)
        keys = [bytes.fromhex(key) for key in sys.argv[2:]]
        print(json.dumps([tier.stats().bytes_counted, tier.lookup_many(keys, probe=False)]))
        tier.shutdown()
    """
)


def test_a_block_that_stats_stale_during_the_start_up_scan_is_passed_over_not_the_whole_scan(tmp_path):
    """On NFS, a block file another client removed between the scan's listing and its stat answers ESTALE (a libc
    shim stands in for the server). That block is gone, like one that answers ENOENT: the scan passes over it and
    counts the others. It failed whole, so a budgeted tier counted nothing of what the root held."""
    tier_keys = make_keys(4)
    with PrimaryCache.create(4, BLOCK) as cache:
        first = FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "blocks"), n_read_workers=1, n_write_workers=1)
        assert run_job(first, "store", JobMetadata(job_id=1, keys=tier_keys, block_ids=[0, 1, 2, 3])).success
        stale = os.path.basename(first.block_path(tier_keys[1]))
        first.shutdown()
    env = {**libc_shim(tmp_path, "stale", GONE_AT_ITS_STAT), "STALE_NAME": stale}
    host = subprocess.run(
        [sys.executable, "-c", COUNTING_HOST, str(tmp_path / "blocks"), *(k.hex() for k in tier_keys)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert host.returncode == 0, host.stderr
    assert json.loads(host.stdout) == [3 * BLOCK, [True, False, True, True]], host.stderr[-2000:]


STALE_AT_ITS_FSTAT = (  # NFS: a file another client removed after this one opened it answers fstat with ESTALE
    "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <errno.h>\n#include <stdlib.h>\n#include <string.h>\n#include <sys/stat.h>\n"
    + SHIM_FD_PATH
    + "int fstat64(int fd, struct stat64 *st) {\n"
    '    static int (*real)(int, struct stat64 *);\n    const char *gone = getenv("STALE_NAME");\n'
    "    if (gone && strstr(fd_path(fd), gone)) { errno = ESTALE; return -1; }\n"
    '    if (!real) real = (int (*)(int, struct stat64 *))dlsym(RTLD_NEXT, "fstat64");\n'
    "    return real(fd, st);\n}\n"
)
LOOKING_HOST = textwrap.dedent(
    """
    import json, os, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    with PrimaryCache.create(4, 65536) as cache:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
        keys = [bytes([7]) * 32 + bytes(4), bytes([8]) * 32 + bytes(4)]
        tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=[0, 1]))
        tier.drain(30)
        assert tier.get_finished()[0].success
        os.environ["STALE_NAME"] = os.path.basename(tier.block_path(keys[0]))  # this host's calls only: the workers started
        try:
            print(json.dumps([tier.lookup(k) for k in keys]))
        finally:
            tier.shutdown()
    """
)


def test_a_lookup_of_a_block_another_nfs_client_just_removed_is_false_not_an_error(tmp_path):
    """``lookup`` runs in the engine's scheduler. On NFS, a block another client removed between this lookup's
    open and its fstat answers ESTALE (a libc shim stands in for the server): the block is gone, so the answer is
    False. lookup raised the OSError into the scheduler."""
    env = libc_shim(tmp_path, "stale_fstat", STALE_AT_ITS_FSTAT)
    host = subprocess.run([sys.executable, "-c", LOOKING_HOST, str(tmp_path / "blocks")], env=env, capture_output=True, text=True, timeout=60)
    assert host.returncode == 0, host.stderr[-2000:]
    assert json.loads(host.stdout) == [False, True]


@pytest.mark.parametrize("eviction", ["lru", "fail"])
def test_a_store_larger_than_the_whole_budget_is_refused_saying_so(make_tier, eviction):
    """max_bytes of exactly one block, and a 2-block store: no eviction can ever make room, so the refusal says
    that, not that too few blocks are free to evict (or that eviction is off), which a caller would retry."""
    tier = make_tier(config=TierConfig(max_bytes=BLOCK, eviction=eviction))
    a, b = make_keys(2)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[a], block_ids=[0])).success
    refused = run_job(tier, "store", JobMetadata(job_id=2, keys=[a, b], block_ids=[0, 1]))
    assert not refused.success and refused.error_code == "ENOSPC"
    assert refused.error == f"ENOSPC: a store of 2 blocks of {BLOCK} bytes exceeds max_bytes {BLOCK} whatever is evicted", refused.error
    assert present(tier, [a, b]) == [True, False] and tier.stats().bytes_counted == BLOCK


def test_a_tier_with_a_small_budget_evicts_only_blocks_it_counts_beside_another_tier(make_tier, tmp_path):
    """Tier A (2 blocks) has scanned the root when tier B, another process with no budget, stores 10 blocks
    there; then A stores 5. A makes room among its own blocks only: all 10 of B's stay, and A keeps its 2 newest."""
    tier = make_tier(config=TierConfig(max_bytes=2 * BLOCK))
    tier.drain(30)  # the start-up scan: an empty root
    subprocess.run([sys.executable, "-c", OTHER_WRITER, str(tmp_path / "blocks"), "10"], check=True, timeout=60)
    theirs = [bytes([7, i]) * 16 + bytes(4) for i in range(10)]
    ours = make_keys(5)
    store_one_by_one(tier, ours)
    assert present(tier, theirs) == [True] * 10 and present(tier, ours) == [False] * 3 + [True] * 2
    assert tier.stats().bytes_counted == 2 * BLOCK and tier.stats().blocks_evicted == 3
