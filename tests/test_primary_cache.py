"""The PrimaryCache's own life: signal handlers that close one at any instant, caches dropped without
close(), mappings the kernel split into several VMAs, and an interpreter exit under -X dev / -W error."""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import BLOCK, libc_shim, make_keys, open_fds, run_job, shm_segments, wait_exit

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MAP_FIXED = 0x10  # <sys/mman.h> on Linux; Python's mmap module does not export it

# For a host script: the pid of its janitor (its one child running mp_tier.janitor; a child just spawned
# may show an empty command line for a moment).
JANITOR_PID = """
import os, time
from pathlib import Path
def janitor_pid():
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
        found = [int(p) for p in children if b"mp_tier.janitor" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError("no janitor among the children")
"""

HANDLER_CLOSES = JANITOR_PID + textwrap.dedent(
    """
    import json, random, signal, sys
    from mp_tier import FileSystemTierManager, PrimaryCache, TierClosed
    victims = [PrimaryCache.create(1, 4096) for _ in range(1500)]
    cache = PrimaryCache.create(4, 65536)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
    landed = 0  # handler runs that interrupted the janitor's bookkeeping (the instants that used to hang)

    def handler(signum, frame):  # the README's SIGTERM pattern, then one more cache closed
        global landed
        while frame is not None:
            landed += frame.f_globals.get("__name__") == "mp_tier.janitor"
            frame = frame.f_back
        if len(victims) < 1000:
            tier.shutdown()
            cache.close()
        if victims:
            victims.pop().close()
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.00005, 0.0005))

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002)
    for _ in range(3000):
        PrimaryCache.create(1, 4096).close()
        try:
            tier.get_finished()
        except TierClosed:
            pass
        if not victims:
            break
    signal.setitimer(signal.ITIMER_REAL, 0)
    for victim in victims:
        victim.close()
    tier.shutdown()
    mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"mp_tier_{os.getpid()}_")]
    last = PrimaryCache.create(1, 4096)  # the janitor must still know it: the handler's words never garbled its pipe
    print(json.dumps({"landed": landed, "left": mine, "last": last.name, "janitor": janitor_pid()}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_signal_handler_closing_caches_at_any_instant_never_hangs(tmp_path):
    """A SIGALRM handler runs the README's ``tier.shutdown(); cache.close()`` and closes one more cache every
    50-500 µs while the host creates and closes caches in a loop, so it lands inside create() and close()
    (inside the janitor's bookkeeping): no hang, every segment unlinked, and the janitor still unlinks the
    segment of a host then SIGKILLed."""
    done = subprocess.run([sys.executable, "-c", HANDLER_CLOSES, str(tmp_path / "blocks")], capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGKILL, done.stderr
    info = json.loads(done.stdout)
    assert info["landed"] > 0, "no handler landed inside the janitor's bookkeeping: the test proved nothing"
    assert info["left"] == []
    assert wait_exit(info["janitor"], 10)
    assert not os.path.exists(f"/dev/shm/{info['last']}")


REPLACED_JANITOR = JANITOR_PID + textwrap.dedent(
    """
    import json, select, signal
    from mp_tier import PrimaryCache
    first = PrimaryCache.create(1, 4096)
    killed = janitor_pid()
    death = os.pidfd_open(killed)
    os.kill(killed, signal.SIGKILL)
    select.select([death], [], [])
    second = PrimaryCache.create(1, 4096)  # finds the janitor dead: starts another, told both names
    successor = janitor_pid()
    gone = not os.path.exists(f"/proc/{killed}")  # collected, not left a zombie
    print(json.dumps({"names": [first.name, second.name], "janitor": successor, "collected": gone and successor != killed}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_janitor_is_replaced_and_its_successor_knows_every_segment():
    """The janitor SIGKILLed: the next create() collects it and starts a successor told every live name,
    which unlinks both segments once the host is SIGKILLed too."""
    done = subprocess.run([sys.executable, "-c", REPLACED_JANITOR], capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGKILL, done.stderr
    info = json.loads(done.stdout)
    assert info["collected"]
    assert wait_exit(info["janitor"], 10)
    assert [name for name in info["names"] if os.path.exists(f"/dev/shm/{name}")] == []


def test_a_dropped_cache_releases_its_fd_and_segment(tmp_path):
    """Twenty caches dropped without close(): each one's fd and /dev/shm segment go with it. Garbage that earlier
    tests left is collected first: its fds (a failed test's Popen pipes, say) would close in this test's collection."""
    gc.collect()
    segments, fds = shm_segments(), open_fds()
    for _ in range(20):
        cache = PrimaryCache.create(16, BLOCK)
        cache.array[:] = 1
        del cache
    gc.collect()
    assert shm_segments() == segments
    assert open_fds() == fds


def test_a_cache_whose_array_is_kept_stays_until_the_array_goes():
    """The host keeps only ``.array``: the memory stays usable and shared until the array goes too."""
    cache = PrimaryCache.create(4, BLOCK)
    name, array = cache.name, cache.array
    del cache
    gc.collect()
    array[3] = 7
    assert os.path.exists(f"/dev/shm/{name}")
    del array
    gc.collect()
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_a_cache_dropped_with_its_tier_leaves_nothing(tmp_path, engine):
    """A cache and the tier on it, both dropped without shutdown() or close(): workers, fds and the
    segment all go."""
    segments, fds = shm_segments(), open_fds()
    cache = PrimaryCache.create(16, BLOCK)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "blocks"), n_read_workers=1, n_write_workers=1, engine=engine)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    pids = tier.worker_pids()
    del tier, cache
    gc.collect()
    assert [pid for pid in pids if not wait_exit(pid, 5)] == []
    assert shm_segments() == segments
    assert open_fds() == fds


def _vmas(path: str) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(path)]


@pytest.fixture
def split_file(tmp_path):
    """A 16-block file under /dev/shm mapped once, MAP_SHARED, as an engine maps its KV memory."""
    path = f"/dev/shm/split_{os.getpid()}_{tmp_path.name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, 16 * BLOCK)
        mapping = mmap.mmap(fd, 16 * BLOCK, mmap.MAP_SHARED)
        yield path, fd, mapping
        mapping.close()
    finally:
        os.close(fd)
        os.unlink(path)


def _address(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


@pytest.mark.parametrize("engine", ["processes"])
@pytest.mark.parametrize("how", ["madvise", "mlock"])
def test_one_mapping_split_into_several_vmas_is_shared_memory(make_tier, split_file, how):
    """madvise(MADV_DONTFORK) or mlock() of the middle blocks splits one mapping into three VMAs of the
    same file at consecutive offsets: the tier takes it, and stores and loads are byte-exact."""
    path, _, mapping = split_file
    if how == "madvise":
        mapping.madvise(mmap.MADV_DONTFORK, 4 * BLOCK, 4 * BLOCK)
    else:
        assert libc.mlock(ctypes.c_void_p(_address(mapping) + 4 * BLOCK), ctypes.c_size_t(4 * BLOCK)) == 0, os.strerror(ctypes.get_errno())
    assert len(_vmas(path)) == 3, "the kernel did not split the mapping: the test proves nothing"
    blocks = np.frombuffer(mapping, dtype=np.uint8).reshape(16, BLOCK)
    blocks[:12] = np.random.default_rng(3).integers(0, 256, (12, BLOCK), dtype=np.uint8)
    tier = make_tier(view=blocks, n_read_workers=1, n_write_workers=1)
    keys = make_keys(12)
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys[:6], block_ids=[0, 3, 4, 7, 8, 11])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=keys[:6], block_ids=[12, 13, 14, 15, 5, 6])).success
    assert np.array_equal(blocks[[12, 13, 14, 15, 5, 6]], np.random.default_rng(3).integers(0, 256, (12, BLOCK), dtype=np.uint8)[[0, 3, 4, 7, 8, 11]])
    tier.shutdown()
    if how == "mlock":
        libc.munlock(ctypes.c_void_p(_address(mapping) + 4 * BLOCK), ctypes.c_size_t(4 * BLOCK))
    del blocks


@pytest.mark.parametrize("what", ["read-only", "other offset"])
def test_vmas_that_are_not_one_writable_run_of_the_file_are_refused(split_file, tmp_path, what):
    """The middle blocks made read-only (mprotect), or mapped over with the file's first blocks (MAP_FIXED,
    so the bytes under the view are not consecutive in the file): refused, naming the break."""
    path, fd, mapping = split_file
    middle = _address(mapping) + 4 * BLOCK
    if what == "read-only":
        assert libc.mprotect(ctypes.c_void_p(middle), ctypes.c_size_t(4 * BLOCK), mmap.PROT_READ) == 0
    else:
        got = libc.mmap(middle, 4 * BLOCK, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED, fd, 0)
        assert got == middle, os.strerror(ctypes.get_errno())
    assert len(_vmas(path)) == 3
    blocks = np.frombuffer(mapping, dtype=np.uint8).reshape(16, BLOCK)
    expected = r"a r--s mapping" if what == "read-only" else r"more than one mapping"
    with pytest.raises(ValueError, match=rf"primary_kv_view is not in shared memory .*{expected}"):
        FileSystemTierManager(primary_kv_view=blocks, root_dir=str(tmp_path / "blocks"), n_read_workers=1, n_write_workers=1)
    del blocks


EXIT_HOST = JANITOR_PID + textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    cache = PrimaryCache.create(16, 65536)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
    tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
    tier.drain(30)
    assert [r.success for r in tier.get_finished()] == [True]
    print(json.dumps({"janitor": janitor_pid(), "workers": tier.worker_pids(), "segment": cache.name}), flush=True)
    if sys.argv[2] == "closes":
        tier.shutdown()
        cache.close()
    """
)


@pytest.mark.parametrize("ending", ["closes", "leaves all open"])
@pytest.mark.parametrize("flags", [["-X", "dev", "-W", "error"], ["-W", "error"], ["-X", "dev"], "PYTHONWARNINGS=error"])
def test_an_exit_under_warnings_as_errors_prints_nothing(tmp_path, flags, ending):
    """A host run with -X dev and/or -W error (as test suites run) that made a cache and a tier: its exit,
    with or without shutdown() and close(), prints nothing and leaves no janitor, worker or segment."""
    env = dict(os.environ)
    if isinstance(flags, str):
        env.update([flags.split("=")])
        flags = []
    done = subprocess.run(
        [sys.executable, *flags, "-c", EXIT_HOST, str(tmp_path / "blocks"), ending.split()[0]],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
    )
    assert (done.returncode, done.stderr) == (0, "")
    info = json.loads(done.stdout)
    assert [pid for pid in [info["janitor"], *info["workers"]] if not wait_exit(pid, 10)] == []
    assert not os.path.exists(f"/dev/shm/{info['segment']}")


def test_a_closed_cache_is_refused_as_primary_memory(tmp_path):
    """Its fd is closed (the number may be another file's by now): refused, naming the cache."""
    cache = PrimaryCache.create(4, BLOCK)
    cache.close()
    with pytest.raises(ValueError, match=r"primary_kv_view is a closed PrimaryCache: PrimaryCache\(name="):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "blocks"), n_read_workers=1, n_write_workers=1)


# madvise(MADV_POPULATE_READ) as a kernel before 5.14 answers it (EINVAL), each attempt logged by pid.
NO_POPULATE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int madvise(void *addr, size_t length, int advice) {
    if (advice != 22) return syscall(SYS_madvise, addr, length, advice);
    char line[24];
    int fd = open(getenv("POPULATE_LOG"), O_WRONLY | O_APPEND);
    write(fd, line, snprintf(line, sizeof line, "%d\n", getpid()));
    close(fd);
    errno = EINVAL;
    return -1;
}
"""

POPULATE_HOST = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
    with PrimaryCache.create(32, 65536) as cache:
        cache.array[:16] = np.random.default_rng(3).integers(-128, 128, (16, 65536), dtype=np.int8)
        config = TierConfig(n_read_workers=1, n_write_workers=1, io_depth=1)
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], config=config)
        keys = [os.urandom(32) + bytes(4) for _ in range(16)]
        for job in range(4):
            tier.submit_store(JobMetadata(job_id=job, keys=keys[4 * job : 4 * job + 4], block_ids=list(range(4 * job, 4 * job + 4))))
        tier.drain(30)
        tier.submit_load(JobMetadata(job_id=9, keys=keys, block_ids=list(range(16, 32))))
        tier.drain(30)
        assert all(result.success for result in tier.get_finished())
        assert np.array_equal(cache.array[16:], cache.array[:16])
        tier.shutdown()
    """
)


def test_a_kernel_without_populate_read_leaves_blocks_to_fault_as_before(tmp_path):
    """Before Linux 5.14 madvise(MADV_POPULATE_READ) is EINVAL: each worker process tries it once, turns it
    off, and moves every block byte-exact by faulting its pages in as before."""
    log = tmp_path / "populate.log"
    log.touch()
    env = {**libc_shim(tmp_path, "no_populate", NO_POPULATE), "POPULATE_LOG": str(log)}
    done = subprocess.run([sys.executable, "-c", POPULATE_HOST, str(tmp_path / "blocks")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    tried = log.read_text().split()
    assert tried and len(tried) == len(set(tried))  # once in each worker that moved bytes (either may take either op)


@pytest.mark.parametrize("engine", ["processes"])
def test_a_load_that_finds_no_block_leaves_the_engines_memory_unallocated(make_tier, split_file):
    """A sparse engine file (vLLM's ftruncate()d region): a load whose blocks are not on disk reads no byte
    and writes none into the cache, so no page of its blocks comes into being (tmpfs allocates a page on
    any fault, a read fault or a populate included)."""
    _, fd, mapping = split_file
    blocks = np.frombuffer(mapping, dtype=np.uint8).reshape(16, BLOCK)
    tier = make_tier(view=blocks, n_read_workers=1, n_write_workers=1)
    before = os.fstat(fd).st_blocks
    result = run_job(tier, "load", JobMetadata(job_id=1, keys=make_keys(4), block_ids=[8, 9, 10, 11]))
    assert not result.success
    assert os.fstat(fd).st_blocks * 512 - before * 512 == 0
    tier.shutdown()
    del blocks


def _mapped_bytes(pid: int, path: str) -> int:
    """Bytes of ``path`` that process ``pid`` has in its page tables (the Rss of its mappings of it)."""
    total, counting = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:
            counting = line.endswith(path)
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1]) << 10
    return total


@pytest.mark.parametrize("engine", ["processes"])
def test_a_store_of_blocks_already_on_disk_maps_none_of_their_pages(make_tier, split_file):
    """A store whose blocks are whole on disk already writes nothing: the worker neither reads the cache nor
    maps its pages (each would cost it a populate or faults, and page tables, for no byte moved)."""
    path, _, mapping = split_file
    blocks = np.frombuffer(mapping, dtype=np.uint8).reshape(16, BLOCK)
    blocks[:4] = np.random.default_rng(5).integers(0, 256, (4, BLOCK), dtype=np.uint8)
    keys = make_keys(4)
    first = make_tier(view=blocks, n_read_workers=1, n_write_workers=1)
    assert run_job(first, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3])).success
    first.shutdown()
    again = make_tier(view=blocks, n_read_workers=1, n_write_workers=1)
    assert run_job(again, "store", JobMetadata(job_id=2, keys=keys, block_ids=[0, 1, 2, 3])).success
    assert [_mapped_bytes(pid, path) for pid in again.worker_pids()] == [0, 0]
    again.shutdown()
    del blocks
