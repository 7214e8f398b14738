"""Behaviour of the tier, run against both engines (processes and threads)."""

from __future__ import annotations

import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Callable

import numpy as np
import pytest
from helpers import (
    BLOCK,
    all_succeed,
    fill_random,
    libc_shim,
    make_keys,
    processes_stopped,
    run_job,
    stop_processes,
    wait_ready,
    worker_threads,
)

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierClosed, TierConfig


@pytest.mark.parametrize("n", [0, 1, 2, 5, 64])
def test_roundtrip_into_other_blocks(tier, cache, n):
    keys = make_keys(n, seed=n)
    fill_random(cache, range(n), seed=n)
    stored = run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(n))))
    assert stored.success and stored.error is None and stored.error_code is None
    assert stored.transfer_size == n * BLOCK
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=np.arange(100, 100 + n), is_promotion=True))
    assert loaded.success and loaded.successful_keys is None
    assert loaded.transfer_size == n * BLOCK
    assert np.array_equal(cache.array[100 : 100 + n], cache.array[:n])


def test_load_of_missing_file_fails_with_errno(tier):
    result = run_job(tier, "load", JobMetadata(job_id=7, keys=make_keys(1), block_ids=[0]))
    assert not result.success
    assert result.error_code == "ENOENT" and result.error.startswith("ENOENT: ")
    assert result.successful_keys == ()
    assert result.transfer_size == 0


def test_partial_load_reports_exactly_the_loaded_keys(tier, cache):
    keys = make_keys(10)
    fill_random(cache, range(10))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(10)))).success
    for i in (2, 7):
        os.unlink(tier.block_path(keys[i]))
    result = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=list(range(20, 30))))
    assert not result.success
    assert result.successful_keys == tuple(k for i, k in enumerate(keys) if i not in (2, 7))
    assert result.transfer_size == 8 * BLOCK
    loaded = [i for i in range(10) if i not in (2, 7)]
    assert np.array_equal(cache.array[[20 + i for i in loaded]], cache.array[loaded])


def test_truncated_file_fails_and_is_removed(tier, cache):
    keys = make_keys(1)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0])).success
    path = tier.block_path(keys[0])
    os.truncate(path, BLOCK // 2)
    result = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[1]))
    assert not result.success and result.error_code == "EBADMSG"
    assert not os.path.exists(path)
    assert tier.lookup(keys[0]) is False


def test_symlink_loop_fails_and_stays(tier):
    keys = make_keys(1)
    path = tier.block_path(keys[0])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(path, path)
    result = run_job(tier, "load", JobMetadata(job_id=1, keys=keys, block_ids=[0]))
    assert not result.success and result.error_code == "ELOOP"
    assert os.path.islink(path)


@pytest.mark.parametrize(
    "keys, block_ids, message",
    [
        (make_keys(1), [256], "block id 256 is out of range"),
        (make_keys(1), [-1], "block id -1 is out of range"),
        (make_keys(2), [0], "2 keys but 1 block_ids"),
        (["not bytes" * 4], [0], "is not bytes"),
        (make_keys(1), [1.0], "block id 1.0 is not an int"),
        ([b"short"], [0], "shorter than"),
        (make_keys(1) * 2, [0, 1], "appears twice"),
    ],
)
def test_bad_jobs_raise_at_submit_and_enqueue_nothing(tier, keys, block_ids, message):
    with pytest.raises(ValueError, match=message):
        tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=block_ids))
    assert tier.stats().jobs_active == 0
    good = run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1, seed=9), block_ids=[0]))
    assert good.success


def test_active_job_id_is_refused(tier):
    tier.submit_store(JobMetadata(job_id=5, keys=make_keys(1), block_ids=[0]))
    with pytest.raises(ValueError, match="job_id 5 is still active"):
        tier.submit_load(JobMetadata(job_id=5, keys=make_keys(1), block_ids=[1]))
    tier.drain(30)
    assert [r.job_id for r in tier.get_finished()] == [5]


def test_every_result_is_in_the_job_counts_empty_jobs_too(tier):
    """jobs_stored + jobs_loaded + jobs_failed is the number of results, whatever the jobs held."""
    jobs = [("store", make_keys(1)), ("store", []), ("load", []), ("load", make_keys(1, seed=5))]
    results = [run_job(tier, kind, JobMetadata(job_id=j, keys=keys, block_ids=list(range(len(keys))))) for j, (kind, keys) in enumerate(jobs)]
    assert [r.success for r in results] == [True, True, True, False]
    stats = tier.stats()
    assert (stats.jobs_stored, stats.jobs_loaded, stats.jobs_failed) == (2, 1, 1)


def test_independent_jobs_are_tracked_separately(tier, cache):
    fill_random(cache, range(30))
    good = [make_keys(3, seed=s) for s in range(10)]
    for j, keys in enumerate(good):
        tier.submit_store(JobMetadata(job_id=j, keys=keys, block_ids=[3 * j, 3 * j + 1, 3 * j + 2]))
    tier.drain(30)
    assert sorted(r.job_id for r in tier.get_finished()) == list(range(10))
    tier.submit_load(JobMetadata(job_id=100, keys=good[4], block_ids=[40, 41, 42]))
    tier.submit_load(JobMetadata(job_id=101, keys=make_keys(2, seed=99), block_ids=[43, 44]))
    tier.submit_load(JobMetadata(job_id=102, keys=good[8], block_ids=[45, 46, 47]))
    tier.drain(30)
    results = {r.job_id: r for r in tier.get_finished()}
    assert results[100].success and results[102].success and not results[101].success
    assert results[101].successful_keys == ()
    assert np.array_equal(cache.array[40:43], cache.array[12:15])
    assert np.array_equal(cache.array[45:48], cache.array[24:27])


def test_lookup_false_then_none_then_true(tier):
    keys = make_keys(4)
    assert tier.lookup(keys[0]) is False
    tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3]))
    assert tier.lookup(keys[0]) is None  # in flight until its result is collected
    tier.drain(30)
    assert tier.lookup(keys[0]) is True
    assert all(tier.lookup(k) is True for k in keys)


def test_store_skips_a_block_already_on_disk(tier):
    keys = make_keys(2)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1])).transfer_size == 2 * BLOCK
    again = run_job(tier, "store", JobMetadata(job_id=2, keys=keys, block_ids=[0, 1]))
    assert again.success and again.transfer_size == 0
    assert tier.stats().blocks_skipped == 2


def test_load_jumps_a_backlog_of_500_stores(make_tier):
    tier = make_tier(n_read_workers=1, n_write_workers=1)
    wanted = make_keys(1, seed=1)
    assert run_job(tier, "store", JobMetadata(job_id=0, keys=wanted, block_ids=[0])).success
    backlog = make_keys(500, seed=2)
    for j, key in enumerate(backlog, start=1):
        tier.submit_store(JobMetadata(job_id=j, keys=[key], block_ids=[j % 200]))
    tier.submit_load(JobMetadata(job_id=9999, keys=wanted, block_ids=[255]))
    stores_done = 0
    while True:
        assert tier.wait(30)
        results = tier.get_finished()
        if any(r.job_id == 9999 for r in results):
            break
        stores_done += len(results)
    assert stores_done < 450, f"the load waited for {stores_done} of 500 stores"
    tier.drain(60)


@pytest.mark.parametrize("kind", ["store", "load"])
def test_every_worker_helps_with_one_kind_of_work(make_tier, kind):
    """Blocks of 1 MiB, so that a task lasts long enough for the queue to need every worker."""
    big = PrimaryCache.create(128, 1 << 20)
    tier = make_tier(n_read_workers=2, n_write_workers=2, view=big)
    wait_ready(tier)
    keys = make_keys(64)
    if kind == "load":
        tier.submit_store(JobMetadata(job_id=-1, keys=keys, block_ids=list(range(64))))
        tier.drain(30)
        tier.get_finished()
    before = tier.stats().tasks_by_worker
    for j, key in enumerate(keys):
        getattr(tier, f"submit_{kind}")(JobMetadata(job_id=j, keys=[key], block_ids=[64 + j]))
    tier.drain(30)
    assert all(r.success for r in tier.get_finished())
    done = [after - b for after, b in zip(tier.stats().tasks_by_worker, before)]
    assert sum(done) == 64
    assert all(n > 0 for n in done), f"tasks per worker: {done}"
    tier.shutdown()
    big.close()


def test_shutdown_gives_every_queued_job_one_result(make_tier):
    tier = make_tier(n_read_workers=1, n_write_workers=1)
    for j in range(300):
        tier.submit_store(JobMetadata(job_id=j, keys=make_keys(1, seed=j), block_ids=[j % 256]))
    tier.shutdown()
    results = tier.get_finished()
    assert sorted(r.job_id for r in results) == list(range(300))
    cancelled = [r for r in results if not r.success]
    assert cancelled and all(r.error_code == "ECANCELED" and "cancelled" in r.error for r in cancelled)
    assert all(r.error is None for r in results if r.success)
    tier.shutdown()  # idempotent
    assert tier.get_finished() == []
    with pytest.raises(TierClosed):
        tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))


def test_drain_times_out(make_tier):
    tier = make_tier(n_read_workers=1, n_write_workers=1)
    for j in range(200):
        tier.submit_store(JobMetadata(job_id=j, keys=make_keys(4, seed=j), block_ids=[0, 1, 2, 3]))
    with pytest.raises(TimeoutError, match="jobs still active"):
        tier.drain(timeout=0)


@pytest.mark.parametrize("o_direct", ["off", "auto"])
def test_o_direct_settings_roundtrip(make_tier, cache, o_direct):
    tier = make_tier(config=TierConfig(o_direct=o_direct))
    assert tier.direct is False if o_direct == "off" else isinstance(tier.direct, bool)
    keys = make_keys(8)
    fill_random(cache, range(8))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(8)))).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=list(range(8, 16)))).success
    assert np.array_equal(cache.array[8:16], cache.array[:8])


def test_layout_modes_and_namespace(make_tier, tmp_path):
    spec = types.SimpleNamespace(
        vllm_config=types.SimpleNamespace(
            model_config=types.SimpleNamespace(model="meta-llama/Llama-3.1-8B", dtype="torch.bfloat16"),
            parallel_config=types.SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1, rank=1),
        )
    )
    tier = make_tier(offloading_spec=spec)
    key = make_keys(1, group=3)[0]
    digest = key[:-4].hex()
    base = tmp_path / "blocks" / f"meta-llama-Llama-3.1-8B_bfloat16_tp2_pp1_bs{BLOCK}_r1"
    assert tier.block_path(key) == f"{base}/{digest[:3]}/{digest[3:5]}_g3/{digest}.bin"
    assert (base / "config.json").is_file()
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[key], block_ids=[0])).success
    assert stat.S_IMODE(os.stat(tier.block_path(key)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(tier.block_path(key))).st_mode) == 0o700


def test_bad_root_dir_raises_oserror_naming_it(cache, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"x")
    with pytest.raises(OSError, match="file"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(not_a_dir / "blocks"))


@pytest.mark.parametrize("view", ["array", "view"])
def test_accepts_the_cache_array_or_view(make_tier, cache, view):
    tier = make_tier(view=getattr(cache, view))
    assert (tier.num_blocks, tier.block_bytes) == (cache.num_blocks, cache.block_bytes)
    fill_random(cache, [0])
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=make_keys(1), block_ids=[1])).success
    assert np.array_equal(cache.array[1], cache.array[0])


def test_a_view_into_the_middle_of_shared_memory(make_tier, cache):
    """A 2-D int8 view that starts one block in: its block 0 is the cache's block 1, for workers too."""
    view = cache.array[1:].view(np.int8)
    tier = make_tier(view=view)
    assert tier.num_blocks == cache.num_blocks - 1
    fill_random(cache, [1])
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=make_keys(1), block_ids=[9])).success
    assert np.array_equal(cache.array[10], cache.array[1])


@pytest.fixture(params=["named", "unlinked"])
def foreign_mapping(request):
    """A MAP_SHARED file under /dev/shm that mp_tier did not create, as vLLM's SharedOffloadRegion makes one."""
    path = f"/dev/shm/foreign_{os.getpid()}_{request.param}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 16 * BLOCK)
        mapping = mmap.mmap(fd, 16 * BLOCK, mmap.MAP_SHARED)
    finally:
        os.close(fd)
        if request.param == "unlinked":
            os.unlink(path)
    yield mapping
    if request.param == "named":
        os.unlink(path)
    mapping.close()


def test_runs_on_shared_memory_it_did_not_create(make_tier, foreign_mapping):
    """Workers map the engine's own file (by fd, found through /proc/self/maps): no copy, stores and loads byte-exact."""
    blocks = np.frombuffer(foreign_mapping, dtype=np.int8).reshape(16, BLOCK)  # vLLM hands over int8 rows
    blocks[:4] = np.random.default_rng(1).integers(-128, 128, (4, BLOCK), dtype=np.int8)
    tier = make_tier(view=memoryview(blocks))
    keys = make_keys(4)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[8, 9, 10, 11])).success
    assert np.array_equal(blocks[8:12], blocks[:4])
    tier.shutdown()
    del blocks


@pytest.mark.parametrize("engine", ["processes"])
def test_private_memory_is_refused_for_processes_with_the_cause(cache, tmp_path, engine):
    with pytest.raises(ValueError, match=r"primary_kv_view is not in shared memory .*a rw-p mapping.*engine = .threads."):
        FileSystemTierManager(primary_kv_view=np.zeros((16, BLOCK), dtype=np.uint8), root_dir=str(tmp_path))


@pytest.mark.parametrize("engine", ["threads"])
def test_the_thread_engine_takes_private_memory(make_tier, engine):
    blocks = np.zeros((16, BLOCK), dtype=np.uint8)
    blocks[0] = 9
    tier = make_tier(view=blocks)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=make_keys(1), block_ids=[5])).success
    assert (blocks[5] == 9).all()


TWO_INSTANCE_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    root, engine = sys.argv[1], sys.argv[2]
    keys = [bytes([i]) * 32 + b"\\0\\0\\0\\0" for i in range(4)]
    with PrimaryCache.create(8, {block}) as cache:
        for i in range(4):
            cache.array[i] = i + 1
        with FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=1,
                                   n_write_workers=1, engine=engine) as tier:
            tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3]))
            tier.drain(30)
            assert tier.get_finished()[0].success
    """
).format(block=BLOCK)


def test_two_instances_in_two_processes_share_a_root(tier, cache, tmp_path, engine):
    subprocess.run([sys.executable, "-c", TWO_INSTANCE_WRITER, str(tmp_path / "blocks"), engine], check=True, timeout=60)
    keys = [bytes([i]) * 32 + b"\0\0\0\0" for i in range(4)]
    assert all(tier.lookup(k) is True for k in keys)
    assert run_job(tier, "load", JobMetadata(job_id=1, keys=keys, block_ids=[10, 11, 12, 13])).success
    for i in range(4):
        assert (cache.array[10 + i] == i + 1).all()


def test_cache_attach_shares_bytes_and_only_owner_unlinks():
    with PrimaryCache.create(4, 4096) as owner:
        other = PrimaryCache.attach(owner.name, 4, 4096)
        other.array[2] = 7
        assert (owner.array[2] == 7).all()
        other.close()
        assert os.path.exists(f"/dev/shm/{owner.name}")
    assert not os.path.exists(f"/dev/shm/{owner.name}")


def test_a_load_waits_one_block_of_a_store_task_not_the_whole_task(make_tier):
    """Both workers are inside store tasks of 20 blocks (one lane each) when the load arrives; the read-priority
    one serves it between two blocks, so its result comes before either store's. Told by the order of the
    results, which the workers set: blocks counted once this test had the load's result counted those the
    workers stored until a loaded host got round to it (20 to 48 of 80 here, over the limit of 20)."""
    with PrimaryCache.create(42, 1 << 20) as big:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(io_depth=1))
        wait_ready(tier)
        wanted = make_keys(1, seed=1)
        assert run_job(tier, "store", JobMetadata(job_id=0, keys=wanted, block_ids=[40])).success
        for attempt in range(5):
            floods = [make_keys(20, seed=10 * attempt + job) for job in (1, 2)]  # one task each
            for job, keys in enumerate(floods, start=1):
                tier.submit_store(JobMetadata(job_id=job, keys=keys, block_ids=list(range(20 * job - 20, 20 * job))))
            deadline = time.monotonic() + 20
            while not all(any(os.path.exists(tier.block_path(k)) for k in keys) for keys in floods):
                assert time.monotonic() < deadline, "the stores never began"
            with processes_stopped(tier.worker_pids()):
                if sum(os.path.exists(tier.block_path(k)) for keys in floods for k in keys) <= 10:  # 10 or more left in each
                    tier.submit_load(JobMetadata(job_id=3, keys=wanted, block_ids=[41]))
                    break
            all_succeed(tier, 2)  # this test got there late: again, with fresh keys
        else:
            pytest.fail("both stores were well under way each time the workers stopped: nothing was tested")
        order: list[tuple[int, bool]] = []
        while len(order) < 3:
            assert tier.wait(30)
            order += [(r.job_id, r.success) for r in tier.get_finished()]
        assert order[0] == (3, True), f"the load waited for a whole store task: results in the order {order}"
        tier.shutdown()


@pytest.mark.parametrize("engine", ["processes"])
def test_a_full_host_queue_fails_new_jobs_at_once(make_tier, engine):
    """Workers stopped (SIGSTOP) fill the 1 MiB store pipe; past max_queued_tasks
    frames on the host side, a new store fails with EAGAIN instead of queueing."""
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(max_queued_tasks=10))
    tier.drain(30)
    with processes_stopped(tier.worker_pids()):
        job = 0
        while tier.stats().tasks_queued < 10:
            job += 1
            tier.submit_store(JobMetadata(job_id=job, keys=make_keys(1, seed=job), block_ids=[job % 256]))
        tier.submit_store(JobMetadata(job_id=0, keys=make_keys(1, seed=0), block_ids=[0]))
        refused = tier.get_finished()
        assert [(r.job_id, r.success) for r in refused] == [(0, False)] and refused[0].error_code == "EAGAIN"
    all_succeed(tier, job)


def fill_until_refused(tier, first_job: int) -> int:
    """Submit one-block stores until one is refused with EAGAIN; how many were queued."""
    job, refused = first_job, []
    while not refused:
        job += 1
        tier.submit_store(JobMetadata(job_id=job, keys=make_keys(1, seed=1000 + job), block_ids=[job % 256]))
        refused = tier.get_finished()
    assert [(r.job_id, r.error_code) for r in refused] == [(job, "EAGAIN")]
    return job - first_job - 1


@pytest.mark.parametrize("engine", ["processes"])
def test_probes_already_in_the_pipe_leave_the_job_queue_its_limit(make_tier, engine):
    """Workers stopped: probes go out first and sit in the store pipe, then stores fill it and wait on the
    host. A store is refused with EAGAIN exactly when max_queued_tasks stores wait there: probes in the pipe
    are not taken off the count of stores."""
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(max_queued_tasks=4))
    wait_ready(tier)
    with processes_stopped(tier.worker_pids()):
        assert tier.lookup_many(make_keys(256, seed=1)) == [False] * 256
        assert tier.stats().tasks_queued == 0, "the probes are in the pipe, none on the host"
        queued = fill_until_refused(tier, 0)
        assert tier.stats().tasks_queued == 4, "stores were queued on the host past max_queued_tasks"
    all_succeed(tier, queued)


@pytest.mark.parametrize("engine", ["processes"])
def test_probes_held_on_the_host_across_a_death_still_leave_max_queued_tasks_to_the_stores(make_tier, tmp_path, monkeypatch, engine):
    """Workers stopped: stores fill the store pipe, two more wait on the host, then a lookup_many's probes
    wait behind them. A worker is killed (its replacement hangs in its start): every frame is taken back and
    put in front again, the probes still on the host. Two more stores are queued before one is refused, as
    before the death, and once all is drained nothing is left counted on the host."""
    from mp_tier.worker_process import TEST_PAUSE

    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(max_queued_tasks=4))
    wait_ready(tier)
    pids = tier.worker_pids()
    stop_processes(pids)
    job = 0
    while tier.stats().tasks_queued < 2:
        job += 1
        tier.submit_store(JobMetadata(job_id=job, keys=make_keys(1, seed=1000 + job), block_ids=[job % 256]))
    assert tier.lookup_many(make_keys(256, seed=1)) == [False] * 256
    held = tier.stats().tasks_queued
    assert held > 2 and tier.get_finished() == [], "no probe waits on the host: nothing was tested"
    marker = tmp_path / "booting"
    monkeypatch.setenv(TEST_PAUSE, f"boot:30:{marker}")  # the replacement's environment
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while not marker.exists() or tier.stats().tasks_queued != held:  # replaced, and every frame put back
        assert time.monotonic() < deadline, "the death was not settled"
        tier.wait(0.01)
    try:
        assert fill_until_refused(tier, job) == 2, "probes put back after the death took (or gave) room of max_queued_tasks"
    finally:
        os.kill(pids[1], signal.SIGCONT)
    tier.drain(60)
    results = tier.get_finished()
    assert len(results) == job + 2 and all(r.success for r in results)
    assert tier.stats().tasks_queued == 0


@pytest.mark.parametrize("engine", ["processes"])
def test_background_probes_neither_fill_the_job_queue_nor_wait_for_it(make_tier, engine):
    """A lookup_many of 30,000 unknown keys while the workers are stopped: its probes are bounded and do
    not count as queued jobs, so the next store is queued, not refused with EAGAIN. Probes still go out
    while stores fill max_queued_tasks, and a key the bound left out is probed by a later lookup_many."""
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(max_queued_tasks=8))
    tier.drain(30)  # its start-up scan is done
    elsewhere = make_tier(n_read_workers=1, n_write_workers=1)  # another instance on the same root
    planted = make_keys(2, seed=7)
    assert run_job(elsewhere, "store", JobMetadata(job_id=1, keys=planted, block_ids=[0, 1])).success
    pids = tier.worker_pids()

    results = []

    def stopped(step: Callable[[], None]) -> None:
        stop_processes(pids)
        try:
            step()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        tier.drain(60)

    def probes_do_not_count() -> None:
        assert tier.lookup_many(make_keys(30_000, seed=1) + planted[1:]) == [False] * 30_001
        tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1, seed=2), block_ids=[0]))
        refused = tier.get_finished()
        assert refused == [], f"a store was refused although no job waits: {refused[0].error}"

    jobs = 1

    def jobs_do_not_hold_up_probes() -> None:
        nonlocal jobs
        while tier.stats().tasks_queued < 8:  # stores fill the job budget
            jobs += 1
            tier.submit_store(JobMetadata(job_id=jobs, keys=make_keys(1, seed=100 + jobs), block_ids=[jobs % 256]))
        tier.submit_store(JobMetadata(job_id=0, keys=make_keys(1, seed=0), block_ids=[0]))
        results.extend(tier.get_finished())
        assert results.pop().error_code == "EAGAIN"
        assert tier.lookup_many(planted[:1]) == [False]  # its probe goes out all the same

    stopped(probes_do_not_count)
    results.extend(tier.get_finished())
    stopped(jobs_do_not_hold_up_probes)
    results.extend(tier.get_finished())
    assert sorted(r.job_id for r in results) == list(range(1, jobs + 1)) and all(r.success for r in results)
    assert tier.lookup_many(planted, probe=False) == [True, False], "the bound left the second key out"
    assert tier.lookup_many(planted[1:]) == [False]
    tier.drain(60)
    assert tier.lookup_many(planted[1:], probe=False) == [True]


@pytest.mark.parametrize("engine", ["processes"])
@pytest.mark.parametrize("kind", ["store", "load"])
def test_a_job_is_split_only_over_the_workers_that_have_no_task_of_its_kind(make_tier, cache, engine, kind):
    """A lone job is shared by both workers of its group; jobs submitted while each of them has a task
    go out whole, one task each, and every block still arrives."""
    tier = make_tier(n_read_workers=2, n_write_workers=2)
    wait_ready(tier)
    fill_random(cache, range(16))
    stored = cache.array[:16].copy()
    keys = [make_keys(4, seed=100 + j) for j in range(4)]
    if kind == "load":
        for j, job_keys in enumerate(keys):
            assert run_job(tier, "store", JobMetadata(job_id=j, keys=job_keys, block_ids=list(range(4 * j, 4 * j + 4)))).success
        cache.array[:16] = 0
    tier.drain(30)
    before = sum(tier.stats().tasks_by_worker)
    pids = tier.worker_pids()
    stop_processes(pids)  # nothing completes between the submits
    try:
        for j, job_keys in enumerate(keys):
            getattr(tier, f"submit_{kind}")(JobMetadata(job_id=10 + j, keys=job_keys, block_ids=list(range(4 * j, 4 * j + 4))))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    tier.drain(30)
    results = tier.get_finished()
    assert sorted(r.job_id for r in results) == [10, 11, 12, 13] and all(r.success for r in results)
    assert sum(tier.stats().tasks_by_worker) - before == 2 + 1 + 1 + 1, "first job over 2 workers, then one task per job"
    if kind == "load":
        assert (cache.array[:16] == stored).all()
    else:
        assert all(tier.lookup(k) for job_keys in keys for k in job_keys)


@pytest.mark.parametrize("engine", ["processes"])
def test_worker_niceness_cpus_and_policy_are_applied_to_the_processes(make_tier, engine):
    cpu = max(os.sched_getaffinity(0))
    tier = make_tier(config=TierConfig(worker_nice=7, worker_cpus=[cpu], worker_sched="batch"))
    wait_ready(tier)
    for pid in tier.worker_pids():
        assert os.sched_getaffinity(pid) == {cpu}
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
        assert os.sched_getscheduler(pid) == os.SCHED_BATCH
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success


def test_io_depth_gives_each_worker_process_that_many_lanes_and_the_thread_engine_one(make_tier, engine):
    """A worker process runs io_depth threads, each with the niceness and policy asked for (both belong to a
    thread on Linux); the threads engine keeps one host thread per worker."""
    processes = engine == "processes"
    tier = make_tier(config=TierConfig(io_depth=3, **({"worker_nice": 7, "worker_sched": "batch"} if processes else {})))
    wait_ready(tier)
    if processes:
        for pid in tier.worker_pids():
            deadline = time.monotonic() + 10
            while len(lanes := os.listdir(f"/proc/{pid}/task")) < 3:
                assert time.monotonic() < deadline, f"worker {pid} runs {len(lanes)} threads, not 3"
            assert len(lanes) == 3
            for tid in map(int, lanes):
                assert os.sched_getscheduler(tid) == os.SCHED_BATCH
                assert os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
    else:
        assert len(worker_threads()) == 4
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=make_keys(1), block_ids=[1])).success


@pytest.mark.parametrize("engine", ["processes"])  # lanes are threads of a worker process
def test_idle_lanes_sleep_after_a_burst_that_rang_the_doorbell(make_tier, engine):
    """A lane that takes a task and sees more rings the doorbell for another; whoever wakes for it must drain
    it, or every lane after that spins on a bell epoll keeps reporting (a whole CPU per worker, idle)."""
    from mp_tier.bench.tier_runs import worker_cpu_seconds

    tier = make_tier(config=TierConfig(io_depth=8), n_read_workers=1, n_write_workers=1)
    wait_ready(tier)
    for i, key in enumerate(make_keys(64)):  # one job each: frames pile up, and a lane that takes one rings for the next
        tier.submit_store(JobMetadata(job_id=i, keys=[key], block_ids=[i]))
    all_succeed(tier, 64)
    pids = tier.worker_pids()
    before, start = worker_cpu_seconds(pids), time.monotonic()
    time.sleep(0.5)  # a measurement window, not a synchronisation: a spinning lane burns nearly all of it
    used = worker_cpu_seconds(pids) - before
    assert used < 0.1 * (time.monotonic() - start), f"idle workers used {used:.3f} s of CPU: a lane is spinning"


def worker_cpus(tier: FileSystemTierManager) -> set[frozenset[int]]:
    """The CPU sets of every thread of every worker process."""
    return {frozenset(os.sched_getaffinity(int(tid))) for pid in tier.worker_pids() for tid in os.listdir(f"/proc/{pid}/task")}


def until_workers_on(tier: FileSystemTierManager, cpus: set[int]) -> None:
    """Call get_finished() as a scheduler's steps do until every worker thread may run on ``cpus`` only."""
    deadline = time.monotonic() + 10
    while worker_cpus(tier) != {frozenset(cpus)}:
        assert time.monotonic() < deadline, f"workers on {worker_cpus(tier)}, not {cpus}"
        tier.get_finished()
        time.sleep(0.01)


@pytest.mark.parametrize("engine", ["processes"])
def test_by_default_the_workers_keep_off_the_cpu_of_the_thread_that_calls_get_finished(make_tier, engine):
    """A scheduler thread moved (here by pinning it) takes its CPU with it: within a few steps every thread
    of every worker may run anywhere the host may but there. A worker started after a move is placed too."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    first, second = sorted(allowed)[:2]
    tier = make_tier()
    wait_ready(tier)
    try:
        for here in (second, first):
            os.sched_setaffinity(0, {here})
            until_workers_on(tier, allowed - {here})
        os.kill(tier.worker_pids()[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tier.stats().workers_restarted < 1:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            tier.wait(0.01)
        wait_ready(tier)
        until_workers_on(tier, allowed - {first})
        assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    finally:
        os.sched_setaffinity(0, allowed)


@pytest.mark.parametrize("engine", ["processes"])
def test_a_worker_replaced_after_the_scheduler_thread_moved_starts_off_its_cpu(make_tier, engine):
    """A replacement's start-up (tens of ms of CPU) keeps off the scheduler thread's CPU as it is now, not as
    it was at construction, before any get_finished() moves it."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    tier = make_tier()
    wait_ready(tier)
    (at_construction,) = worker_cpus(tier)
    here = min(at_construction)  # the scheduler thread moves onto a CPU the construction gave the workers
    try:
        os.sched_setaffinity(0, {here})
        until_workers_on(tier, allowed - {here})
        before = set(tier.worker_pids())
        os.kill(min(before), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tier.stats().workers_restarted < 1:  # no get_finished() from here on: nothing follows the scheduler
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            tier.wait(0.01)
        wait_ready(tier)
        (replacement,) = set(tier.worker_pids()) - before
        assert os.sched_getaffinity(replacement) == allowed - {here}
    finally:
        os.sched_setaffinity(0, allowed)


@pytest.mark.parametrize("engine", ["processes"])
def test_worker_cpus_given_are_kept_wherever_the_scheduler_thread_runs(make_tier, engine):
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    tier = make_tier(config=TierConfig(worker_cpus=[cpu]))
    wait_ready(tier)
    try:
        os.sched_setaffinity(0, {cpu})
        deadline = time.monotonic() + 0.5  # several looks at the scheduler thread's CPU
        while time.monotonic() < deadline:
            tier.get_finished()
            time.sleep(0.01)
        assert worker_cpus(tier) == {frozenset({cpu})}
    finally:
        os.sched_setaffinity(0, allowed)


ONE_CPU_HOST = textwrap.dedent(
    """
    import os, sys
    from mp_tier import FileSystemTierManager, PrimaryCache
    cpu = int(sys.argv[2])
    os.sched_setaffinity(0, {cpu})
    with PrimaryCache.create(4, 65536) as cache:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1])
        tier.drain(10)
        print(sorted({c for pid in tier.worker_pids() for c in os.sched_getaffinity(pid)}))
        tier.shutdown()
    """
)


def test_a_host_allowed_one_cpu_shares_it_with_its_workers(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", ONE_CPU_HOST, str(tmp_path / "blocks"), str(cpu)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"[{cpu}]"


def test_worker_cpus_the_host_cannot_use_are_refused(cache, tmp_path):
    with pytest.raises(ValueError, match=r"worker_cpus \[4095\] are not CPUs this process may run on"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path), config=TierConfig(worker_cpus=[4095]))


REFUSED_SETTING_HOST = textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, PrimaryCache, TierConfig
    with PrimaryCache.create(4, 65536) as cache:
        try:
            FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], config=TierConfig(**json.loads(sys.argv[2])))
        except ValueError as e:
            print(e)
    """
)


REFUSE_POLICY = (
    "#include <errno.h>\n#include <sched.h>\n"
    "int sched_setscheduler(pid_t pid, int policy, const struct sched_param *param) { errno = EPERM; return -1; }\n"
)
REFUSE_AFFINITY = (
    "#include <errno.h>\n#include <sched.h>\n"
    "int sched_setaffinity(pid_t pid, size_t size, const cpu_set_t *set) { errno = EPERM; return -1; }\n"
)


@pytest.mark.parametrize(
    ("refuse", "setting", "said"),
    [
        (REFUSE_POLICY, {"worker_sched": "idle"}, "worker_sched = 'idle'"),
        (REFUSE_AFFINITY, {"worker_cpus": [cpu := min(os.sched_getaffinity(0))]}, f"worker_cpus = [{cpu}]"),
    ],
    ids=["worker_sched", "worker_cpus"],
)
def test_a_worker_setting_the_host_may_not_apply_is_refused_at_construction(tmp_path, refuse, setting, said):
    """A sandbox whose seccomp profile refuses sched_setscheduler or sched_setaffinity (stood in for by a
    libc shim that fails it with EPERM): the constructor names the setting, instead of workers dying at
    start until the tier breaks."""
    env = libc_shim(tmp_path, "refuse", refuse)
    host = [sys.executable, "-c", REFUSED_SETTING_HOST, str(tmp_path / "blocks"), json.dumps(setting)]
    done = subprocess.run(host, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{said} is refused here: Operation not permitted", done.stderr[-2000:]


REFUSED_AFFINITY_HOST = textwrap.dedent(
    """
    import sys, time
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    with PrimaryCache.create(4, 65536) as cache:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1])
        tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
        results, deadline = [], time.monotonic() + 0.5  # several looks at the scheduler thread's CPU
        while time.monotonic() < deadline or not results:
            results += tier.get_finished()
            time.sleep(0.01)
        print([(r.job_id, r.success) for r in results], tier.stats().workers_restarted)
        tier.shutdown()
    """
)


def test_a_sandbox_that_refuses_sched_setaffinity_leaves_the_default_tier_working(tmp_path):
    """Keeping the workers off the scheduler thread's CPU is a hint: where a seccomp profile refuses
    sched_setaffinity, workers start and serve where the kernel puts them, and no call fails."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    env = libc_shim(tmp_path, "refuse_affinity", REFUSE_AFFINITY)
    host = [sys.executable, "-c", REFUSED_AFFINITY_HOST, str(tmp_path / "blocks")]
    done = subprocess.run(host, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(1, True)] 0", done.stderr[-2000:]
