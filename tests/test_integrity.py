"""Integrity: checksums catch rotten files; racing writers and readers never tear a block."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import BLOCK, SHIM_FD_PATH, fill_random, libc_shim, make_keys, run_job, run_or_skip, small_ext4, unmount

from mp_tier import JobMetadata, PrimaryCache, TierConfig
from mp_tier.block_io import CRC_XATTR


def test_checksum_mismatch_fails_that_block_and_removes_it(make_tier, cache):
    tier = make_tier(config=TierConfig(checksum=True))
    keys = make_keys(4)
    fill_random(cache, range(4))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2, 3])).success
    rotten = tier.block_path(keys[2])
    assert len(os.getxattr(rotten, CRC_XATTR)) == 4
    with open(rotten, "r+b") as f:  # one flipped bit, size unchanged
        f.seek(BLOCK // 3)
        byte = f.read(1)[0]
        f.seek(BLOCK // 3)
        f.write(bytes([byte ^ 1]))
    result = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[10, 11, 12, 13]))
    assert not result.success and result.error_code == "EBADMSG" and "CRC32" in result.error
    assert result.successful_keys == (keys[0], keys[1], keys[3])
    assert not os.path.exists(rotten)
    assert np.array_equal(cache.array[[10, 11, 13]], cache.array[[0, 1, 3]])
    assert tier.stats().files_removed >= 1


def test_blocks_stored_without_checksums_still_load(make_tier, cache):
    plain = make_tier()
    keys = make_keys(3)
    fill_random(cache, range(3))
    assert run_job(plain, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2])).success
    plain.shutdown()
    checked = make_tier(config=TierConfig(checksum=True))
    assert run_job(checked, "load", JobMetadata(job_id=2, keys=keys, block_ids=[5, 6, 7])).success
    assert np.array_equal(cache.array[5:8], cache.array[0:3])


KEYS = 32
SMALL = 16384  # four pages: a non-atomic writer could tear it

WRITER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    if __name__ == "__main__":
        root, writer, stop, engine = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        keys = [i.to_bytes(32, "big") + bytes(4) for i in range({keys})]
        rng = np.random.default_rng(writer)
        with PrimaryCache.create({keys}, {block}) as cache, FileSystemTierManager(
            primary_kv_view=cache, root_dir=root, n_read_workers=1, n_write_workers=1, engine=engine
        ) as tier:
            words = cache.array.view(np.uint64)
            generation = writer << 20
            while not os.path.exists(stop):
                generation += 1
                for i in range({keys}):
                    words[i] = (i << 32) | generation
                for i in rng.choice({keys}, {keys} // 4, replace=False):
                    try:
                        os.unlink(tier.block_path(keys[i]))
                    except FileNotFoundError:
                        pass
                tier.submit_store(JobMetadata(job_id=generation, keys=keys, block_ids=list(range({keys}))))
                tier.drain(30)
                tier.get_finished()
    """
).format(keys=KEYS, block=SMALL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", ["processes"])
def test_racing_stores_and_loads_never_tear_a_block(make_tier, tmp_path, engine):
    """Two writer processes rewrite the same keys (deleting some each round) while this
    process's tier loads them: every block read must hold one key's one generation."""
    root = str(tmp_path / "blocks")
    cache = PrimaryCache.create(2 * KEYS, SMALL)
    tier = make_tier(root_dir=root, view=cache)
    keys = [i.to_bytes(32, "big") + bytes(4) for i in range(KEYS)]
    seconds = 30.0
    stop = tmp_path / "stop"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, root, str(w), str(stop), engine]) for w in (1, 2)]
    words = cache.array.view(np.uint64)
    reads = torn = 0
    job = 0
    try:
        deadline = time.monotonic() + seconds
        while reads < 30_000 and time.monotonic() < deadline:
            job += 1
            base = (job % 2) * KEYS  # alternate halves so a stale block could not pass as fresh
            words[base : base + KEYS] = 0
            result = run_job(tier, "load", JobMetadata(job_id=job, keys=keys, block_ids=list(range(base, base + KEYS))))
            loaded = set(result.successful_keys) if not result.success else set(keys)
            for i, key in enumerate(keys):
                if key not in loaded:
                    continue
                block = words[base + i]
                reads += 1
                torn += not (block[0] >> 32 == i and (block == block[0]).all())
    finally:
        stop.touch()
        assert [w.wait(30) for w in writers] == [0, 0]
        tier.shutdown()
        cache.close()
    assert reads >= 30_000, f"only {reads} block reads in {seconds} s"
    assert torn == 0


def _only_it_fails(tier, cache, keys: list[bytes], bad: str) -> None:
    """A load of the 3 ``keys`` stored from cache blocks 0-2 into 10-12: only ``keys[1]``, at ``bad``, fails, with
    its read's error naming it, and its file is kept; the others land."""
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[10, 11, 12]))
    assert not loaded.success and loaded.successful_keys == (keys[0], keys[2]) and loaded.transfer_size == 2 * BLOCK
    assert loaded.error_code in ("EIO", "EUCLEAN") and loaded.error.endswith("/".join(bad.split("/")[-3:])), loaded.error
    assert np.array_equal(cache.array[[10, 12]], cache.array[[0, 2]]) and os.path.getsize(bad) == BLOCK


def test_a_block_whose_read_fails_fails_alone_and_is_read_once(make_tier, cache, tmp_path):
    """A real ext4 (loop mount) on which one block file's extent block is corrupt: the file opens and has the
    block's size, but its read fails (EIO; EUCLEAN once ext4 knows). The load's other blocks land; that one
    fails with that error and is kept, and the file system saw one failing read of it, not two: the one-call
    load left a read that failed to Python, which read it again (on a failing disk each can take seconds)."""
    with small_ext4(tmp_path, 16, "-b", "4096") as (image, mount):
        keys = make_keys(3)
        fill_random(cache, range(3))
        tier = make_tier(root_dir=str(mount))
        assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2])).success
        tier.shutdown()
        bad = tier.block_path(keys[1])
        with open(bad, "r+b") as f:  # written again in 8 extents: an extent tree with a leaf block
            f.truncate(0)
            for at in range(0, BLOCK, 8192):
                os.pwrite(f.fileno(), bytes(4096), at)
            f.truncate(BLOCK)
        unmount(mount)
        extents = run_or_skip("debugfs", "-R", f"ex {bad.removeprefix(str(mount))}", str(image))
        leaf = int(next(line for line in extents.splitlines() if line.split()[:2] == ["0/", "1"]).split()[7])
        with open(image, "r+b") as f:
            f.seek(leaf * 4096)
            f.write(bytes(2))  # the leaf's magic
        run_or_skip("mount", "-o", "loop", str(image), str(mount))
        with open(bad, "rb") as f, pytest.raises(OSError) as failed:
            f.read()
        assert failed.value.errno == errno.EIO and os.path.getsize(bad) == BLOCK
        before = _errors_counted(mount)
        tier = make_tier(root_dir=str(mount))
        _only_it_fails(tier, cache, keys, bad)
        tier.shutdown()
        assert (reads := _errors_counted(mount) - before) == 1, f"the block's failing read was done {reads} times"


_FIFREEZE, _FITHAW = 0xC0045877, 0xC0045878


def _errors_counted(mount: Path) -> int:
    """The errors the ext4 at ``mount`` has counted, once a freeze has written its superblock: ext4 counts an
    error in a work item after it, and /sys shows the superblock's count, so a loaded machine read it before
    the last read's count was in."""
    fd = os.open(mount, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _FIFREEZE, 0)
        fcntl.ioctl(fd, _FITHAW, 0)
    finally:
        os.close(fd)
    device = os.path.basename(run_or_skip("findmnt", "-n", "-o", "SOURCE", str(mount)).strip())
    with open(f"/sys/fs/ext4/{device}/errors_count") as f:
        return int(f.read())


def test_a_one_task_load_forgets_the_blocks_it_finds_gone_or_short(make_tier, cache):
    """One 16-block task (one reader) whose one-call load stops at 5 blocks: 3 files deleted by someone else, 2
    cut short. Each is judged in Python after the run stops, and its index reaches the host: the deleted ones
    and the removed short ones are forgotten (lookups answer False from memory), the short ones count as files
    removed, and only the good blocks' bytes count as moved."""
    tier = make_tier(n_read_workers=1, config=TierConfig(max_bytes=64 * BLOCK))
    keys = make_keys(16, seed=4)
    fill_random(cache, range(16))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(16)))).success
    gone, short = [2, 3, 9], [5, 15]
    for i in gone:
        os.unlink(tier.block_path(keys[i]))
    for i in short:
        os.truncate(tier.block_path(keys[i]), BLOCK // 2)
    good = [i for i in range(16) if i not in gone + short]
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=list(range(100, 116))))
    assert loaded.successful_keys == tuple(keys[i] for i in good) and loaded.transfer_size == len(good) * BLOCK
    assert np.array_equal(cache.array[[100 + i for i in good]], cache.array[good])
    assert tier.lookup_many(keys, probe=False) == [i in good for i in range(16)]
    assert tier.stats().files_removed == 2 and not any(os.path.exists(tier.block_path(keys[i])) for i in short)


def test_a_block_whose_crc_cannot_be_read_fails_alone_naming_it(make_tier, cache, tmp_path):
    """Checksums on a real ext4 with 128-byte inodes, where a block's CRC xattr has a disk block of its own, and
    that one block's xattr block is corrupt: its CRC read fails (EUCLEAN; EIO on some kernels). That block fails
    with the error naming its file, which is kept (nothing shows its bytes are bad); the others load. Before,
    the error named the fd the CRC was read through ("EUCLEAN: Structure needs cleaning: 6")."""
    with small_ext4(tmp_path, 16, "-b", "4096", "-I", "128") as (image, mount):
        keys = make_keys(3, seed=6)
        fill_random(cache, range(3))
        tier = make_tier(root_dir=str(mount), config=TierConfig(checksum=True))
        assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2])).success
        tier.shutdown()
        bad = tier.block_path(keys[1])
        unmount(mount)
        inode = run_or_skip("debugfs", "-R", f"stat {bad.removeprefix(str(mount))}", str(image))
        xattr_block = int(next(line for line in inode.splitlines() if line.startswith("File ACL:")).split()[2])
        assert xattr_block, "the CRC is in the inode: no block of its own to corrupt"
        with open(image, "r+b") as f:
            f.seek(xattr_block * 4096)
            f.write(bytes(4))  # the xattr block's magic
        run_or_skip("mount", "-o", "loop", str(image), str(mount))
        tier = make_tier(root_dir=str(mount), config=TierConfig(checksum=True))
        _only_it_fails(tier, cache, keys, bad)
        tier.shutdown()


TEMP_FILE_FAULTS = (  # a block's temp file on a failing file system: each write returns 0 (no byte moved, no error,
    # as a FUSE daemon may reply) or fails with TEMP_WRITE_ERRNO; with TEMP_UNLINK_ERRNO its removal fails too
    "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <errno.h>\n#include <stdlib.h>\n#include <string.h>\n"
    + SHIM_FD_PATH
    + 'static int temp(const char *path) { size_t n = strlen(path); return n > 4 && !strcmp(path + n - 4, ".tmp") && strstr(path, ".bin."); }\n'
    "ssize_t pwrite(int fd, const void *buf, size_t n, off_t at) {\n"
    "    if (temp(fd_path(fd))) {\n"
    '        errno = atoi(getenv("TEMP_WRITE_ERRNO"));\n        return errno ? -1 : 0;\n    }\n'
    '    ssize_t (*real)(int, const void *, size_t, off_t) = dlsym(RTLD_NEXT, "pwrite");\n    return real(fd, buf, n, at);\n}\n'
    "ssize_t pwrite64(int fd, const void *buf, size_t n, off_t at) { return pwrite(fd, buf, n, at); }\n"
    "int unlinkat(int dir, const char *path, int flags) {\n"
    '    const char *refused = getenv("TEMP_UNLINK_ERRNO");\n'
    "    if (refused && temp(path)) { errno = atoi(refused); return -1; }\n"
    '    int (*real)(int, const char *, int) = dlsym(RTLD_NEXT, "unlinkat");\n    return real(dir, path, flags);\n}\n'
)
ONE_STORE_HOST = textwrap.dedent(
    """
    import json, os, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
    with PrimaryCache.create(2, 65536) as cache:
        cache.array[0] = 7
        config = TierConfig(checksum=sys.argv[2] == "checksum")
        with FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], config=config) as tier:
            tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
            tier.drain(10)
            [result] = tier.get_finished()
        left = [name for _, _, names in os.walk(sys.argv[1]) for name in names if name.endswith(".tmp")]
        print(json.dumps([result.success, result.error_code, result.error, len(left)]))
    """
)


def store_with_temp_faults(tmp_path: Path, checksum: str, **faults: int) -> tuple[bool, str, str, int]:
    """A tier's store of one block whose temp file meets ``faults`` (see TEMP_FILE_FAULTS): its success, error
    code and error, and how many temp files it left (removed here, as the shim would not let the tier)."""
    env = {**libc_shim(tmp_path, "temp_faults", TEMP_FILE_FAULTS), **{name.upper(): str(code) for name, code in faults.items()}}
    host = [sys.executable, "-c", ONE_STORE_HOST, str(tmp_path / "blocks"), checksum]
    try:
        done = subprocess.run(host, env=env, capture_output=True, text=True, timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail("the store never ended")
    for temp in (tmp_path / "blocks").rglob("*.tmp"):
        temp.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    success, code, error, left = json.loads(done.stdout)
    return success, code, error, left


@pytest.mark.parametrize("checksum", ["plain", "checksum"])
def test_a_store_whose_writes_make_no_progress_fails_with_eio_and_leaves_no_temp_file(tmp_path, checksum):
    """A write that returns 0 for a block's bytes fails the store with EIO naming the block, on the one-call path
    and on the checksummed Python path alike. The Python path looped for ever, the worker spinning on its
    write and the job never ending."""
    success, code, error, left = store_with_temp_faults(tmp_path, checksum, temp_write_errno=0)
    assert (success, code, left) == (False, "EIO", 0), error
    assert error.endswith(".bin"), error


@pytest.mark.parametrize("checksum", ["plain", "checksum"])
def test_a_store_whose_write_fails_reports_that_error_when_its_temp_file_cannot_be_removed(tmp_path, checksum):
    """A block's write fails (EIO) and its temp file's removal then fails too (EROFS: ext4 remounts read-only on
    an I/O error): the store fails with the write's error naming the block, on either path. The checksummed
    Python path reported the removal's EROFS, naming the temp file."""
    success, code, error, left = store_with_temp_faults(tmp_path, checksum, temp_write_errno=errno.EIO, temp_unlink_errno=errno.EROFS)
    assert (success, code, left) == (False, "EIO", 1), error
    assert error.endswith(".bin"), error


INTERRUPTED = (  # every other read and write of a block file (or its temp file) is interrupted by a signal before any byte moves
    "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <errno.h>\n#include <fcntl.h>\n#include <stdlib.h>\n"
    "#include <string.h>\n#include <sys/uio.h>\n"
    + SHIM_FD_PATH
    + "static int interrupted(int fd) {\n"
    "    static __thread int calls;\n    const char *target = fd_path(fd);\n    size_t length = strlen(target);\n"
    '    if (length < 4 || (memcmp(target + length - 4, ".bin", 4) && memcmp(target + length - 4, ".tmp", 4)) || calls++ % 2)\n'
    "        return 0;\n"
    '    int note = open(getenv("EINTR_LOG"), O_WRONLY | O_CREAT | O_APPEND, 0600);\n'
    '    if (note >= 0) { write(note, "x", 1); close(note); }\n    errno = EINTR;\n    return 1;\n}\n'
    "#define PASS(name, type, ...) if (interrupted(fd)) return -1; \\\n"
    "    ssize_t (*real)(int, type, __VA_ARGS__) = dlsym(RTLD_NEXT, name);\n"
    'ssize_t pread(int fd, void *b, size_t n, off_t at) { PASS("pread", void *, size_t, off_t) return real(fd, b, n, at); }\n'
    'ssize_t pwrite(int fd, const void *b, size_t n, off_t at) { PASS("pwrite", const void *, size_t, off_t) return real(fd, b, n, at); }\n'
    'ssize_t preadv(int fd, const struct iovec *v, int n, off_t at) { PASS("preadv", const struct iovec *, int, off_t) return real(fd, v, n, at); }\n'
    "ssize_t pread64(int fd, void *b, size_t n, off_t at) { return pread(fd, b, n, at); }\n"
    "ssize_t pwrite64(int fd, const void *b, size_t n, off_t at) { return pwrite(fd, b, n, at); }\n"
    "ssize_t preadv64(int fd, const struct iovec *v, int n, off_t at) { return preadv(fd, v, n, at); }\n"
    "ssize_t preadv2(int fd, const struct iovec *v, int n, off_t at, int flags) {\n"
    '    PASS("preadv2", const struct iovec *, int, off_t, int) return real(fd, v, n, at, flags);\n}\n'
    "ssize_t preadv64v2(int fd, const struct iovec *v, int n, off_t at, int flags) { return preadv2(fd, v, n, at, flags); }\n"
)
INTERRUPTED_HOST = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
    with PrimaryCache.create(8, 65536) as cache:
        cache.array[:4] = np.frombuffer(os.urandom(4 * 65536), dtype=cache.array.dtype).reshape(4, -1)
        config = TierConfig(checksum=sys.argv[2] == "checksum")
        with FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], config=config) as tier:
            keys = [bytes([n]) * 32 + bytes(4) for n in range(4)]
            done = []
            for job_id, op, ids in ((1, "store", [0, 1, 2, 3]), (2, "load", [4, 5, 6, 7])):
                getattr(tier, "submit_" + op)(JobMetadata(job_id=job_id, keys=keys, block_ids=ids))
                tier.drain(30)
                done += [(r.job_id, r.success, r.error) for r in tier.get_finished()]
        print(json.dumps([done, bool((cache.array[:4] == cache.array[4:]).all())]))
    """
)


@pytest.mark.parametrize("checksum", ["plain", "checksum"])
def test_reads_and_writes_interrupted_by_a_signal_are_done_again(tmp_path, checksum):
    """A signal that interrupts a block's read or write before any byte moved (EINTR: a FUSE or NFS mount, a
    handler installed without SA_RESTART) is no failure: the call is made again, on the one-call path and on
    the checksummed Python path, and every block stores and loads whole. A libc shim interrupts every other call."""
    log = tmp_path / "interrupted"
    env = {**libc_shim(tmp_path, "interrupted", INTERRUPTED), "EINTR_LOG": str(log)}
    host = [sys.executable, "-c", INTERRUPTED_HOST, str(tmp_path / "blocks"), checksum]
    done = subprocess.run(host, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [[[1, True, None], [2, True, None]], True]
    assert log.exists() and log.stat().st_size >= 8, "the shim interrupted too few calls: the test proves little"


CONFIG_WRITE_STALLS = (  # each write to the temp file of a config.json returns 0: no byte moved, no error
    "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <string.h>\n"
    + SHIM_FD_PATH
    + "ssize_t write(int fd, const void *buf, size_t n) {\n"
    "    const char *target = fd_path(fd);\n"
    '    if (strstr(target, "/config.json.") && strstr(target, ".tmp"))\n'
    "        return 0;\n"
    '    ssize_t (*real)(int, const void *, size_t) = dlsym(RTLD_NEXT, "write");\n    return real(fd, buf, n);\n}\n'
)
NEW_TIER_HOST = textwrap.dedent(
    """
    import sys
    from mp_tier import FileSystemTierManager, PrimaryCache
    with PrimaryCache.create(2, 65536) as cache:
        try:
            FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1]).shutdown()
        except OSError as e:
            print(f"{type(e).__name__}: {e}")
    """
)


def test_a_config_json_whose_writes_make_no_progress_fails_the_tier_with_eio(tmp_path):
    """A new namespace's config.json is written to a temp file first; a write that returns 0 (a FUSE daemon may)
    looped for ever, and the tier's constructor with it. It fails with EIO naming the file, leaving no temp file."""
    env = libc_shim(tmp_path, "config_stalls", CONFIG_WRITE_STALLS)
    try:
        done = subprocess.run([sys.executable, "-c", NEW_TIER_HOST, str(tmp_path / "root")], env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the tier's constructor never returned")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("OSError: [Errno 5]") and "config.json" in done.stdout, done.stdout
    assert list((tmp_path / "root").rglob("*.tmp")) == []
