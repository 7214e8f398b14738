"""The unit layer: pure logic, no process, no janitor, no shared memory.

This ``no_leaks`` replaces the top-level one for every test here: a test that forks, spawns or
creates a shared-memory segment fails, so ``pytest tests/unit`` stays a few seconds with no
process to leak.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import NoReturn

import pytest

from mp_tier.shared_cache import SEGMENT_PREFIX


def _refused(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("a unit test started a process; it belongs outside tests/unit")


def _children() -> set[int]:
    children: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(map(int, f.read().split()))
        except FileNotFoundError:
            pass  # a thread that ended since the listing
    return children


def _segments() -> set[str]:
    """This process's segments (other test runs share /dev/shm)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")}


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every way this package or a test could start a process raises; nothing new in /dev/shm or among our children."""
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
        monkeypatch.setattr(os, name, _refused)
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _refused)
    children, segments = _children(), _segments()
    yield
    assert _children() <= children, "a unit test left a child process"
    assert _segments() - segments == set(), "a unit test made a shared-memory segment"
