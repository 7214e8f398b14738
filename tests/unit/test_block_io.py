"""One block between a buffer and its file, on real files: the usual case and every way it steps aside.

A block's usual load or store is one C call; anything unusual is done again by
``block_io``'s Python checks. These tests hold the result to the same promises
whichever of the two does the work: nothing outside the root, nothing half
written, the hook before the bytes move called only when they do.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import bytes_read, overlay

from mp_tier import _block_calls, block_io
from mp_tier.layout import BlockLayout, BlockPath, is_temp
from mp_tier.namespace import Owners

BLOCK = 4 * mmap.PAGESIZE
KEY = bytes(range(32)) + (7).to_bytes(4, "big")
ME = Owners(os.getuid())
STRANGER = 54321  # a uid and gid no test user has
PATH = BlockLayout("ns").locate(KEY)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "ns").mkdir()
    fd = os.open(tmp_path / "ns", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def cache() -> Iterator[memoryview]:
    """Two blocks: 0 holds random bytes to store, 1 is where loads land."""
    area = mmap.mmap(-1, 2 * BLOCK)
    area[:BLOCK] = os.urandom(BLOCK)
    view = memoryview(area)
    yield view
    view.release()
    area.close()


class Hook:
    """A ``ready`` hook that counts its calls, and can fail."""

    def __init__(self, fails: bool = False) -> None:
        self.calls = 0
        self.fails = fails

    def __call__(self) -> None:
        self.calls += 1
        if self.fails:
            raise RuntimeError("ready refused")


def where(tmp_path: Path, path: BlockPath) -> Path:
    return tmp_path / "ns" / path.rel


def store(root: int, cache: memoryview, ready: Hook | None = None, key: bytes = KEY) -> int:
    """Cache block 0 stored as ``key``'s block."""
    return block_io.store_block(
        root, BlockLayout("ns").locate(key), cache, 0, BLOCK, direct=False, file_mode=0o600, dir_mode=0o700, checksum=False, owners=ME, ready=ready
    )


def load(root: int, cache: memoryview, owners: Owners = ME, ready: Hook | None = None) -> int:
    return block_io.load_block(root, PATH, cache, BLOCK, BLOCK, direct=False, checksum=False, owners=owners, ready=ready)


def files_below(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def test_a_store_makes_its_directories_and_leaves_the_block_alone(tmp_path: Path, root: int, cache: memoryview) -> None:
    ready = Hook()
    assert store(root, cache, ready) == BLOCK and ready.calls == 1
    block = where(tmp_path, PATH)
    assert block.read_bytes() == cache[:BLOCK]
    assert stat.S_IMODE(block.stat().st_mode) == 0o600
    assert [stat.S_IMODE(d.stat().st_mode) for d in (block.parent, block.parent.parent)] == [0o700, 0o700]
    assert files_below(tmp_path / "ns") == [PATH.dir.split("/")[0], PATH.dir, PATH.rel]


def test_a_store_into_an_existing_directory_and_a_load_back(tmp_path: Path, root: int, cache: memoryview) -> None:
    where(tmp_path, PATH).parent.mkdir(parents=True)
    assert store(root, cache) == BLOCK
    ready = Hook()
    assert load(root, cache, ready=ready) == BLOCK and ready.calls == 1
    assert cache[BLOCK:] == cache[:BLOCK]


def test_a_whole_block_already_there_is_skipped_and_ready_never_runs(tmp_path: Path, root: int, cache: memoryview) -> None:
    store(root, cache)
    before = where(tmp_path, PATH).stat().st_ino
    ready = Hook()
    assert store(root, cache, ready) == 0 and ready.calls == 0
    assert where(tmp_path, PATH).stat().st_ino == before


@pytest.mark.parametrize("level", [0, 1], ids=["top directory", "leaf directory"])
def test_a_symlinked_directory_fails_the_store_and_nothing_lands_outside(tmp_path: Path, root: int, cache: memoryview, level: int) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = where(tmp_path, PATH).parents[1 - level]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    ready = Hook()
    with pytest.raises(OSError) as failure:
        store(root, cache, ready)
    assert failure.value.errno in (errno.ELOOP, errno.ENOTDIR) and ready.calls == 0
    assert list(outside.iterdir()) == []
    assert not any(is_temp(p.name) for p in (tmp_path / "ns").rglob("*"))


def test_a_failing_ready_fails_the_store_and_leaves_no_temp_file(tmp_path: Path, root: int, cache: memoryview) -> None:
    with pytest.raises(RuntimeError, match="ready refused"):
        store(root, cache, Hook(fails=True))
    assert files_below(tmp_path / "ns") == [PATH.dir.split("/")[0], PATH.dir]


def test_a_file_of_an_allowed_group_loads_and_a_strangers_does_not(tmp_path: Path, root: int, cache: memoryview) -> None:
    store(root, cache)
    os.chown(where(tmp_path, PATH), STRANGER, STRANGER)
    assert load(root, cache, Owners(STRANGER + 1, frozenset({1, STRANGER}))) == BLOCK
    assert cache[BLOCK:] == cache[:BLOCK]
    cache[BLOCK:] = bytes(BLOCK)
    ready = Hook()
    with pytest.raises(PermissionError, match=f"uid {STRANGER} gid {STRANGER}"):
        load(root, cache, Owners(STRANGER + 1, frozenset({1})), ready)
    assert ready.calls == 0 and cache[BLOCK:] == bytes(BLOCK)
    assert where(tmp_path, PATH).exists()


@pytest.mark.parametrize("size", [BLOCK - 1, BLOCK + 1, 0])
def test_a_file_of_the_wrong_size_is_removed_and_ready_never_runs(tmp_path: Path, root: int, cache: memoryview, size: int) -> None:
    store(root, cache)
    os.truncate(where(tmp_path, PATH), size)
    ready = Hook()
    with pytest.raises(block_io.CorruptBlock, match=f"holds {size} of {BLOCK} bytes"):
        load(root, cache, ready=ready)
    assert ready.calls == 0 and not where(tmp_path, PATH).exists()


def test_a_fifo_at_the_name_fails_load_and_store_without_hanging(tmp_path: Path, root: int, cache: memoryview) -> None:
    where(tmp_path, PATH).parent.mkdir(parents=True)
    os.mkfifo(where(tmp_path, PATH))
    with pytest.raises(OSError, match="a FIFO, not a block file") as failure:
        load(root, cache)
    assert failure.value.errno == errno.EINVAL
    with pytest.raises(FileExistsError, match="a FIFO, not a block file, is in the way"):
        store(root, cache)


def test_a_missing_block_is_file_not_found(root: int, cache: memoryview) -> None:
    ready = Hook()
    with pytest.raises(FileNotFoundError):
        load(root, cache, ready=ready)
    assert ready.calls == 0


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
@pytest.mark.parametrize("offset", [-BLOCK, BLOCK + 1, 2 * BLOCK, 2**63 - 1])
def test_a_block_beyond_the_buffer_is_refused_naming_it(tmp_path: Path, root: int, cache: memoryview, offset: int, checksum: bool) -> None:
    for move in (block_io.load_block, block_io.store_block):
        kwargs = {"file_mode": 0o600, "dir_mode": 0o700} if move is block_io.store_block else {}
        with pytest.raises(ValueError, match=rf"^block at offset {offset}, {BLOCK} bytes, is outside the {2 * BLOCK}-byte buffer$"):
            move(root, PATH, cache, offset, BLOCK, direct=False, checksum=checksum, owners=ME, **kwargs)
    assert files_below(tmp_path / "ns") == []


def os_calls(action: Callable[[], object]) -> list[str]:
    """The functions of the ``os`` module (and ctypes calls) that ``action`` makes from Python."""
    calls: list[str] = []

    def profile(frame: object, event: str, arg: object) -> None:
        if event == "c_call" and (getattr(arg, "__module__", None) == "posix" or type(arg).__name__ == "_FuncPtr"):
            calls.append(getattr(arg, "__name__", repr(arg)))

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return calls


def load_run(root: int, cache: memoryview, keys: list[bytes], ids: list[int], start: int = 0, **kwargs: Any) -> tuple[int, int]:
    """``_block_calls.load_run`` as a worker calls it for a task; keyword arguments replace its defaults."""
    args = {"owners": ME, "touch": False, "between": None, "hooks": None} | kwargs
    owners = args["owners"]
    return _block_calls.load_run(root, keys, ids, cache, BLOCK, False, owners.uid, owners.gids, args["touch"], args["between"], args["hooks"], start)


def test_a_usual_store_and_load_make_no_system_call_from_python(tmp_path: Path, root: int, cache: memoryview) -> None:
    """The reason for the C calls: none of the block's system calls goes through the interpreter."""
    assert os_calls(lambda: store(root, cache)) == []
    assert os_calls(lambda: load_run(root, cache, [KEY], [1])) == []
    assert cache[BLOCK:] == cache[:BLOCK]
    assert "stat" in os_calls(lambda: store(root, cache))  # a block already there: Python decides (the probe sees it)


def test_a_write_that_fails_after_ready_raises_once_and_leaves_no_temp_file(tmp_path: Path, root: int, cache: memoryview) -> None:
    """Once the bytes move, a failure is the block's error: it is not written a second time."""
    ready = Hook()
    with cache[1:] as unaligned, pytest.raises(OSError) as failure:  # O_DIRECT from an unaligned address: EINVAL
        block_io.store_block(root, PATH, unaligned, 0, BLOCK, direct=True, file_mode=0o600, dir_mode=0o700, checksum=False, owners=ME, ready=ready)
    if failure.value.errno != errno.EINVAL:
        pytest.skip(f"this file system takes O_DIRECT from any address ({failure.value})")
    assert ready.calls == 1 and PATH.rel in str(failure.value)
    assert files_below(tmp_path / "ns") == [PATH.dir.split("/")[0], PATH.dir]


def test_a_read_that_fails_after_ready_raises_once_and_keeps_the_block(tmp_path: Path, root: int, cache: memoryview) -> None:
    """A load whose read fails (not one that finds the file short) reports that error; the file stays."""
    store(root, cache)
    ready = Hook()
    with cache[1:] as unaligned, pytest.raises(OSError) as failure:  # O_DIRECT into an unaligned address: EINVAL
        block_io.load_block(root, PATH, unaligned, 0, BLOCK, direct=True, checksum=False, owners=ME, ready=ready)
    if failure.value.errno != errno.EINVAL:
        pytest.skip(f"this file system takes O_DIRECT into any address ({failure.value})")
    assert ready.calls == 1 and PATH.rel in str(failure.value)
    assert where(tmp_path, PATH).read_bytes() == cache[:BLOCK]


class Between:
    """A worker's ``between``: counts its calls, and can fail at the ``fails_at``-th."""

    def __init__(self, fails_at: int = 0) -> None:
        self.calls = 0
        self.fails_at = fails_at

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.fails_at:
            raise BrokenPipeError(errno.EPIPE, "the host is gone")


def a_task_of_every_kind(tmp_path: Path, root: int, cache: memoryview) -> list[bytes]:
    """Seven keys: good, missing, good, a FIFO, a stranger's, good, the wrong size (block 0's bytes stored)."""
    keys = [bytes([n]) * 32 + bytes(4) for n in range(7)]
    for n in (0, 2, 4, 5, 6):
        assert store(root, cache, key=keys[n])
    files = [where(tmp_path, BlockLayout("ns").locate(key)) for key in keys]
    files[3].parent.mkdir(parents=True)
    os.mkfifo(files[3])
    os.chown(files[4], STRANGER, STRANGER)
    os.truncate(files[6], BLOCK - 1)
    return keys


def test_a_run_of_loads_stops_at_each_block_it_leaves_to_python_and_changes_it_not(tmp_path: Path, root: int) -> None:
    """As a worker drives it: each call loads until a block is not the usual case, returns that block's index
    having run ``between`` for it, and is called again after it. Only usual blocks' bytes and hooks move."""
    area = mmap.mmap(-1, 8 * BLOCK)
    area[:BLOCK] = os.urandom(BLOCK)
    with memoryview(area) as cache:
        keys = a_task_of_every_kind(tmp_path, root, cache)
        before = files_below(tmp_path / "ns")
        between, hooks = Between(), [Hook() for _ in keys]
        stops, at = [], 0
        while (stop := load_run(root, cache, keys, list(range(1, 8)), at, between=between, hooks=hooks))[0] < len(keys):
            stops.append(stop)
            at = stop[0] + 1
        assert stops == [(1, 0), (3, 0), (4, 0), (6, 0)], "each stepped aside, none for a failed read"
        assert between.calls == len(keys) - 1, "once before every block but the first"
        assert [hook.calls for hook in hooks] == [1, 0, 1, 0, 0, 1, 0]
        for n in range(7):
            assert cache[(n + 1) * BLOCK : (n + 2) * BLOCK] == (cache[:BLOCK] if n in (0, 2, 5) else bytes(BLOCK)), n
        assert files_below(tmp_path / "ns") == before
    area.close()


def test_a_run_of_loads_loads_a_file_of_an_allowed_group_and_touches_only_with_touch(tmp_path: Path, root: int, cache: memoryview) -> None:
    store(root, cache)
    block = where(tmp_path, PATH)
    os.chown(block, STRANGER, STRANGER)
    os.utime(block, (1000, 1000))
    assert load_run(root, cache, [KEY], [1], owners=Owners(STRANGER + 1, frozenset({STRANGER}))) == (1, 0)
    assert cache[BLOCK:] == cache[:BLOCK] and block.stat().st_mtime == 1000
    assert load_run(root, cache, [KEY], [1], owners=Owners(STRANGER + 1, frozenset({STRANGER})), touch=True) == (1, 0)
    assert block.stat().st_mtime > 1000


def test_a_run_whose_touch_fails_returns_its_errno_having_read_the_block_once(tmp_path: Path) -> None:
    """A block read whole whose touch fails other than by a refusal (ENOSPC: its file is in an overlayfs's lower
    layer, and the copy-up the touch needs finds the upper layer full): the run returns that errno, as for a
    read that failed, so the worker fails the block with it. Before, the run left the block to Python, which
    read all of it again only to meet the same error (on a failing disk each read can take seconds)."""
    big = 1 << 20  # a second read of it could not hide among the run's other reads
    lower = tmp_path / "lower"
    (lower / "ns").mkdir(parents=True)
    area = mmap.mmap(-1, 2 * big)
    area[:big] = os.urandom(big)
    with memoryview(area) as cache:
        root = os.open(lower / "ns", os.O_RDONLY | os.O_DIRECTORY)
        try:
            block_io.store_block(root, PATH, cache, 0, big, direct=False, file_mode=0o600, dir_mode=0o700, checksum=False, owners=ME)
        finally:
            os.close(root)
        with overlay(lower, tmp_path) as (mount, fill):
            fill()
            block = mount / "ns" / PATH.rel
            before = files_below(mount), os.stat(block).st_mtime_ns
            root = os.open(mount / "ns", os.O_RDONLY | os.O_DIRECTORY)
            try:
                read = bytes_read(os.getpid())
                outcome = _block_calls.load_run(root, [KEY], [1], cache, big, False, ME.uid, ME.gids, True, None, None, 0)
                read = bytes_read(os.getpid()) - read
            finally:
                os.close(root)
            assert outcome == (0, errno.ENOSPC)
            assert big <= read < 2 * big, f"{read} bytes read for a block of {big}"
            assert (files_below(mount), os.stat(block).st_mtime_ns) == before
            assert block.read_bytes() == cache[:big]
    area.close()


def test_a_between_that_raises_ends_the_run_before_the_next_block(tmp_path: Path, root: int) -> None:
    area = mmap.mmap(-1, 8 * BLOCK)
    area[:BLOCK] = os.urandom(BLOCK)
    with memoryview(area) as cache:
        keys = a_task_of_every_kind(tmp_path, root, cache)
        with pytest.raises(BrokenPipeError, match="the host is gone"):
            load_run(root, cache, keys, list(range(1, 8)), between=Between(fails_at=1))
        assert cache[BLOCK : 2 * BLOCK] == cache[:BLOCK] and cache[2 * BLOCK :] == bytes(6 * BLOCK)
    area.close()


def test_a_hook_that_fails_leaves_its_block_to_python_and_an_interrupt_goes_through(tmp_path: Path, root: int, cache: memoryview) -> None:
    store(root, cache)
    assert load_run(root, cache, [KEY], [1], hooks=[Hook(fails=True)]) == (0, 0)
    assert cache[BLOCK:] == bytes(BLOCK)

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        load_run(root, cache, [KEY], [1], hooks=[interrupt])


@pytest.mark.parametrize(
    "key, block_id",
    [(KEY, 2), (KEY, -1), (KEY, 2**63), (KEY, "1"), (KEY[:7], 1), (bytes(132), 1), ("not bytes", 1)],
    ids=["past the buffer", "negative", "huge", "not an int", "key too short", "key too long", "key not bytes"],
)
def test_a_block_a_run_cannot_name_or_place_is_left_to_python(tmp_path: Path, root: int, cache: memoryview, key: Any, block_id: Any) -> None:
    store(root, cache)
    assert load_run(root, cache, [KEY, key], [1, block_id]) == (1, 0)
    assert cache[BLOCK:] == cache[:BLOCK]


def test_a_run_refuses_lists_that_do_not_match(root: int, cache: memoryview) -> None:
    with pytest.raises(ValueError, match="as many block ids"):
        load_run(root, cache, [KEY], [1, 0])
    with pytest.raises(ValueError, match="as many block ids"):
        load_run(root, cache, [KEY], [1], hooks=[])


@pytest.mark.parametrize("shortened", ["keys", "block_ids", "hooks"])
def test_a_run_whose_lists_shrink_under_it_stops_and_reads_no_item_past_their_end(
    tmp_path: Path, root: int, cache: memoryview, shortened: str
) -> None:
    """``between()`` (or another thread, while the GIL is released) empties a list the run is walking: the run
    stops at that block, having loaded the one before, rather than read items past the list's end (a crash)."""
    keys = [bytes([n]) * 32 + bytes(4) for n in range(3)]
    for key in keys:
        store(root, cache, key=key)
    ids, hooks = [1, 1, 1], [Hook(), Hook(), Hook()]
    between = {"keys": keys, "block_ids": ids, "hooks": hooks}[shortened].clear
    cache[BLOCK:] = bytes(BLOCK)
    assert load_run(root, cache, keys, ids, between=between, hooks=hooks) == (1, 0)
    assert cache[BLOCK:] == cache[:BLOCK]


@pytest.mark.parametrize("start", [-1, -(1 << 40)])
def test_a_run_from_a_negative_start_is_refused_naming_it(root: int, cache: memoryview, start: int) -> None:
    """Block ``start`` is read first: one before the list's start is memory the run must not read (a crash)."""
    keys = [KEY, bytes(36)]
    with pytest.raises(ValueError, match=f"from block {start}, 2 keys"):
        load_run(root, cache, keys, [1, 1], start)


@pytest.mark.parametrize("move", ["store", "load"])
def test_a_block_whose_write_or_read_failed_lets_the_cache_close_while_its_error_is_kept(tmp_path: Path, root: int, move: str) -> None:
    """An error kept (a traceback logged later, a test's excinfo) holds the frames it came through: a view of
    the cache left in one of them would keep the cache's memory exported, and closing it raise BufferError."""
    area = mmap.mmap(-1, 3 * BLOCK)
    view = memoryview(area)
    if move == "load":
        assert store(root, view) == BLOCK
    with view[1:] as unaligned:  # O_DIRECT from or into an unaligned address: EINVAL once the bytes move
        try:
            if move == "store":
                block_io.store_block(root, PATH, unaligned, 0, BLOCK, direct=True, file_mode=0o600, dir_mode=0o700, checksum=True, owners=ME)
            else:
                block_io.load_block(root, PATH, unaligned, BLOCK, BLOCK, direct=True, checksum=True, owners=ME)
        except OSError as e:
            kept = e
        else:
            pytest.skip("this file system takes O_DIRECT at any address")
    assert kept.errno == errno.EINVAL and PATH.rel in str(kept)
    view.release()
    area.close()


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10  # <linux/fs.h>


@pytest.mark.parametrize("checksum", [False, True], ids=["plain", "checksum"])
def test_a_store_whose_temp_file_cannot_be_made_names_the_block(tmp_path: Path, root: int, cache: memoryview, checksum: bool) -> None:
    """The temp file's create fails (an immutable directory: EPERM even for root): the error names the block,
    as a failed write does, not the temp name; nothing is left."""
    leaf = where(tmp_path, PATH).parent
    leaf.mkdir(parents=True)
    fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], "little")
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, (flags | FS_IMMUTABLE_FL).to_bytes(8, "little"))
        except OSError as e:
            pytest.skip(f"this file system keeps no immutable flag ({e})")
        try:
            with pytest.raises(PermissionError) as failure:
                block_io.store_block(root, PATH, cache, 0, BLOCK, direct=False, file_mode=0o600, dir_mode=0o700, checksum=checksum, owners=ME)
            assert failure.value.filename == PATH.rel
        finally:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(8, "little"))
    finally:
        os.close(fd)
    assert files_below(tmp_path / "ns") == [PATH.dir.split("/")[0], PATH.dir]


def test_a_file_cut_short_after_the_run_looked_is_left_to_python_which_removes_it(tmp_path: Path, root: int, cache: memoryview) -> None:
    """The file has the block's size when the run checks it and is cut short before its read (the block's hook
    runs between the two): the read ends early, the run stops at the block without an errno and changes no
    file, and Python's load of it finds it short and removes it."""
    store(root, cache)
    block = where(tmp_path, PATH)

    def cut() -> None:
        os.truncate(block, BLOCK // 2)

    assert load_run(root, cache, [KEY], [1], hooks=[cut], touch=True) == (0, 0)
    assert block.stat().st_size == BLOCK // 2
    with pytest.raises(block_io.CorruptBlock, match=f"holds {BLOCK // 2} of {BLOCK} bytes, removed"):
        load(root, cache)
    assert not block.exists()
