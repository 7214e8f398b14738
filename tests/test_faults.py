"""Faults provoked for real: killed workers, a killed host, a full file system, stale temp files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import BLOCK, bytes_read, fill_random, make_keys, mounted, processes_stopped, run_job, small_ext4, wait_exit, wait_ready

from mp_tier import JobMetadata, PrimaryCache, TierBroken, TierConfig
from mp_tier.layout import HOST_TAG, TEMP_SUFFIX, is_temp, temp_name, temp_writer_pid
from mp_tier.recovery import BOOTING_AT_ONCE, STARTUP_WINDOW_SECONDS


@pytest.fixture
def engine() -> str:
    """Only processes can die alone."""
    return "processes"


def test_sigkill_of_a_worker_mid_run(make_tier, cache):
    tier = make_tier()
    fill_random(cache, range(256))
    for j in range(1000):
        tier.submit_store(JobMetadata(job_id=j, keys=make_keys(1, seed=j), block_ids=[j % 256]))
    results: dict = {}
    while len(results) < 200:
        tier.wait(10)
        results.update((r.job_id, r) for r in tier.get_finished())
    victim = tier.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_exit(victim, 5)
    while tier.stats().workers_restarted == 0:
        results.update((r.job_id, r) for r in tier.get_finished())  # the polling that notices the death
        assert time.monotonic() - killed_at < 1.0, "death not noticed within 1 s of polling"
    assert victim not in tier.worker_pids() and len(tier.worker_pids()) == 4
    for j in range(1000, 2000):
        tier.submit_store(JobMetadata(job_id=j, keys=make_keys(1, seed=j), block_ids=[j % 256]))
    tier.drain(60)
    for r in tier.get_finished():
        assert r.job_id not in results
        results[r.job_id] = r
    assert sorted(results) == list(range(2000))
    assert all(results[j].success for j in range(1000, 2000))
    failed = [r for r in results.values() if not r.success]
    assert all(r.error_code == "EOWNERDEAD" and "died" in r.error for r in failed)
    assert tier.stats().workers_alive == 4


def test_a_worker_that_cannot_start_breaks_the_tier(make_tier, tmp_path, monkeypatch):
    """Its interpreter is gone (a venv removed under a running host): replacements fail for the whole
    start-up window, with back-off between tries, and then the tier breaks; every job still gets a result."""
    tier = make_tier()
    keys = make_keys(40)
    for j, key in enumerate(keys):
        tier.submit_store(JobMetadata(job_id=j, keys=[key], block_ids=[j]))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "removed-venv" / "python"))
    for pid in tier.worker_pids():
        os.kill(pid, signal.SIGKILL)
    results: dict = {}
    started = time.monotonic()
    with pytest.raises(TierBroken, match=r"workers in a row died while starting over .* could not start: ENOENT"):
        while True:
            assert time.monotonic() - started < 30
            tier.wait(1)
            results.update((r.job_id, r) for r in tier.get_finished())
    assert time.monotonic() - started >= STARTUP_WINDOW_SECONDS
    assert sorted(results) == list(range(40)), "every job still gets one result"
    failed = [r for r in results.values() if not r.success]
    assert all(r.error_code in ("EOWNERDEAD", "ENOTRECOVERABLE") for r in failed), {r.error_code for r in failed}
    for call in (lambda: tier.submit_load(JobMetadata(job_id=99, keys=keys[:1], block_ids=[0])), tier.get_finished, tier.drain):
        with pytest.raises(TierBroken):
            call()
    assert tier.worker_pids() == []


def test_a_few_workers_killed_as_they_start_do_not_break_the_tier(make_tier, cache):
    """Three replacements in a row SIGKILLed before they are ready: back-off, not a broken tier."""
    tier = make_tier()
    wait_ready(tier)
    known = set(tier.worker_pids())
    os.kill(next(iter(known)), signal.SIGKILL)
    kills = 1
    deadline = time.monotonic() + 20
    while kills < 4:
        assert time.monotonic() < deadline
        tier.wait(0.001)
        tier.get_finished()
        for pid in set(tier.worker_pids()) - known:
            known.add(pid)
            os.kill(pid, signal.SIGKILL)
            kills += 1
    wait_ready(tier)
    fill_random(cache, [0])
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    assert tier.stats().workers_restarted >= 4


def test_a_mass_death_is_replaced_a_few_boots_at_a_time(make_tier):
    """All eight workers SIGKILLed at once: the replacements boot at most BOOTING_AT_ONCE at a time (a crowd
    of interpreters booting on few cores would starve the host's own polls), and all come back."""
    tier = make_tier(n_read_workers=4, n_write_workers=4)
    wait_ready(tier)
    for pid in tier.worker_pids():
        os.kill(pid, signal.SIGKILL)
    most_booting = 0
    deadline = time.monotonic() + 30
    while (stats := tier.stats()).workers_restarted < 8 or stats.workers_starting:
        assert time.monotonic() < deadline, stats
        most_booting = max(most_booting, stats.workers_starting)
        tier.wait(0.05)
    assert 1 <= most_booting <= BOOTING_AT_ONCE < 8
    assert stats.workers_alive == 8
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success


HOST = textwrap.dedent(
    """
    import json, os, signal, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    for name in ("SIGHUP", "SIGTERM"):  # a runner under nohup passes SIGHUP on ignored: this host dies of them
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    cache = PrimaryCache.create(16, 65536)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=2)
    for j in range(200):
        tier.submit_store(JobMetadata(job_id=j, keys=[j.to_bytes(32, "big") + bytes(4)], block_ids=[j % 16]))
    children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    janitor = [int(p) for p in children if b"mp_tier.janitor" in open(f"/proc/{p}/cmdline", "rb").read()]
    print(json.dumps({"pids": tier.worker_pids(), "shm": cache.name, "janitor": janitor[0]}), flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM to its group", "SIGHUP to its group"])
def test_workers_and_segment_do_not_outlive_a_killed_host(tmp_path, how):
    """A host killed alone, or with its whole process group (a shell's kill -TERM -PGID, systemd's stop):
    its workers go with it, and the janitor, in a session of its own, still unlinks the segment."""
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, str(tmp_path / "blocks")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        info = json.loads(host.stdout.readline())
    finally:
        if how == "SIGKILL":
            host.kill()
        else:
            os.killpg(host.pid, signal.Signals[how.split()[0]])
        host.wait(timeout=10)
    for pid in info["pids"]:
        assert wait_exit(pid, 2.0), f"worker {pid} outlived its host by 2 s"
    assert wait_exit(info["janitor"], 10)
    assert not os.path.exists(f"/dev/shm/{info['shm']}")
    host.stdin.close()
    host.stdout.close()


def test_restart_removes_temp_files_of_dead_writers_only(make_tier, tmp_path):
    tier = make_tier()
    keys = make_keys(4)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3])).success
    tier.shutdown()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    paths = [tier.block_path(k) for k in keys]
    orphan = f"{paths[0]}.{HOST_TAG}.{int(dead.stdout)}.0.tmp"  # its writer on this host is gone
    live = f"{paths[1]}.{HOST_TAG}.{os.getpid()}.0.tmp"  # this process is alive: its temp file must stay
    foreign = f"{paths[2]}.0badc0de.123.0.tmp"  # another host's writer may be alive: it stays ...
    stale = f"{paths[3]}.0badc0de.123.0.tmp"  # ... until it is an hour old
    huge_pid = f"{paths[3]}.{HOST_TAG}.99999999999999999999.0.tmp"  # not a pid: never fatal, kept until stale
    for path in (orphan, live, foreign, stale, huge_pid):
        with open(path, "wb") as f:
            f.write(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    tier2 = make_tier()
    tier2.drain(30)  # the start-up sweep runs in a worker
    assert tier2.stats().files_removed == 2
    assert [os.path.exists(p) for p in (orphan, live, foreign, stale, huge_pid)] == [False, True, True, False, True]
    assert tier2.stats().workers_restarted == 0
    for path in (live, foreign, huge_pid):
        os.unlink(path)


def test_a_forked_child_names_its_temp_files_with_its_own_pid():
    """A worker forked from a process that already made temp names (a fork server) is a writer of its own:
    the sweep above must not read the parent's pid in its temp files (a live writer's), nor its own in the
    parent's."""
    temp_name("x.bin")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, str(temp_writer_pid(temp_name("x.bin"))).encode())
        os._exit(0)
    os.close(write)
    try:
        named = int(os.read(read, 32))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert named == pid and temp_writer_pid(temp_name("x.bin")) == os.getpid()


@pytest.mark.parametrize("then", ["restart", "shutdown"])
@pytest.mark.parametrize("swap", ["symlink", "file"])
def test_a_dead_writers_directory_swapped_for_something_else_is_passed_over(make_tier, tmp_path, swap, then):
    """Writers die holding a store whose directory is then replaced by a symlink (to a directory holding a
    temp file of theirs) or a plain file. Sweeping up after them neither follows the link nor fails: no
    worker dies of it, shutdown() does not raise, the job gets its one result, and later stores work."""
    big = PrimaryCache.create(4, 64 << 20)
    try:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off", stop_timeout=1))
        wait_ready(tier)
        keys = make_keys(4)
        leaves = [os.path.dirname(tier.block_path(k)) for k in keys]
        tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3]))
        writing = None
        deadline = time.monotonic() + 10
        while writing is None:  # no pump runs until the host calls the tier: the deaths wait for us
            assert time.monotonic() < deadline, "no store was seen in progress"
            writing = next((d for d in leaves if os.path.isdir(d) and any(is_temp(n) for n in os.listdir(d))), None)
        workers = tier.worker_pids()
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        os.rename(writing, writing + ".moved")
        outside = tmp_path / "outside"
        outside.mkdir()
        bait = [outside / n for n in os.listdir(writing + ".moved") if is_temp(n)]
        for path in bait:
            path.write_bytes(b"not the tier's")
        if swap == "symlink":
            os.symlink(outside, writing)
        else:
            open(writing, "w").close()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
            assert wait_exit(pid, 5)
        if then == "shutdown":
            tier.shutdown()
            results = tier.get_finished()
        else:
            results = []
            while not results:
                assert tier.wait(30)
                results = tier.get_finished()
        assert [r.job_id for r in results] == [1] and not results[0].success
        assert all(path.exists() for path in bait) and bait
        if then == "restart":
            fill_random(big, [0])
            assert run_job(tier, "store", JobMetadata(job_id=2, keys=make_keys(1, seed=9), block_ids=[0])).success
            tier.drain(30)
            assert tier.stats().workers_restarted == len(workers)
        tier.shutdown()
        shutil.rmtree(writing + ".moved")  # the dead writers' temp files, out of the tier's reach
        shutil.rmtree(outside)
    finally:
        big.close()


def test_a_store_lost_twice_still_counts_the_blocks_it_wrote(make_tier):
    """Each writer of a store is stopped once a block of the job has landed, so the tier kills it at
    task_timeout, twice, and the job fails. The blocks that did land stay counted: the budget may
    over-count what a dead writer left unfinished, never under-count what is on disk. Each writer must land
    its first block within task_timeout: 8 MiB of 160 (20 blocks, one task), under 1 s, on a loaded host too."""
    big = PrimaryCache.create(20, 8 << 20)
    try:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off", task_timeout=1))
        wait_ready(tier)
        keys = make_keys(20)
        tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=list(range(20))))
        leaves = {os.path.dirname(tier.block_path(k)) for k in keys}
        stopped: set[int] = set()
        results: list = []
        deadline = time.monotonic() + 30
        while not results:
            assert time.monotonic() < deadline
            if any(os.path.exists(tier.block_path(k)) for k in keys):
                writing = {temp_writer_pid(n) for d in leaves if os.path.isdir(d) for n in os.listdir(d) if is_temp(n)}
                for pid in writing - stopped - {None}:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
            results = tier.get_finished()
        assert [(r.job_id, r.success, r.error_code) for r in results] == [(1, False, "ETIMEDOUT")]
        landed = [k for k in keys if os.path.exists(tier.block_path(k))]
        assert landed, "no block landed before the writers were stopped"
        assert tier.lookup_many(landed, probe=False) == [True] * len(landed)
        assert tier.stats().bytes_counted >= len(landed) * big.block_bytes
        tier.shutdown()
    finally:
        big.close()


@contextlib.contextmanager
def _small(fs: str, scratch: Path) -> Iterator[Path]:
    """A real file system with room for fewer than 200 of the test's blocks: 1 MiB of tmpfs, or 8 MiB of ext4."""
    if fs == "tmpfs":
        with mounted("tmpfs", scratch / "small", "size=1m") as target:
            yield target
    else:
        with small_ext4(scratch, 8) as (_, target):
            yield target


@pytest.mark.parametrize("fs", ["tmpfs", "ext4-loop"])
def test_enospc_fails_the_store_cleanly_and_the_tier_recovers(make_tier, cache, tmp_path, fs):
    with _small(fs, tmp_path) as target:
        tier = make_tier(root_dir=str(target))
        fill_random(cache, range(200))
        keys = make_keys(200)
        result = run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(200))))
        assert not result.success and result.error_code == "ENOSPC"
        stored = set(result.successful_keys)
        assert 0 < len(stored) < 200
        for key in keys:
            path = tier.block_path(key)
            assert os.path.exists(path) == (key in stored)
            if key in stored:
                assert os.path.getsize(path) == BLOCK  # never a partial block under a final name
        assert list(target.rglob(f"*{TEMP_SUFFIX}")) == []
        for key in list(stored)[:20]:
            os.unlink(tier.block_path(key))
        retry = [k for k in keys if k not in stored][:10]
        again = run_job(tier, "store", JobMetadata(job_id=2, keys=retry, block_ids=list(range(10))))
        assert again.success, again.error
        loaded = run_job(tier, "load", JobMetadata(job_id=3, keys=retry, block_ids=list(range(210, 220))))
        assert loaded.success and np.array_equal(cache.array[210:220], cache.array[:10])
        tier.shutdown()


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_a_budgeted_tier_on_a_mount_made_read_only_loads_and_finds_its_blocks(make_tier, cache, tmp_path):
    """The namespace's file system is remounted read-only (an operator froze a shared cache): recording a use in
    a block's mtime (EROFS) is left undone, as for a file another group member owns, and fails no block whose
    bytes are good. Before, every block of such a load failed with EROFS although its bytes had reached the
    cache, and a store that found its blocks whole failed too."""
    with mounted("tmpfs", tmp_path / "small", "size=1m") as target:
        tier = make_tier(root_dir=str(target), config=TierConfig(max_bytes=64 * BLOCK))
        keys = make_keys(4)
        fill_random(cache, range(4))
        assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3])).success
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[10, 11, 12, 13]))
        assert loaded.success, loaded.error
        assert np.array_equal(cache.array[10:14], cache.array[:4])
        again = run_job(tier, "store", JobMetadata(job_id=3, keys=keys, block_ids=[0, 1, 2, 3]))
        assert again.success and again.transfer_size == 0, again.error
        tier.shutdown()


def test_a_checksummed_store_that_fills_the_disk_names_the_block_it_failed(make_tier, cache, tmp_path):
    """Checksums on a small real ext4 with 128-byte inodes (each CRC takes a disk block of its own): the store
    that meets ENOSPC, in its CRC's setxattr or its write, fails naming that block; before, the error named
    the fd it wrote through, or nothing ("ENOSPC: No space left on device")."""
    with small_ext4(tmp_path, 8, "-I", "128") as (_, target):
        tier = make_tier(root_dir=str(target), config=TierConfig(checksum=True))
        fill_random(cache, range(200))
        keys = [b"\xab\xcd\xe0" + key[3:] for key in make_keys(200, seed=8)]  # one directory: its mkdir comes first
        result = run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(200))))
        assert not result.success and result.error_code == "ENOSPC"
        failed = [tier.block_path(k) for k in keys if k not in set(result.successful_keys or ())]
        assert any(result.error.endswith("/".join(p.split("/")[-3:])) for p in failed), result.error
        assert list(target.rglob(f"*{TEMP_SUFFIX}")) == []
        tier.shutdown()


def _temps_of(root: str, pid: int) -> list[str]:
    """The temp files of writer ``pid`` anywhere under ``root``."""
    return [name for _, _, names in os.walk(root) for name in names if name.endswith(".tmp") and temp_writer_pid(name) == pid]


def test_a_writer_killed_with_several_stores_in_flight_leaves_one_result_per_job_and_no_torn_block(make_tier, tmp_path):
    """A write worker with io_depth 4 is SIGKILLed (three times) while at least two of its lanes hold temp
    files and the other writer's lanes hold stores of their own: every job gets exactly one result (a live
    worker's lanes are never taken for the dead one's), every block file is whole and byte-exact, and no
    temp file outlives the deaths."""
    big = PrimaryCache.create(16, 8 << 20)
    try:
        root = str(tmp_path / "blocks")
        tier = make_tier(n_read_workers=1, n_write_workers=2, view=big, config=TierConfig(o_direct="off", io_depth=4))
        wait_ready(tier)
        fill_random(big, range(16), seed=5)
        results: dict[int, list] = {}
        keys_of: dict[int, bytes] = {}

        def collect() -> None:
            for r in tier.get_finished():
                results.setdefault(r.job_id, []).append(r)

        for _ in range(3):
            deadline = time.monotonic() + 20
            while True:
                assert time.monotonic() < deadline, "never saw two stores of one writer in flight"
                collect()
                if len(results) == len(keys_of):  # all done: keep the writers busy
                    for b in range(16):
                        job = len(keys_of)
                        keys_of[job] = make_keys(1, seed=1000 + job)[0]
                        tier.submit_store(JobMetadata(job_id=job, keys=[keys_of[job]], block_ids=[b]))
                writers = set(tier.worker_pids())
                temps = {temp_writer_pid(n) for _, _, names in os.walk(root) for n in names if n.endswith(".tmp")} & writers
                if not temps:
                    continue
                writer = temps.pop()
                os.kill(writer, signal.SIGSTOP)
                if len(_temps_of(root, writer)) >= 2:
                    break
                os.kill(writer, signal.SIGCONT)
            os.kill(writer, signal.SIGKILL)
            assert wait_exit(writer, 5)
        tier.drain(60)
        collect()
        deadline = time.monotonic() + 10
        while tier.stats().workers_restarted < 3:  # the last death's replacement may still wait out a back-off
            assert time.monotonic() < deadline, tier.stats()
            tier.wait(0.05)
            collect()
        assert sorted(results) == sorted(keys_of) and all(len(rs) == 1 for rs in results.values())
        for job, (r,) in results.items():
            path = tier.block_path(keys_of[job])
            if r.success or os.path.exists(path):
                with open(path, "rb") as f:
                    assert f.read() == big.array[job % 16].tobytes(), f"block of job {job} is torn"
        deadline = time.monotonic() + 10
        while (left := [n for _, _, names in os.walk(root) for n in names if n.endswith(".tmp")]) != []:
            assert time.monotonic() < deadline, f"temp files left behind: {left}"
            tier.wait(0.1)
            collect()
        tier.shutdown()
    finally:
        big.close()


def _reader_caught_mid_load(tier, cache, into: list[int], results: list) -> bool:
    """Once the load into ``into`` has landed its first block, stop the workers; if it has not landed its last yet,
    SIGKILL the one reading (the most bytes read) and return True, else let it go on. ``results``: what the polling
    that lets the host send a lost task again returns meanwhile."""
    deadline = time.monotonic() + 10
    while not cache.array[into[0], -64:].any():
        assert time.monotonic() < deadline, "the load never started"
        results += tier.get_finished()  # the host sends a lost task again from its polling
    pids = tier.worker_pids()
    with processes_stopped(pids):
        if all(cache.array[b, -64:].any() for b in into):
            return False
        reader = max(pids, key=bytes_read)
        os.kill(reader, signal.SIGKILL)
    assert wait_exit(reader, 5)
    cache.array[into] = 0  # what the next attempt lands is seen afresh
    return True


@pytest.mark.parametrize("kills", [1, 2], ids=["sent again", "lost twice"])
def test_a_reader_killed_inside_a_16_block_load_leaves_one_result_and_no_torn_block_reported(make_tier, kills):
    """A read worker is SIGKILLed while its one-call load (load_run) is part way through a 16-block task: some
    cache blocks hold their file's bytes, one is half read, the rest are untouched. The job gets exactly one
    result: the task sent again loads every block whole; lost a second time, the job fails (EOWNERDEAD) and
    reports no key loaded. The block files are left as they were."""
    big = PrimaryCache.create(32, 4 << 20)
    try:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off", io_depth=1))
        wait_ready(tier)
        keys, into = make_keys(16, seed=9), list(range(16, 32))
        fill_random(big, range(16), seed=9)
        assert run_job(tier, "store", JobMetadata(job_id=0, keys=keys, block_ids=list(range(16)))).success
        on_disk = [Path(tier.block_path(key)).read_bytes() for key in keys]
        for job in range(1, 40):
            big.array[into] = 0
            results: list = []
            tier.submit_load(JobMetadata(job_id=job, keys=keys, block_ids=into))
            killed = 0
            while killed < kills and _reader_caught_mid_load(tier, big, into, results):
                killed += 1
            tier.drain(30)
            results += tier.get_finished()
            assert [r.job_id for r in results] == [job], "exactly one result per job"
            (result,) = results
            if killed == kills:
                break
            assert result.success, result.error  # finished before it could be caught: try again
        else:
            pytest.fail("never caught the reader inside a load")
        if kills == 1:
            assert result.success and result.transfer_size == 16 * (4 << 20), result.error
            assert all(big.array[16 + i].tobytes() == big.array[i].tobytes() for i in range(16)), "a block loaded torn"
        else:
            assert not result.success and result.error_code == "EOWNERDEAD" and not result.successful_keys, result
        assert [Path(tier.block_path(key)).read_bytes() for key in keys] == on_disk
        tier.shutdown()
    finally:
        big.close()
