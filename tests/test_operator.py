"""What an operator may do to a root while a tier runs: clear it (`rm -rf <root>/*`), or rotate the namespace
directory (`mv ns ns.old; mkdir ns`). The tier makes its namespace again with the checks of its start,
forgets what it can no longer see, never follows the old directory, and keeps serving."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest
from helpers import BLOCK, POLLS, in_system_call, make_keys, mounted, processes_stopped, run_job, stop_processes, wait_ready

from mp_tier import FileSystemTierManager, JobMetadata, JobResult, PrimaryCache, TierConfig
from mp_tier.layout import MAX_KEY_BYTES


def namespace_of(tier: FileSystemTierManager) -> str:
    return tier.layout.base


def blocks_under(directory: str) -> int:
    return sum(name.endswith(".bin") for _, _, names in os.walk(directory) for name in names)


def store(tier: FileSystemTierManager, job_id: int, keys: list[bytes], first: int = 0) -> None:
    result = run_job(tier, "store", JobMetadata(job_id=job_id, keys=keys, block_ids=list(range(first, first + len(keys)))))
    assert result.success, result.error


def test_a_cleared_root_is_made_again_and_what_it_held_is_forgotten(make_tier, tmp_path):
    tier = make_tier(config=TierConfig(events=True))
    old, new = make_keys(4, seed=1), make_keys(4, seed=2)
    store(tier, 1, old)
    tier.take_events()
    subprocess.run(f"rm -rf {tmp_path / 'blocks'}/*", shell=True, check=True)
    store(tier, 2, new, first=4)  # the first store after the removal lands
    assert all(os.path.isfile(tier.block_path(k)) for k in new)
    assert os.path.isfile(os.path.join(namespace_of(tier), "config.json")), "the namespace was made again as at start"
    tier.drain(30)  # the rescan of the new directory
    assert tier.stats().bytes_counted == 4 * BLOCK
    assert tier.lookup_many(old, probe=False) == [False] * 4
    assert [tier.lookup(k) for k in old] == [False] * 4 and [tier.lookup(k) for k in new] == [True] * 4
    removed = [k for event in tier.take_events() if event.kind == "removed" for k in event.keys]
    assert sorted(removed) == sorted(old)
    load = run_job(tier, "load", JobMetadata(job_id=3, keys=old, block_ids=[8, 9, 10, 11]))
    assert not load.success and load.error_code == "ENOENT"
    assert run_job(tier, "load", JobMetadata(job_id=4, keys=new, block_ids=[8, 9, 10, 11])).success


def test_a_rotated_namespace_is_not_followed_and_one_put_back_is_read_again(make_tier):
    tier = make_tier()
    old, new = make_keys(4, seed=1), make_keys(4, seed=2)
    store(tier, 1, old)
    ns = namespace_of(tier)
    subprocess.run(["mv", ns, f"{ns}.old"], check=True)
    subprocess.run(["mkdir", "-m", "700", ns], check=True)
    assert [tier.lookup(k) for k in old] == [False] * 4, "lookup() answered from the directory renamed away"
    store(tier, 2, new, first=4)
    assert all(os.path.isfile(tier.block_path(k)) for k in new), "a store landed in the directory renamed away"
    assert blocks_under(f"{ns}.old") == 4
    tier.drain(30)
    assert tier.lookup_many(old, probe=False) == [False] * 4 and tier.stats().bytes_counted == 4 * BLOCK
    assert [tier.lookup(k) for k in new] == [True] * 4
    # the operator puts the old directory back: the next task finds it, and the rescan counts its blocks
    subprocess.run(["mv", ns, f"{ns}.new"], check=True)
    subprocess.run(["mv", f"{ns}.old", ns], check=True)
    assert run_job(tier, "load", JobMetadata(job_id=3, keys=old, block_ids=[8, 9, 10, 11])).success
    tier.drain(30)
    assert tier.lookup_many(old, probe=False) == [True] * 4 and tier.lookup_many(new, probe=False) == [False] * 4
    assert tier.stats().bytes_counted == 4 * BLOCK


@pytest.mark.parametrize("engine", ["processes"])
def test_a_namespace_put_back_open_to_others_is_refused_until_it_is_fixed(make_tier, tmp_path, engine):
    tier = make_tier()
    store(tier, 1, make_keys(2, seed=1))
    ns = namespace_of(tier)
    subprocess.run(["rm", "-rf", ns], check=True)
    subprocess.run(["mkdir", "-m", "777", ns], check=True)
    os.chmod(ns, 0o777)  # past the umask
    keys = make_keys(2, seed=2)
    refused = run_job(tier, "store", JobMetadata(job_id=2, keys=keys, block_ids=[0, 1]))
    assert not refused.success and refused.error_code == "EPERM" and "another user could have planted blocks" in (refused.error or "")
    assert os.listdir(ns) == [], "the tier wrote into a namespace it does not trust"
    os.chmod(ns, 0o700)
    store(tier, 3, keys)
    assert all(os.path.isfile(tier.block_path(k)) for k in keys)


@pytest.mark.parametrize("engine", ["processes"])
def test_every_job_gets_one_result_across_a_removal_and_the_jobs_after_it_succeed(make_tier, tmp_path, engine):
    tier = make_tier()
    tier.drain(30)
    for job in range(20):
        tier.submit_store(JobMetadata(job_id=job, keys=make_keys(2, seed=100 + job), block_ids=[2 * job, 2 * job + 1]))
    # a store running meanwhile may make it fail (rm: directory not empty) or fail itself: each says so
    deadline = time.monotonic() + 20
    while subprocess.run(f"rm -rf {tmp_path / 'blocks'}/*", shell=True, stderr=subprocess.DEVNULL).returncode:
        assert time.monotonic() < deadline, "rm -rf never got through"
    for job in range(20, 40):
        tier.submit_store(JobMetadata(job_id=job, keys=make_keys(2, seed=100 + job), block_ids=[2 * job, 2 * job + 1]))
    tier.drain(60)
    results = tier.get_finished()
    assert sorted(r.job_id for r in results) == list(range(40))
    assert all(r.success for r in results if r.job_id >= 20), [r.error for r in results if not r.success]
    assert all(os.path.isfile(tier.block_path(k)) for job in range(20, 40) for k in make_keys(2, seed=100 + job))


def rotate_mid_store(tier: FileSystemTierManager, keys: list[bytes], renames: int) -> tuple[JobResult, list[int]]:
    """Store ``keys`` as one task and rename the namespace directory away ``renames`` times while it runs:
    each time once a block has landed at its path, with the workers stopped while the directory moves.
    Returns the job's result and how many blocks each stop caught already there (all of them: too late)."""
    ns = namespace_of(tier)
    first = tier.block_path(keys[0])
    pids = tier.worker_pids()
    tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=list(range(len(keys)))))
    caught: list[int] = []
    results: list[JobResult] = []
    for turn in range(renames):
        deadline = time.monotonic() + 20
        while not os.path.exists(first) and not (results := tier.get_finished()):
            assert time.monotonic() < deadline, "the store never reached the namespace directory"
        if results:
            break  # the job ended without writing at the path again
        stop_processes(pids)
        caught.append(sum(os.path.exists(tier.block_path(k)) for k in keys))
        os.rename(ns, f"{ns}.old{turn}")
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    tier.drain(30)
    [result] = results + tier.get_finished()
    return result, caught


@pytest.mark.parametrize("engine", ["processes"])
def test_a_namespace_rotated_while_a_store_runs_gets_every_block_the_job_reports(make_tier, engine):
    """`mv ns ns.old` while a store task is half done: the blocks it still writes would land in ns.old. The
    worker sees the move when the task ends and writes the task again in the directory now at the path, so
    every block the job reports stored is at ``block_path`` and lookups say so for those only."""
    with PrimaryCache.create(20, 4 << 20) as big:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off"))
        wait_ready(tier)
        keys = make_keys(20)  # one task: a frame holds 20 blocks
        result, [caught] = rotate_mid_store(tier, keys, 1)
        assert caught < len(keys), "the store ended before the directory moved: nothing was tested"
        assert result.success, result.error
        assert [k for k in keys if not os.path.isfile(tier.block_path(k))] == [], "a block reported stored is not at its path"
        assert tier.lookup_many(keys, probe=False) == [True] * len(keys)
        assert [tier.lookup(k) for k in keys] == [True] * len(keys)
        assert run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=list(range(len(keys))))).success


@pytest.mark.parametrize("engine", ["processes"])
def test_a_namespace_rotated_twice_under_one_store_fails_its_blocks(make_tier, engine):
    """The directory moves again while the worker writes the task a second time: the task fails, naming
    why, and no block of it is counted or answered True."""
    with PrimaryCache.create(20, 4 << 20) as big:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off"))
        wait_ready(tier)
        keys = make_keys(20)
        result, caught = rotate_mid_store(tier, keys, 2)
        assert caught and max(caught) < len(keys), "a write of the task ended before the directory moved: nothing was tested"
        assert not result.success and result.error_code == "ESTALE", result.error
        assert "replaced twice" in (result.error or "")
        assert tier.lookup_many(keys, probe=False) == [False] * len(keys)
        assert tier.stats().bytes_counted == 0


@pytest.mark.parametrize("engine", ["processes"])
def test_a_store_job_whose_first_task_ended_before_a_rotation_reports_only_blocks_at_their_paths(make_tier, engine):
    """A 40-block store goes out as two tasks; the first (its blocks already whole on disk) ends at once,
    the directory moves while the second writes. The second is written again in the new directory, but the
    first one's blocks stay in ns.old: the job may not report them stored, nor lookups answer True."""
    with PrimaryCache.create(40, 2 << 20) as big:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off"))
        wait_ready(tier)
        keys = make_keys(40)
        store(tier, 1, keys[:20])  # so the job's first task only finds its blocks whole
        ns, pids, second = namespace_of(tier), tier.worker_pids(), tier.block_path(keys[20])
        tier.submit_store(JobMetadata(job_id=2, keys=keys, block_ids=list(range(40))))
        deadline = time.monotonic() + 20
        while not os.path.exists(second):
            assert time.monotonic() < deadline, "the second task never began"
        stop_processes(pids)
        caught = sum(os.path.exists(tier.block_path(k)) for k in keys[20:])
        os.rename(ns, f"{ns}.old")
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        tier.drain(30)
        [result] = tier.get_finished()
        assert caught < 20, "the second task ended before the directory moved: nothing was tested"
        reported = keys if result.success else list(result.successful_keys or ())
        assert result.success or result.error_code == "ESTALE", result.error
        assert reported[-20:] == keys[20:], "the second task, written again in the new directory, failed"
        assert [k for k in reported if not os.path.isfile(tier.block_path(k))] == [], "a block reported stored is not at its path"
        answers = tier.lookup_many(keys, probe=False)
        assert [k for k, a in zip(keys, answers) if a and not os.path.isfile(tier.block_path(k))] == [], "lookup_many says True off the path"


@pytest.mark.parametrize("engine", ["processes"])
@pytest.mark.parametrize("how", ["mv", "rm -rf"])
def test_lanes_of_one_worker_storing_across_a_move_or_removal_report_only_blocks_at_their_paths(make_tier, engine, how):
    """Eight stores in flight on the four lanes of each worker; the directory is moved away (or removed) while
    they write. Lanes share the worker's directory fd, which the first lane to see the change replaces under
    the others mid-task: each must still find its task's blocks misplaced. Every job gets one result, and
    what a job reports stored, or lookup_many answers True for, is at its path."""
    with PrimaryCache.create(80, 1 << 20) as big:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(o_direct="off", io_depth=4))
        wait_ready(tier)
        ns, pids = namespace_of(tier), tier.worker_pids()
        jobs = {job: make_keys(10, seed=job) for job in range(8)}
        for job, keys in jobs.items():
            tier.submit_store(JobMetadata(job_id=job, keys=keys, block_ids=list(range(job * 10, job * 10 + 10))))
        first = [tier.block_path(keys[0]) for keys in jobs.values()]
        deadline = time.monotonic() + 20
        while not any(map(os.path.exists, first)):
            assert time.monotonic() < deadline, "no store began"
        stop_processes(pids)
        before = {r.job_id: r for r in tier.get_finished()}  # reported before the move: at their paths then
        landed = sum(os.path.exists(tier.block_path(k)) for keys in jobs.values() for k in keys)
        if how == "mv":
            os.rename(ns, f"{ns}.old")
        else:
            subprocess.run(["rm", "-rf", ns], check=True)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        tier.drain(30)
        results = {r.job_id: r for r in tier.get_finished()}
        assert landed < 80 and results, "every store ended before the directory moved: nothing was tested"
        assert sorted([*before, *results]) == list(jobs)
        reported = [k for job, r in results.items() for k in (jobs[job] if r.success else r.successful_keys or ())]
        assert [k for k in reported if not os.path.isfile(tier.block_path(k))] == [], "a block reported stored is not at its path"
        every = [k for keys in jobs.values() for k in keys]
        answers = tier.lookup_many(every, probe=False)
        assert [k for k, a in zip(every, answers) if a and not os.path.isfile(tier.block_path(k))] == [], "lookup_many says True off the path"
        assert {r.error_code for r in results.values() if not r.success} <= {"ESTALE", "ENOENT"}, [r.error for r in results.values()]


def waiting_for_room(pid: int) -> bool:
    """Whether a thread of worker ``pid`` sleeps in poll(2) or ppoll(2) (x86-64 numbers): only a completion waiting
    for room in the results pipe does (an idle lane sleeps in epoll_wait)."""
    return any(in_system_call(f"{pid}/task/{tid}", POLLS) for tid in os.listdir(f"/proc/{pid}/task"))


@pytest.mark.parametrize("engine", ["processes"])
def test_a_start_up_scan_of_a_namespace_rotated_under_it_is_not_taken(make_tier, engine):
    """A tier starts over 12,000 blocks, and the operator rotates the namespace (`mv ns ns.old`; a store makes
    it again) while the start-up scan's findings are still on their way: they list the old directory, which
    the tier no longer uses. The scanning worker is held once it has filled the results pipe; the store that
    makes the new directory is read first, then the rest of the scan. The tier must not count what the old
    directory holds: it counted thousands of blocks of ns.old again, so with eviction = "fail" its budget stayed
    full of blocks it cannot see, and every store failed with ENOSPC."""
    with PrimaryCache.create(16, 4096) as small:
        first = make_tier(view=small)
        ns = namespace_of(first)
        first.shutdown()
        old = [bytes([0xAB, 0xCD, 0xEF]) + i.to_bytes(MAX_KEY_BYTES - 7, "big") + bytes(4) for i in range(12_000)]  # one directory
        os.makedirs(os.path.dirname(first.block_path(old[0])))
        for key in old:
            os.close(os.open(first.block_path(key), os.O_WRONLY | os.O_CREAT, 0o600))
        tier = make_tier(view=small, n_read_workers=1, n_write_workers=1, config=TierConfig(max_bytes=4 * 4096, eviction="fail"))
        deadline = time.monotonic() + 20
        while not (scanner := [pid for pid in tier.worker_pids() if waiting_for_room(pid)]):
            assert time.monotonic() < deadline, "the scan never filled the results pipe"
            time.sleep(0.001)  # the worker needs the CPU to get there
        new = make_keys(3, seed=8)
        with processes_stopped(scanner[:1]):
            os.rename(ns, f"{ns}.old")
            tier.submit_store(JobMetadata(job_id=1, keys=new[:1], block_ids=[0]))
            while not (results := tier.get_finished()):
                assert time.monotonic() < deadline, "the store in the new directory never ended"
                tier.wait(0.01)
            assert results[0].success, results[0].error
        tier.drain(30)
        assert tier.stats().bytes_counted == 4096 and not any(tier.lookup_many(old, probe=False))
        assert run_job(tier, "store", JobMetadata(job_id=2, keys=new[1:], block_ids=[1, 2])).success


def test_a_namespace_removed_while_the_disk_is_full_is_made_again_once_there_is_room(make_tier, tmp_path):
    """`rm -rf` of the namespace, and the disk is full: the store that would make it again fails (ENOSPC, one
    line naming the root) and leaves no half-made namespace that a later task would refuse. Once there is
    room, the next store makes it (config.json and all) and lands, and the count matches the disk."""
    with mounted("tmpfs", tmp_path / "small", "size=1m") as small:
        tier = make_tier(root_dir=str(small / "root"), config=TierConfig(max_bytes=8 * BLOCK))
        keys = make_keys(6)
        store(tier, 1, keys[:4])
        subprocess.run(["rm", "-rf", namespace_of(tier)], check=True)
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, bytes(4096)):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        full = run_job(tier, "store", JobMetadata(job_id=2, keys=keys[4:], block_ids=[4, 5]))
        assert not full.success and full.error_code == "ENOSPC" and str(small / "root") in (full.error or ""), full.error
        os.unlink(small / "filler")
        store(tier, 3, keys[4:], first=4)
        tier.drain(30)  # the rescan of the new directory
        assert os.path.isfile(os.path.join(namespace_of(tier), "config.json"))
        assert tier.stats().bytes_counted == 2 * BLOCK and [tier.lookup(k) for k in keys] == [False] * 4 + [True] * 2
        tier.shutdown()
