"""Helpers the tests share: keys, cache contents, one job run to its result, and what a process holds."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import glusterfs_nodes as gl
import numpy as np
import pytest
from glusterfs_nodes import wait_gone

from mp_tier import FileSystemTierManager, JobMetadata, JobResult, PrimaryCache
from mp_tier.layout import namespace_name
from mp_tier.shared_cache import SEGMENT_PREFIX

BLOCK = 64 << 10
NAMESPACE = namespace_name({"block_bytes": BLOCK}, 0)  # where a tier on a cache of BLOCK-byte blocks keeps them
GLUSTER_LOCK = "/run/mp_tier_glusterfs.lock"  # held while a test's GlusterFS volume exists (gluster_volume)
wait_exit = wait_gone  # True once a pid has exited (a pidfd: it need not be our child)


def shm_segments() -> set[str]:
    """This process's segments (other test runs may share /dev/shm)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"{SEGMENT_PREFIX}{os.getpid()}_")}


def open_fds() -> dict[int, str]:
    """This process's open fds and what each refers to."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the fd listdir itself used
    return fds


def child_processes() -> set[int]:
    """Live children of this process, except the segment janitor (it serves the whole run)."""
    children = set()
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        pids = [int(p) for p in f.read().split()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"mp_tier.janitor" in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except FileNotFoundError:
            continue
        children.add(pid)
    return children


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("mp_tier-")]


POLLS = frozenset({"7", "271"})  # poll(2) and ppoll(2), as /proc/<pid>/task/<tid>/syscall names them (x86-64)


def in_system_call(task: str, numbers: frozenset[str]) -> bool:
    """Whether the thread ``task`` (``self/task/<tid>``, ``<pid>/task/<tid>``) sleeps in one of the system
    calls ``numbers`` (x86-64 numbers, as /proc shows them): no lock or spin looks like that."""
    try:
        with open(f"/proc/{task}/syscall") as f:
            return f.read().split()[0] in numbers
    except (OSError, IndexError):  # a thread that ended, or one running (no system call to show)
        return False


def make_keys(n: int, seed: int = 0, group: int = 0, hash_bytes: int = 32) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(hash_bytes) + group.to_bytes(4, "big") for _ in range(n)]


def fill_random(cache: PrimaryCache, block_ids, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for b in block_ids:
        cache.array[b] = rng.integers(0, 256, cache.block_bytes, dtype=np.uint8)


def run_job(tier: FileSystemTierManager, kind: str, job: JobMetadata, timeout: float = 30) -> JobResult:
    getattr(tier, f"submit_{kind}")(job)
    tier.drain(timeout)
    results = tier.get_finished()
    assert [r.job_id for r in results] == [job.job_id]
    return results[0]


def wait_ready(tier: FileSystemTierManager, timeout: float = 30) -> None:
    """Until every worker is past its start-up (a test that counts tasks per worker needs them all)."""
    deadline = time.monotonic() + timeout
    workers = tier.config.n_read_workers + tier.config.n_write_workers
    while (stats := tier.stats()).workers_alive < workers or stats.workers_starting:
        assert time.monotonic() < deadline, "workers did not become ready"
        tier.wait(0.01)


def stop_processes(pids) -> None:
    """SIGSTOP each process and wait until every one of its threads has stopped: the signal is delivered
    asynchronously, and a worker's lane may finish a task meanwhile."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    for pid in pids:
        while not _all_threads_stopped(pid):
            assert time.monotonic() < deadline, f"process {pid} did not stop"
            time.sleep(0.001)


@contextlib.contextmanager
def processes_stopped(pids) -> Iterator[None]:
    """``stop_processes``, and SIGCONT to each on the way out, whatever happened inside."""
    stop_processes(pids)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def all_succeed(tier: FileSystemTierManager, jobs: int) -> None:
    """Once the tier has finished everything: exactly ``jobs`` results, all successful."""
    tier.drain(60)
    results = tier.get_finished()
    assert len(results) == jobs and all(r.success for r in results)


def _all_threads_stopped(pid: int) -> bool:
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
                    return False
    except FileNotFoundError:
        pass  # gone: nothing of it runs
    return True


@contextlib.contextmanager
def gluster_volume(cluster: gl.Cluster, log: Callable[[str], None]) -> Iterator[gl.Cluster]:
    """``cluster``'s volume, set up afresh (after whatever an interrupted run left) and torn down after.

    Where GlusterFS cannot run the test skips with the reason, or fails if MP_TIER_GLUSTERFS=required
    (CI: a machine that cannot run the volume must not pass by skipping).
    """
    with contextlib.ExitStack() as held:
        why = gl.why_unusable()
        if why is None:
            held.enter_context(_one_volume_at_a_time())
            gl.teardown(cluster, log)
            try:
                gl.setup(cluster, log)
            except gl.GlusterUnavailable as e:
                why = str(e)
                gl.teardown(cluster, log)
        if why is not None:
            if os.environ.get("MP_TIER_GLUSTERFS") == "required":
                pytest.fail(f"GlusterFS required but unusable: {why}")
            pytest.skip(f"GlusterFS cannot run on this machine: {why}")
        try:
            yield cluster
        finally:
            gl.teardown(cluster, log)


@contextlib.contextmanager
def _one_volume_at_a_time() -> Iterator[None]:
    """An exclusive lock on GLUSTER_LOCK, so the volumes of every pytest process here (the suite's two test
    files, or another run's) take turns: the machine's one glusterd refuses a volume change while another is
    in progress ("Another transaction is in progress"), and each setup and teardown starts or stops it."""
    with open(GLUSTER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# C for a libc shim that picks the calls it fails by the file they are on: the path fd is open on, "" if /proc
# cannot say (a thread's own buffer, so lanes may ask at once)
SHIM_FD_PATH = (
    "#include <stdio.h>\n#include <unistd.h>\n"
    "static const char *fd_path(int fd) {\n"
    "    static __thread char path[4096];\n    char link[64];\n"
    '    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);\n'
    "    ssize_t n = readlink(link, path, sizeof path - 1);\n    path[n > 0 ? n : 0] = 0;\n    return path;\n}\n"
)


def libc_shim(tmp_path, name: str, source: str) -> dict[str, str]:
    """The environment of a host (and its workers) whose libc call ``source`` overrides: it stands in for a
    seccomp profile that refuses a system call, or an older kernel that lacks one; skips without a C compiler."""
    shim = tmp_path / f"{name}.so"
    (tmp_path / f"{name}.c").write_text(source)
    try:
        built = subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / f"{name}.c")], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no C compiler to build the shim")
    assert built.returncode == 0, built.stderr
    return {**os.environ, "LD_PRELOAD": str(shim)}


def bytes_read(pid: int) -> int:
    """What process ``pid`` has read so far by any read system call (its /proc/<pid>/io rchar), all threads."""
    with open(f"/proc/{pid}/io") as f:
        return int(f.read().split("rchar:")[1].split()[0])


_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def _mount(kind: str, target: Path, options: str) -> None:
    """mount(2), not mount(8): no process, so the unit layer may use it too. Skips where it cannot be done."""
    if _libc.mount(kind.encode(), os.fsencode(target), kind.encode(), 0, options.encode()) != 0:
        pytest.skip(f"cannot mount {kind} at {target} here: {os.strerror(ctypes.get_errno())}")


@contextlib.contextmanager
def mounted(kind: str, target: Path, options: str = "") -> Iterator[Path]:
    """A new, empty ``kind`` file system (tmpfs, ramfs) mounted at ``target``, made if need be; skipped where it
    cannot be mounted, and detached on the way out."""
    target.mkdir(exist_ok=True)
    _mount(kind, target, options)
    try:
        yield target
    finally:
        _unmount(target)


def run_or_skip(*command: str) -> str:
    """``command``'s output (a mkfs, a loop mount, a debugfs): the test is skipped where it cannot run here."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip(f"no {command[0]} here")
    if done.returncode:
        pytest.skip(f"cannot {' '.join(command[:2])} here: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def small_ext4(scratch: Path, mib: int, *mkfs_options: str) -> Iterator[tuple[Path, Path]]:
    """A real ext4 of ``mib`` MiB, made with ``mkfs_options`` in an image file in ``scratch`` and loop-mounted
    (skipped where that cannot be done): the image and its mount point, detached on the way out. A small one
    fills up (ENOSPC) in a few hundred blocks; debugfs can find a file's disk blocks in the image."""
    if os.geteuid() != 0:
        pytest.skip("a loop mount needs root")
    image, mount = scratch / "fs.img", scratch / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    run_or_skip("mkfs.ext4", "-q", "-F", *mkfs_options, str(image))
    run_or_skip("mount", "-o", "loop", str(image), str(mount))
    try:
        yield image, mount
    finally:
        _unmount(mount)


def _fill(path: Path) -> None:
    """A file at ``path`` as large as its file system has room for."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = bytes(4096)
        while os.write(fd, chunk):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


@contextlib.contextmanager
def overlay(lower: Path, scratch: Path, room: str = "64k") -> Iterator[tuple[Path, Callable[[], None]]]:
    """``lower`` seen through an overlayfs mount whose upper layer is a tmpfs of ``room`` bytes, and ``fill()``,
    which fills that tmpfs: from then on a change to a file still in ``lower`` (a utime copies it up first,
    metacopy off) fails with ENOSPC while reads of it work. Skips where it cannot mount; unmounted on the way out."""
    mount = scratch / "overlay"
    mount.mkdir()
    with mounted("tmpfs", scratch / "upper", f"size={room}") as small:
        (small / "up").mkdir()
        (small / "work").mkdir()
        _mount("overlay", mount, f"lowerdir={lower},upperdir={small / 'up'},workdir={small / 'work'},metacopy=off")
        try:
            yield mount, lambda: _fill(small / "filler")
        finally:
            _unmount(mount)


def unmount(target: Path) -> None:
    """umount(2) at once, not detached: the file system is written out (its superblock too) when it returns,
    and a mount still in use fails the test."""
    assert _libc.umount2(os.fsencode(target), 0) == 0, f"cannot unmount {target}: {os.strerror(ctypes.get_errno())}"


def _unmount(target: Path) -> None:
    """Detached at once (MNT_DETACH): a tier's fd still open there cannot keep the mount in place. EINVAL: the
    test unmounted it itself and failed before mounting it again."""
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0:
        assert ctypes.get_errno() == errno.EINVAL, f"{target} left mounted: {os.strerror(ctypes.get_errno())}"
