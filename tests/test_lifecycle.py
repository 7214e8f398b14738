"""A tier's whole life under hostile use: submits that must change nothing, absurd settings, stuck and
stopped workers, running out of fds, and ends without shutdown (dropped, interpreter exit, __del__)."""

from __future__ import annotations

import _thread
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import BLOCK, NAMESPACE, all_succeed, fill_random, make_keys, open_fds, run_job, stop_processes, wait_exit, wait_ready, worker_threads

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierBroken, TierConfig
from mp_tier.layout import BLOCK_SUFFIX, CONFIG_FILE, LAYOUT_VERSION, TEMP_SUFFIX, VERSION_KEY
from mp_tier.worker_process import TEST_PAUSE


def disk_blocks(base: str) -> int:
    return sum(name.endswith(BLOCK_SUFFIX) for _, _, names in os.walk(base) for name in names)


def test_victims_with_longer_keys_than_the_store_travel_in_frames_sized_for_them(make_tier, cache):
    """The budget is full of 68-byte keys; a store of 36-byte keys evicts them all. Every check and every
    frame is made before anything changes, so the store goes out whole and the disk stays in budget."""
    tier = make_tier(config=TierConfig(max_bytes=40 * BLOCK))
    fill_random(cache, range(40))
    old = make_keys(40, seed=1, hash_bytes=64)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=old, block_ids=list(range(40)))).success
    new = make_keys(40, seed=2)
    assert run_job(tier, "store", JobMetadata(job_id=2, keys=new, block_ids=list(range(40)))).success
    assert disk_blocks(tier.layout.base) == 40
    assert all(os.path.exists(tier.block_path(k)) for k in new) and not any(os.path.exists(tier.block_path(k)) for k in old)
    assert tier.stats().blocks_evicted == 40 and tier.stats().bytes_counted == 40 * BLOCK


def test_a_refused_submit_changes_nothing(make_tier, cache):
    """A job whose last key is bad: nothing counted, queued or pinned, and its id is free at once."""
    tier = make_tier(config=TierConfig(max_bytes=4 * BLOCK, events=True))
    wait_ready(tier)
    tier.drain(30)
    before = tier.stats()
    keys = [*make_keys(3), b"short"]
    with pytest.raises(ValueError, match="shorter than"):
        tier.submit_store(JobMetadata(job_id=7, keys=keys, block_ids=[0, 1, 2, 3]))
    assert tier.stats() == before and tier.take_events() == []
    assert tier.lookup_many(keys[:3]) == [False] * 3
    assert run_job(tier, "store", JobMetadata(job_id=7, keys=keys[:3], block_ids=[0, 1, 2])).success


def test_a_budget_below_one_block_is_refused_naming_both_numbers(cache, tmp_path):
    with pytest.raises(ValueError, match=f"max_bytes 100 is less than one block of {BLOCK} bytes"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "r"), config=TierConfig(max_bytes=100))
    assert not (tmp_path / "r").exists()


def test_no_limit_and_bad_timeouts(tier):
    tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
    tier.drain(float("inf"))
    assert tier.wait(float("inf")) is True and len(tier.get_finished()) == 1
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0 or None"):
            tier.drain(bad)
    assert tier.wait(0) is False


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_a_dropped_tier_stops_its_workers_and_closes_its_fds(cache, tmp_path, engine):
    """No shutdown(): the tier's finalizer stops its workers when it is collected (the autouse leak check
    then finds no fd, thread or process left)."""
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path), n_read_workers=1, n_write_workers=1, engine=engine)
    fill_random(cache, [0])
    tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
    pids = tier.worker_pids()
    del tier
    gc.collect()
    assert all(wait_exit(pid, 5) for pid in pids)


def test_a_constructor_that_fails_leaves_nothing(cache, tmp_path):
    """Refused after its pipes and memory fd were made (the namespace is a file): the leak check finds nothing."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / NAMESPACE).write_text("not a directory")
    with pytest.raises(OSError, match="not usable"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "root"))


def test_a_ctrl_c_while_a_worker_thread_starts_leaves_it_no_fd_of_the_host_to_touch(cache, tmp_path, caplog):
    """SIGINT lands as the tier's first worker thread has just started (delivered when ``Thread.start`` returns from
    making it, so its KeyboardInterrupt comes from the wait for the thread to begin): the constructor raises it,
    and the thread, which runs, must still find its fds its own. Before, the pool closed them under it and the
    thread wrote its end into a pipe the host opened right after. And a cache closed then stayed mapped until a
    garbage collection: the failed constructor never let go of it, and a thread that ended holds it in a cycle."""
    started = 0

    def ring_at_the_first_start(frame: object, event: str, arg: object) -> None:
        nonlocal started
        if event == "c_return" and arg is _thread.start_new_thread:
            started += 1
            if started == 1:
                signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    pipes: list[tuple[int, int]] = []
    gc.disable()  # what the failed constructor leaves is freed by reference counting alone, not a later collection
    try:
        sys.setprofile(ring_at_the_first_start)
        try:
            with pytest.raises(KeyboardInterrupt):
                FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "root"), engine="threads")
        finally:
            sys.setprofile(None)
        pipes = [os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(32)]
        deadline = time.monotonic() + 10
        while worker_threads():
            assert time.monotonic() < deadline, "a worker thread outlived the failed constructor"
        for r, w in pipes:
            with pytest.raises(BlockingIOError):
                os.read(r, 4096)  # nothing was written into the host's pipe (and it is still open)
            os.write(w, b"x")
            assert os.read(r, 1) == b"x"
        assert [r.getMessage() for r in caplog.records if r.name == "mp_tier.workers"] == []  # the thread ran on open fds and slots
        cache.close()
        with open("/proc/self/maps") as maps:
            assert cache.name not in maps.read(), "the failed constructor kept the cache mapped after it was closed"
    finally:
        gc.enable()
        signal.signal(signal.SIGINT, previous)
        for pair in pipes:
            for fd in pair:
                os.close(fd)


FD_STARVED = textwrap.dedent(
    """
    import json, os, resource, signal, sys, time
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    cache = PrimaryCache.create(16, 65536)
    report = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 3, hard))  # too few for a tier's pipes
    try:
        FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1])
    except OSError as e:
        report["ctor"] = str(e)
    report["fds_after_failed_ctor"] = len(os.listdir("/proc/self/fd")) - opened
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
    while tier.stats().workers_starting or tier.stats().workers_alive < 2:
        tier.wait(0.01)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # no new fd at all: not even the one the dead worker frees
    os.kill(tier.worker_pids()[0], signal.SIGKILL)
    slowest, deadline = 0.0, time.monotonic() + 0.5
    while time.monotonic() < deadline:  # the replacement cannot start: get_finished must neither raise nor stall
        start = time.monotonic()
        tier.get_finished()
        slowest = max(slowest, time.monotonic() - start)
    report["alive_while_starved"] = tier.stats().workers_alive
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    while tier.stats().workers_alive < 2 or tier.stats().workers_starting:
        tier.wait(0.05)
    tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
    tier.drain(30)
    report["after"] = tier.get_finished()[0].success
    report["slowest_poll"] = slowest
    tier.shutdown()
    cache.close()
    print(json.dumps(report))
    """
)


def test_running_out_of_fds_is_named_and_survived(tmp_path):
    done = subprocess.run([sys.executable, "-c", FD_STARVED, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "EMFILE" in report["ctor"] or "Too many open files" in report["ctor"]
    assert report["fds_after_failed_ctor"] == 0
    assert report["alive_while_starved"] == 1
    assert report["after"] is True
    assert "could not start: EMFILE" in done.stderr


@pytest.mark.parametrize("engine", ["processes"])
def test_a_stopped_worker_holding_a_task_is_killed_and_its_task_sent_again(make_tier, engine):
    """SIGSTOP every worker while one holds a store task: after task_timeout it is killed (and really gone
    before the task goes to its replacement), so the job still gets its one result. On a loaded host this
    test may stop the workers only once the whole store has landed: it proves nothing then, and goes again."""
    big = PrimaryCache.create(32, 1 << 20)
    try:
        tier = make_tier(n_read_workers=1, n_write_workers=1, view=big, config=TierConfig(task_timeout=0.5, o_direct="off"))
        wait_ready(tier)
        for attempt in range(5):
            keys = make_keys(32, seed=attempt)
            tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=list(range(32))))
            deadline = time.monotonic() + 10
            while not any(os.path.exists(tier.block_path(k)) for k in keys):
                assert time.monotonic() < deadline
            stopped = tier.worker_pids()
            stop_processes(stopped)
            if not all(os.path.exists(tier.block_path(k)) for k in keys):
                break  # the rest of the store waits on a stopped worker
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            all_succeed(tier, 1)
        else:
            pytest.fail("the whole store had landed each time the workers stopped: nothing was tested")
        results = []
        while not results:
            assert tier.wait(30)
            results = tier.get_finished()
        assert [(r.job_id, r.success) for r in results] == [(1, True)]
        assert tier.stats().tasks_timed_out >= 1
        for pid in set(stopped) & set(tier.worker_pids()):
            os.kill(pid, signal.SIGCONT)  # the idle one is still stopped
        tier.shutdown()
    finally:
        big.close()


@pytest.mark.parametrize("engine", ["processes"])
@pytest.mark.parametrize("where", ["task", "claim"])
def test_a_task_that_times_out_twice_fails_with_etimedout(make_tier, tmp_path, monkeypatch, engine, where):
    """Every worker that takes the load stalls on it far past task_timeout (the test hook holds it, named,
    or read but not yet named): killed, sent again, killed again; the job fails with ETIMEDOUT, not a hang."""
    monkeypatch.setenv(TEST_PAUSE, f"{where}:30:{tmp_path / 'marker'}")
    tier = make_tier(config=TierConfig(task_timeout=0.3))
    result = run_job(tier, "load", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
    assert not result.success and result.error_code == "ETIMEDOUT" and "retried once" in result.error
    assert tier.stats().tasks_timed_out == 2



def _stalled_pids(marker: Path) -> set[int]:
    return {int(pid) for pid in marker.read_text().split()} if marker.exists() else set()


def _wait_for_the_stall(tier: FileSystemTierManager, marker: Path, pids: set[int]) -> None:
    """Until every worker in ``pids`` has written itself into the boot stall's marker."""
    deadline = time.monotonic() + 10
    while _stalled_pids(marker) != pids:
        assert time.monotonic() < deadline, "the workers never reached the stall"
        tier.wait(0.01)


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_a_cache_closed_while_its_tier_runs_is_unmapped_when_the_tier_ends(make_tier, engine):
    """The owner closes its PrimaryCache first (the segment is unlinked at once) while a tier still uses
    the mapping; the tier works on, and once it shuts down no fd or mapping of the segment is left."""
    own = PrimaryCache.create(8, BLOCK)
    name = own.name
    tier = make_tier(view=own, n_read_workers=1, n_write_workers=1)
    own.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    tier.shutdown()
    assert [target for target in open_fds().values() if name in target] == []
    assert name not in Path("/proc/self/maps").read_text()
    assert own.closed


@pytest.mark.parametrize("engine", ["processes"])
def test_a_worker_that_hangs_while_starting_is_killed_at_start_timeout_and_replaced(make_tier, tmp_path, monkeypatch, engine):
    """Every worker stalls in its start-up (a hung mount on its import path, say), so nobody takes the
    store. At start_timeout they are killed; their replacements start without the stall and serve it."""
    marker = tmp_path / "booting"
    monkeypatch.setenv(TEST_PAUSE, f"boot:30:{marker}")
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(start_timeout=3))
    hung = set(tier.worker_pids())
    monkeypatch.delenv(TEST_PAUSE)  # the replacements' environment
    _wait_for_the_stall(tier, marker, hung)
    result = run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
    assert result.success
    assert all(wait_exit(pid, 5) for pid in hung)
    assert not hung & set(tier.worker_pids()) and tier.stats().workers_restarted == 2


@pytest.mark.parametrize("engine", ["processes"])
def test_a_start_slower_than_task_timeout_is_waited_for(make_tier, tmp_path, monkeypatch, engine):
    """Workers that take a second to start, with task_timeout 0.2 s: that deadline is about tasks held, so
    they are left to start, and serve the job."""
    marker = tmp_path / "booting"
    monkeypatch.setenv(TEST_PAUSE, f"boot:1:{marker}")
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(task_timeout=0.2))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    assert _stalled_pids(marker) and tier.stats().workers_restarted == 0


@pytest.mark.parametrize("engine", ["processes"])
def test_shutdown_does_not_wait_for_workers_stuck_in_their_start(make_tier, tmp_path, monkeypatch, engine):
    """A worker still starting holds no task: shutdown kills it at once instead of giving it stop_timeout."""
    marker = tmp_path / "booting"
    monkeypatch.setenv(TEST_PAUSE, f"boot:60:{marker}")
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(stop_timeout=30))
    hung = set(tier.worker_pids())
    _wait_for_the_stall(tier, marker, hung)
    started = time.monotonic()
    tier.shutdown()
    assert time.monotonic() - started < 10, "shutdown waited for workers that hold nothing"
    assert all(wait_exit(pid, 1) for pid in hung)


@pytest.mark.parametrize("engine", ["processes"])
def test_workers_that_never_start_break_the_tier_naming_why(make_tier, tmp_path, monkeypatch, engine):
    """Every start stalls, replacements included: the tier breaks once start-up deaths fill the start-up
    window, and the job waiting on them gets its one result, naming the stall, instead of waiting forever."""
    monkeypatch.setenv(TEST_PAUSE, f"boot:30:{tmp_path / 'booting'}")
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(start_timeout=1))
    result = run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
    assert not result.success and result.error_code == "ENOTRECOVERABLE"
    assert "workers in a row died while starting" in result.error
    assert "for not starting within start_timeout 1 s" in result.error
    with pytest.raises(TierBroken, match="died while starting"):
        tier.get_finished()
    assert tier.worker_pids() == []
    assert tier.stats().bytes_counted == 0, "a store no worker ever started is still counted"

EXITING_HOST = textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    cache = PrimaryCache.create(64, 1 << 20)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=2)
    for j in range(40):
        tier.submit_store(JobMetadata(job_id=j, keys=[bytes([j, 0]) * 16 + bytes(4), bytes([j, 1]) * 16 + bytes(4)], block_ids=[0, 1]))
    print(json.dumps({"workers": tier.worker_pids(), "shm": cache.name}), flush=True)
    if sys.argv[2] == "del":
        class Owner:
            def __del__(self):
                tier.shutdown()  # at interpreter exit, after the finalizer already stopped the workers
        keep = Owner()
    sys.exit(0)  # no shutdown(), no cache.close()
    """
)


@pytest.mark.parametrize("how", ["exit", "del"])
def test_an_interpreter_exit_without_shutdown_leaves_no_worker_temp_file_or_segment(tmp_path, how):
    root = tmp_path / "blocks"
    done = subprocess.run([sys.executable, "-c", EXITING_HOST, str(root), how], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    info = json.loads(done.stdout)
    assert all(wait_exit(pid, 5) for pid in info["workers"])
    assert list(root.rglob(f"*{TEMP_SUFFIX}")) == []
    deadline = time.monotonic() + 10
    while os.path.exists(f"/dev/shm/{info['shm']}"):
        assert time.monotonic() < deadline, "the segment outlived its creator"
        time.sleep(0.01)


KILLED_HOST = textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
    cache = PrimaryCache.create(20, 4 << 20)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1,
                                 config=TierConfig(o_direct="off"))
    while tier.stats().workers_starting or tier.stats().workers_alive < 2:
        tier.wait(0.01)
    keys = [i.to_bytes(36, "big") for i in range(20)]  # one task: a frame holds 20 blocks
    print(json.dumps({"workers": tier.worker_pids(), "paths": [tier.block_path(k) for k in keys]}), flush=True)
    tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=list(range(20))))
    sys.stdin.read()  # until it is killed
    """
)


def test_a_worker_whose_host_is_killed_stops_after_the_block_it_is_writing(tmp_path):
    """The host is SIGKILLed while a worker is partway through a 20-block store. The worker notices between
    blocks and ends, rather than writing the rest of the task for nobody; it leaves no temp file."""
    root = tmp_path / "blocks"
    host = subprocess.Popen([sys.executable, "-c", KILLED_HOST, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        info = json.loads(host.stdout.readline())
        paths, workers = info["paths"], info["workers"]
        deadline = time.monotonic() + 20
        while not os.path.exists(paths[0]):
            assert time.monotonic() < deadline, "the store never began"
        stop_processes(workers)  # held while the host dies, so the test sees where the task was
        caught = sum(map(os.path.exists, paths))
        host.kill()
        host.wait(10)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        assert [pid for pid in workers if not wait_exit(pid, 10)] == [], "a worker outlived its host"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)
        for pipe in (host.stdin, host.stdout):
            if pipe is not None:
                pipe.close()
    assert caught < len(paths), "the store ended before the host was killed: nothing was tested"
    landed = sum(map(os.path.exists, paths))
    assert landed <= caught + 1, f"the worker went on writing for a dead host: {caught} blocks when it died, {landed} after"
    assert list(root.rglob(f"*{TEMP_SUFFIX}")) == []


@pytest.mark.parametrize("engine", ["processes"])
def test_workers_spawned_by_a_host_thread_that_ended_keep_serving_their_live_host(make_tier, engine):
    """A host builds its tier in a thread that then ends: the kernel gives the workers another thread of the
    host as parent, and a worker, which checks between blocks that the host is still its parent, must not
    take that for the host's death and drop its tasks."""
    made: list[FileSystemTierManager] = []
    builder = threading.Thread(target=lambda: made.append(make_tier(n_read_workers=1, n_write_workers=1)))
    builder.start()
    builder.join()
    [tier] = made
    wait_ready(tier)
    pids = tier.worker_pids()
    keys = make_keys(40)  # two tasks of 20 blocks: 19 checks between blocks each
    for op in ("store", "load"):
        result = run_job(tier, op, JobMetadata(job_id=len(op), keys=keys, block_ids=list(range(40))))
        assert result.success, result.error
    assert tier.worker_pids() == pids and tier.stats().workers_restarted == 0, "a worker took a dead thread for a dead host"
    assert all(os.path.isfile(tier.block_path(k)) for k in keys)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["empty", "garbage", "a list", "a directory", "a FIFO"])
def test_a_bad_config_json_is_named_and_never_hangs(cache, tmp_path, kind):
    namespace = tmp_path / NAMESPACE
    namespace.mkdir(mode=0o700)
    config = namespace / CONFIG_FILE
    if kind == "empty":
        config.write_bytes(b"")
    elif kind == "garbage":
        config.write_bytes(b"\x00\xff garbage")
    elif kind == "a list":
        config.write_text("[]")
    elif kind == "a directory":
        config.mkdir()
    else:
        os.mkfifo(config)
    with pytest.raises(ValueError, match=f"{config}.*remove it if no tier uses this namespace"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path))


def test_config_json_is_written_durably_and_once(make_tier, tmp_path):
    tier = make_tier()
    config = Path(tier.layout.base) / CONFIG_FILE
    assert json.loads(config.read_text()) == {"block_bytes": BLOCK, VERSION_KEY: LAYOUT_VERSION}
    first = config.stat().st_ino
    tier.shutdown()
    make_tier()
    assert config.stat().st_ino == first, "a second tier rewrote config.json"

