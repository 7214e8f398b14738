"""Shared fixtures: real caches, real tiers, and a leak check after every test.

tests/unit overrides ``no_leaks`` with a check that nothing there starts a process, so the janitor
(which the leak check here needs running) never starts for the unit layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import BLOCK, child_processes, open_fds, shm_segments, wait_exit, worker_threads

from mp_tier import FileSystemTierManager, PrimaryCache
from mp_tier.layout import TEMP_SUFFIX


@pytest.fixture(scope="session")
def janitor_started() -> None:
    """The first segment starts this process's janitor, which holds a pipe for the whole run."""
    PrimaryCache.create(1, 4096).close()


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: Path, janitor_started: None):
    """After each test: no new segment, temp file, fd, child process or worker thread."""
    segments, fds, children = shm_segments(), open_fds(), child_processes()
    yield
    assert shm_segments() - segments == set(), "a shared-memory segment leaked"
    assert [p for p in tmp_path.rglob(f"*{TEMP_SUFFIX}")] == [], "a temp file leaked"
    assert worker_threads() == [], "a worker thread outlived its tier"
    assert {fd: what for fd, what in open_fds().items() if fds.get(fd) != what} == {}, "an fd leaked"
    assert child_processes() - children == set(), "a child process outlived its test"


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
        assert [pid for pid in pids if not wait_exit(pid, 5)] == [], "a worker outlived shutdown"


@pytest.fixture
def tier(make_tier):
    return make_tier()


@pytest.fixture
def plant_chain():
    """``plant_chain(base, depth)`` nests directories ``depth`` deep: far past what a recursive walk
    survives, and past PATH_MAX; removed after the test."""
    planted: list[Path] = []

    def plant(base: Path, depth: int) -> None:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        for made in range(depth):
            os.mkdir("d", dir_fd=fd)
            if not made:
                planted.append(base)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(fd)

    yield plant
    for base in planted:
        subprocess.run(["rm", "-rf", str(base / "d")], check=True)  # rm walks any depth; shutil.rmtree recurses


@pytest.fixture
def shared_tmp():
    """A directory like /tmp (mode 1777) where a second user can make things."""
    path = Path(tempfile.mkdtemp(prefix="mp_tier_shared_", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)
