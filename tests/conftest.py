"""Shared fixtures: real caches, real tiers, and a leak check after every test."""

from __future__ import annotations

import os
import select
from pathlib import Path

import numpy as np
import pytest

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
from mp_tier.shared_cache import SEGMENT_PREFIX

BLOCK = 64 << 10


def shm_segments() -> set[str]:
    """This process's segments (other test runs may share /dev/shm)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")}


def make_keys(n: int, seed: int = 0, group: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(32) + group.to_bytes(4, "big") for _ in range(n)]


def fill_random(cache: PrimaryCache, block_ids, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for b in block_ids:
        cache.array[b] = rng.integers(0, 256, cache.block_bytes, dtype=np.uint8)


def run_job(tier: FileSystemTierManager, kind: str, job: JobMetadata, timeout: float = 30):
    getattr(tier, f"submit_{kind}")(job)
    tier.drain(timeout)
    results = tier.get_finished()
    assert [r.job_id for r in results] == [job.job_id]
    return results[0]


def wait_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited; a pidfd, because workers are the forkserver's children, not ours."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path):
    """After each test: no new segment in /dev/shm and no temp file under tmp_path."""
    before = shm_segments()
    yield
    assert shm_segments() - before == set(), "a shared-memory segment leaked"
    assert [p for p in tmp_path.rglob("*.tmp")] == [], "a temp file leaked"


@pytest.fixture
def cache():
    with PrimaryCache.create(num_blocks=256, block_bytes=BLOCK) as c:
        yield c


@pytest.fixture(params=["processes", "threads"])
def engine(request) -> str:
    return request.param


@pytest.fixture
def make_tier(cache, tmp_path, engine):
    """Builds tiers on ``cache`` under tmp_path; shuts them down and checks their workers are gone."""
    tiers = []

    def make(**kwargs) -> FileSystemTierManager:
        kwargs.setdefault("root_dir", str(tmp_path / "blocks"))
        kwargs.setdefault("n_read_workers", 2)
        kwargs.setdefault("n_write_workers", 2)
        kwargs.setdefault("engine", engine)
        tier = FileSystemTierManager(primary_kv_view=kwargs.pop("view", cache), **kwargs)
        tiers.append((tier, tier.worker_pids()))
        return tier

    yield make
    for tier, pids in tiers:
        tier.shutdown()
        assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == [], "a worker outlived shutdown"


@pytest.fixture
def tier(make_tier):
    return make_tier()
