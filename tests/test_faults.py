"""Faults provoked for real: killed workers, a killed host, a full file system, stale temp files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import BLOCK, fill_random, make_keys, run_job, wait_exit
from mp_tier import JobMetadata, TierBroken
from mp_tier.block_io import temp_path


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
    while tier.stats()["workers_restarted"] == 0:
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
    assert all("died" in r.error for r in failed)
    assert tier.stats()["workers_alive"] == 4


def test_a_worker_that_cannot_start_breaks_the_tier(make_tier, cache):
    tier = make_tier()
    keys = make_keys(40)
    for j, key in enumerate(keys):
        tier.submit_store(JobMetadata(job_id=j, keys=[key], block_ids=[j]))
    os.unlink(f"/dev/shm/{cache.name}")  # replacements cannot attach: every restart dies at once
    for pid in tier.worker_pids():
        os.kill(pid, signal.SIGKILL)
    results: dict = {}
    deadline = time.monotonic() + 30
    with pytest.raises(TierBroken, match="died while starting"):
        while True:
            assert time.monotonic() < deadline
            tier.wait(1)
            results.update((r.job_id, r) for r in tier.get_finished())
    assert sorted(results) == list(range(40)), "every job still gets one result"
    assert all(r.success or "broken" in r.error or "died" in r.error for r in results.values())
    for call in (lambda: tier.submit_load(JobMetadata(job_id=99, keys=keys[:1], block_ids=[0])), tier.get_finished, tier.drain):
        with pytest.raises(TierBroken):
            call()
    assert tier.worker_pids() == []


HOST = textwrap.dedent(
    """
    import json, sys
    import multiprocess.resource_tracker as rt
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    if __name__ == "__main__":
        cache = PrimaryCache.create(16, 65536)
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=2)
        for j in range(200):
            tier.submit_store(JobMetadata(job_id=j, keys=[j.to_bytes(32, "big") + bytes(4)], block_ids=[j % 16]))
        print(json.dumps({"pids": tier.worker_pids(), "shm": cache.name, "tracker": rt._resource_tracker._pid}), flush=True)
        sys.stdin.read()
    """
)


def test_workers_and_segment_do_not_outlive_a_killed_host(tmp_path):
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, str(tmp_path / "blocks")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        info = json.loads(host.stdout.readline())
    finally:
        host.kill()
        host.wait()
    for pid in info["pids"]:
        assert wait_exit(pid, 2.0), f"worker {pid} outlived its host by 2 s"
    assert wait_exit(info["tracker"], 10)
    assert not os.path.exists(f"/dev/shm/{info['shm']}")
    host.stdin.close()
    host.stdout.close()


def test_restart_removes_temp_files_of_dead_writers_only(make_tier, tmp_path):
    tier = make_tier()
    keys = make_keys(3)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2])).success
    tier.shutdown()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    paths = [tier.block_path(k) for k in keys]
    orphan = temp_path(paths[0]).replace(f".{os.getpid()}.", f".{dead_pid}.")
    live = temp_path(paths[1])  # this process is alive: its temp file must stay
    foreign = temp_path(paths[2]).replace(".tmp", "").rsplit(".", 3)[0] + ".otherhost.123.0.tmp"
    for path in (orphan, live, foreign):
        with open(path, "wb") as f:
            f.write(b"partial")
    tier2 = make_tier()
    tier2.submit_store(JobMetadata(job_id=2, keys=make_keys(1, seed=5), block_ids=[3]))
    tier2.drain(30)
    deadline = time.monotonic() + 10
    while tier2.stats()["files_removed"] < 1:  # the sweep runs in a worker, after construction
        assert time.monotonic() < deadline
        tier2.wait(0.1)
        tier2.get_finished()
    assert not os.path.exists(orphan)
    assert os.path.exists(live) and os.path.exists(foreign)
    os.unlink(live)
    os.unlink(foreign)


def _mount(kind: str, target: str, image_dir) -> None:
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", target]
    else:
        image = str(image_dir / "fs.img")
        subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=1M", "count=8"], check=True, capture_output=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True, capture_output=True)
        cmd = ["mount", "-o", "loop", image, target]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small {kind} here: {done.stderr.strip()}")


@pytest.mark.parametrize("fs", ["tmpfs", "ext4-loop"])
def test_enospc_fails_the_store_cleanly_and_the_tier_recovers(make_tier, cache, tmp_path, fs):
    target = tmp_path / "small"
    target.mkdir()
    _mount("tmpfs" if fs == "tmpfs" else "ext4", str(target), tmp_path)
    try:
        tier = make_tier(root_dir=str(target))
        fill_random(cache, range(200))
        keys = make_keys(200)
        result = run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(200))))
        assert not result.success and result.error.startswith("ENOSPC")
        stored = set(result.successful_keys)
        assert 0 < len(stored) < 200
        for key in keys:
            path = tier.block_path(key)
            assert os.path.exists(path) == (key in stored)
            if key in stored:
                assert os.path.getsize(path) == BLOCK  # never a partial block under a final name
        assert list(target.rglob("*.tmp")) == []
        for key in list(stored)[:20]:
            os.unlink(tier.block_path(key))
        retry = [k for k in keys if k not in stored][:10]
        again = run_job(tier, "store", JobMetadata(job_id=2, keys=retry, block_ids=list(range(10))))
        assert again.success, again.error
        loaded = run_job(tier, "load", JobMetadata(job_id=3, keys=retry, block_ids=list(range(210, 220))))
        assert loaded.success and np.array_equal(cache.array[210:220], cache.array[:10])
        tier.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
