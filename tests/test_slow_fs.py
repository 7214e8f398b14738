"""A hung mount holds up only the call that waits on it: no call of the tier holds its lock across file-system I/O.

The root is on a real GlusterFS volume (tools/glusterfs_nodes.py builds it) whose FUSE client is stopped with
SIGSTOP: every file-system call that reaches the mount then waits, as on a slow or hung network file system,
until the client is continued. Skipped, with the reason, only where GlusterFS cannot run at all;
MP_TIER_GLUSTERFS=required turns the skip into a failure, for CI.
"""

from __future__ import annotations

import ast
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import glusterfs_nodes as gl
import helpers
import pytest
from helpers import gluster_volume, in_system_call, make_keys

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig, channels
from mp_tier.layout import GROUP_BYTES, MAX_KEY_BYTES

pytestmark = [pytest.mark.glusterfs, pytest.mark.timeout(120)]

CLUSTER = gl.Cluster(volume="mp_tier_slow", nodes=("host",), replica=1)
# System calls a path lookup, a stat or a directory listing (getdents64) waits in (x86-64 and the generic table's
# openat2), as /proc shows them
# x86-64 numbers of the system calls a worker makes on block files and their directories (lookups, stats,
# listings, opens, reads and writes of a block, its close, rename, unlink, mkdir, utime and xattrs); not
# futex, poll, epoll, or read and write (the task and result pipes)
FILE_SYSCALLS = {
    *("3", "4", "5", "6", "17", "18", "82", "83", "87", "188", "190", "191", "193", "217", "257", "258", "262"),
    *("263", "264", "280", "295", "296", "316", "332", "437"),
}


@pytest.fixture(scope="module")
def mount() -> Iterator[str]:
    """The volume's one mount, for the whole module (about 4 s to set up)."""
    with gluster_volume(CLUSTER, print):
        yield CLUSTER.mount("host")


def fuse_client(point: str) -> int:
    """The pid of the glusterfs process that serves the FUSE mount at ``point``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"glusterfs" and os.fsencode(point) in argv:
            return int(name)
    raise AssertionError(f"no glusterfs client serves {point}")


def waits_on_a_file(thread: threading.Thread) -> bool:
    """Whether ``thread`` is asleep in a file system call (not on a lock: that is a futex), on the mount at hand."""
    return in_system_call(f"self/task/{thread.native_id}", FILE_SYSCALLS)


def test_a_lookup_waiting_on_a_hung_mount_holds_up_no_other_call(mount, cache, tmp_path):
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=os.path.join(mount, tmp_path.name), n_read_workers=1, n_write_workers=1)
    client = fuse_client(mount)
    answers: list[bool | None] = []
    looker = threading.Thread(target=lambda: answers.append(tier.lookup(make_keys(1, seed=1)[0])), name="vllm-lookup")
    others_done = threading.Event()

    def scheduler() -> None:  # what vLLM's scheduler thread does meanwhile
        tier.get_finished()
        tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1, seed=2), block_ids=[0]))
        tier.lookup_many(make_keys(4, seed=3), probe=False)
        tier.stats()
        others_done.set()

    caller = threading.Thread(target=scheduler, name="scheduler")
    try:
        hung_mount_holds_up_only(tier, client, looker, caller, others_done)
        assert answers == [False]
        tier.drain(30)
        assert [(r.job_id, r.success) for r in tier.get_finished()] == [(1, True)]
    finally:
        tier.shutdown()


def hung_mount_holds_up_only(
    tier: FileSystemTierManager, client: int, looker: threading.Thread, caller: threading.Thread, others_done: threading.Event
) -> None:
    """Stop the mount's client, start the lookup, and once it waits on the mount, the scheduler's calls."""
    try:
        tier.drain(30)
        os.kill(client, signal.SIGSTOP)
        looker.start()
        deadline = time.monotonic() + 10
        while not waits_on_a_file(looker):
            assert looker.is_alive(), "the lookup returned although the mount is stopped"
            assert time.monotonic() < deadline, "the lookup never reached the mount"
        caller.start()
        assert others_done.wait(10), "get_finished/submit_store/lookup_many/stats waited for a lookup on the hung mount"
        assert looker.is_alive(), "the mount was not hung after all"
    finally:
        os.kill(client, signal.SIGCONT)
        looker.join(30)
        if caller.ident is not None:
            caller.join(30)


def test_a_worker_thread_left_on_a_hung_mount_never_touches_an_fd_the_host_opens_after_shutdown(mount, cache, tmp_path):
    """The threads engine cannot kill a worker: one stuck on a hung mount past ``stop_timeout`` is left behind, and
    once the mount is back it finishes its task. Every fd it uses must stay its own until it has ended: numbers the
    host reuses meanwhile (here 32 pipes opened right after the shutdown let go) never get a completion written
    into them, a task read from them or a close; the worker ends, and its fds are closed then (the leak check)."""
    tier = threads_tier(mount, cache, tmp_path)
    pipes: list[tuple[int, int]] = []

    def take_numbers() -> None:  # the host's next fds get the numbers the shutdown freed
        pipes.extend(os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for _ in range(32))

    try:
        assert leave_a_worker_thread(tier, mount, stick_on_a_store(tier, seed=4), take_numbers) == []
        for r, w in pipes:
            with pytest.raises(BlockingIOError):
                os.read(r, 4096)  # nothing was written into the host's pipe (and it is still open)
            os.write(w, b"x")
            assert os.read(r, 1) == b"x"  # both ends are still the host's
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)


def test_a_worker_thread_left_inside_a_block_call_neither_fails_the_shutdown_nor_keeps_the_cache_mapped_once_it_ends(mount, cache, tmp_path):
    """A worker thread left on the hung mount in the middle of a store holds the cache's buffer (the C call's):
    the shutdown still returns without error (it raised BufferError), and the tier lets go of the cache when the
    thread has ended, so closing the cache then unmaps it."""
    tier = threads_tier(mount, cache, tmp_path)
    _, stick = stick_inside_stores(tier, seed=5)
    assert leave_a_worker_thread(tier, mount, stick, lambda: None) == []
    cache.close()
    with open("/proc/self/maps") as maps:
        assert cache.name not in maps.read(), "the cache stayed mapped after the worker threads ended and it was closed"


def test_a_worker_thread_left_inside_a_task_ends_after_the_block_it_is_on(mount, cache, tmp_path):
    """A worker thread left on the hung mount in the middle of a store task ends, once the mount is back, after
    the block it was on: its job has its ECANCELED result, and the task's other blocks are left alone (a load's
    would land in cache blocks the host may have reused). It used to do every block of its task first: here
    dozens of files written after the mount came back, where at most the one in flight (per thread) may be."""
    tier = threads_tier(mount, cache, tmp_path)
    keys, stick = stick_inside_stores(tier, seed=8)
    back: list[int] = []

    def continuing() -> None:  # the last thing before the client continues
        back.append(time.time_ns())

    assert leave_a_worker_thread(tier, mount, stick, continuing) == []
    after = [key for key in keys if os.path.exists(path := tier.block_path(key)) and os.stat(path).st_ctime_ns >= back[0]]
    stored = sum(os.path.exists(tier.block_path(key)) for key in keys)
    assert len(after) <= 2, f"{len(after)} blocks stored after the shutdown, by threads it had left ({stored} of {len(keys)} in all)"
    assert stored < len(keys)


def test_a_child_forked_while_shutdown_waits_on_the_hung_mount_holds_none_of_the_tiers_fds(mount, cache, tmp_path):
    """A fork while the shutdown waits on the hung mount (its sweep, after giving up on a worker thread): the child
    closes its copies of the pool's fds and of the tier's own (the namespace directory, the wake pipe) at once, as
    a child forked at any other time does; before, it kept the tier's for as long as it lived. What it may still
    hold is its parent's worker threads' epoll fds: they belong to threads that do not exist in it."""
    before = helpers.open_fds()
    tier = threads_tier(mount, cache, tmp_path)
    held: dict[int, str] = {}

    def fork() -> None:
        r, w = os.pipe()
        if (pid := os.fork()) == 0:
            os.write(w, repr(helpers.open_fds()).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as told:
            held.update(ast.literal_eval(told.read().decode()))
        assert os.waitpid(pid, 0)[1] == 0
        del held[r], held[w]  # the child's copy of this pipe

    assert leave_a_worker_thread(tier, mount, stick_on_a_store(tier, seed=6), fork) == []
    assert {fd: what for fd, what in held.items() if before.get(fd) != what and what != "anon_inode:[eventpoll]"} == {}


def test_a_worker_thread_left_in_a_scan_ends_once_the_mount_is_back_though_nobody_reads_its_completions(mount, cache, tmp_path, monkeypatch):
    """A worker thread left on the hung mount in the middle of the start-up scan finds, once the mount is back,
    more blocks than the result pipe holds in completions, and nobody reads that pipe after the shutdown: it used
    to wait there for ever, holding the pool's fds. It ends now, and every fd the tier had is closed.

    The pipe is the one a host whose fs.pipe-max-size is 64 KiB gets (the kernel's default pipe size; the tier
    asks for min(1 MiB, pipe-max-size)), so that a few hundred blocks fill it: each ~3 KB completion takes a page
    of the pipe, so 1 MiB holds 256, the keys of 6,656 blocks of the longest keys or 19,968 of vLLM's; only the
    count differs. Here the keys alone are more bytes than the pipe holds. The blocks are made directly in the
    layout, as empty files in one directory (a scan reads no block)."""
    monkeypatch.setattr(channels, "PIPE_BYTES", 1 << 16)
    hash_bytes = MAX_KEY_BYTES - GROUP_BYTES
    keys = [b"\x5c\xa7\x1e" + key for key in make_keys(channels.PIPE_BYTES // MAX_KEY_BYTES + 100, seed=7, hash_bytes=hash_bytes - 3)]
    first = threads_tier(mount, cache, tmp_path)
    try:
        paths = [first.block_path(key) for key in keys]
    finally:
        first.shutdown()
    os.makedirs(os.path.dirname(paths[0]))
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    before = helpers.open_fds()
    client = fuse_client(mount)
    tier = threads_tier(mount, cache, tmp_path, idle=False)
    os.kill(client, signal.SIGSTOP)  # at once: the sweep and the scan it just queued wait on the mount, one in each worker

    def stuck(client: int) -> None:
        deadline = time.monotonic() + 10
        while sum(map(waits_on_a_file, worker_threads())) < 2:
            assert time.monotonic() < deadline, "the start-up sweep and scan did not both reach the stopped mount"

    try:
        assert leave_a_worker_thread(tier, mount, stuck, lambda: None) == []
    finally:
        os.kill(client, signal.SIGCONT)  # already, unless the shutdown never began
    assert {fd: what for fd, what in helpers.open_fds().items() if before.get(fd) != what} == {}, "the tier's fds stayed open"


def threads_tier(mount: str, cache: PrimaryCache, tmp_path: Path, idle: bool = True) -> FileSystemTierManager:
    """A threads-engine tier on the mount whose shutdown gives up on a stuck worker soon; ``idle``: once its
    start-up sweep and scan are done, else at once (they are queued as it returns)."""
    config = TierConfig(engine="threads", stop_timeout=0.2, n_read_workers=1, n_write_workers=1)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=os.path.join(mount, tmp_path.name), config=config)
    if idle:
        tier.drain(30)
    return tier


def stick_inside_stores(tier: FileSystemTierManager, seed: int) -> tuple[list[bytes], Callable[[int], None]]:
    """For ``leave_a_worker_thread``: store 8 jobs of 256 blocks, and stop the mount's client once the first block
    is on it, so a worker thread waits on the mount in the middle of a task, mostly in a block call. So many that
    the stores cannot all end before the stop, however late the host gets to it on a loaded machine (one job
    could). Returns the keys, and the ``stick``."""
    keys = make_keys(8 * 256, seed=seed)

    def stick(client: int) -> None:
        for job in range(8):
            tier.submit_store(JobMetadata(job_id=job, keys=keys[job * 256 : (job + 1) * 256], block_ids=list(range(256))))
        deadline = time.monotonic() + 10
        while not os.path.exists(tier.block_path(keys[0])):
            assert time.monotonic() < deadline, "the store never began"
        os.kill(client, signal.SIGSTOP)
        while not any(map(waits_on_a_file, worker_threads())):
            assert time.monotonic() < deadline, "no worker thread reached the stopped mount"

    return keys, stick


def stick_on_a_store(tier: FileSystemTierManager, seed: int) -> Callable[[int], None]:
    """For ``leave_a_worker_thread``: stop the mount's client, then store a block, and wait until a worker waits on the mount."""

    def stick(client: int) -> None:
        os.kill(client, signal.SIGSTOP)
        tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1, seed=seed), block_ids=[0]))
        deadline = time.monotonic() + 10
        while not any(map(waits_on_a_file, worker_threads())):
            assert time.monotonic() < deadline, "no worker thread reached the stopped mount"

    return stick


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mp_tier-")]


def leave_a_worker_thread(
    tier: FileSystemTierManager, mount: str, stick: Callable[[int], None], meanwhile: Callable[[], None]
) -> list[BaseException]:
    """Get a worker thread stuck on the hung mount (``stick`` stops the FUSE client, whose pid it is given, and gets
    a worker waiting on it), shut the tier down in another thread, and run ``meanwhile`` once that shutdown has given
    up on the workers (past stop_timeout, it waits in its sweep of the mount, or has returned when it had nothing to
    sweep). Then the client continues; returns what the shutdown raised, once the shutdown and every worker thread have ended."""
    workers = worker_threads()
    raised: list[BaseException] = []

    def stop() -> None:
        try:
            tier.shutdown()
        except BaseException as e:
            raised.append(e)

    stopper = threading.Thread(target=stop, name="shutdown")
    client = fuse_client(mount)
    try:
        stick(client)
        began = time.monotonic()
        stopper.start()
        while stopper.is_alive() and not waits_on_a_file(stopper):
            assert time.monotonic() < began + 20, "shutdown neither returned nor reached its sweep of the hung mount"
        # stop_timeout is 0.2 s: the shutdown gives up on a stuck thread then (it waited a 5 s kill grace, for no signal)
        assert time.monotonic() - began < 3, "the shutdown waited long past stop_timeout for a thread it cannot kill"
        meanwhile()
    finally:
        os.kill(client, signal.SIGCONT)
        if stopper.ident is not None:
            stopper.join(30)
            for worker in workers:
                worker.join(30)
    assert [w.name for w in workers if w.is_alive()] == [], "a worker left behind did not end once the mount was back"
    return raised
