"""What another user, a planted entry or a hostile name can do to the tier: never lead it outside its root,
never get bytes into the cache, never hang or kill a worker. Real symlinks, FIFOs, sockets, a real second
uid, a real UTS namespace."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import BLOCK, NAMESPACE, fill_random, libc_shim, make_keys, run_job

from mp_tier import FileSystemTierManager, JobMetadata, TierConfig
from mp_tier.layout import HOST_TAG, MAX_KEY_BYTES, BlockLayout

NOBODY = 65534


def plant_block(path: Path, data: bytes = b"EVIL" * (BLOCK // 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("level", ["leaf", "top"])
def test_a_symlinked_directory_never_leads_a_store_or_load_outside_the_root(make_tier, cache, tmp_path, level):
    tier = make_tier()
    outside = tmp_path / "outside"
    outside.mkdir()
    key = make_keys(1)[0]
    path = Path(tier.block_path(key))
    link = path.parent if level == "leaf" else path.parent.parent
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, link)
    planted = outside / path.relative_to(link)
    plant_block(planted)  # what the load would read through the link
    fill_random(cache, [0])
    stored = run_job(tier, "store", JobMetadata(job_id=1, keys=[key], block_ids=[0]))
    assert not stored.success and stored.error_code in ("ELOOP", "ENOTDIR")  # a symlink is no directory
    assert sorted(p.relative_to(outside) for p in outside.rglob("*") if p.is_file()) == [planted.relative_to(outside)]
    cache.array[1] = 0
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=[key], block_ids=[1]))
    assert not loaded.success and loaded.error_code in ("ELOOP", "ENOTDIR")
    assert not cache.array[1].any(), "planted bytes reached the cache"
    assert tier.lookup(key) is False
    assert tier.lookup_many([key]) == [False]
    tier.drain(30)
    assert tier.lookup_many([key]) == [False], "a probe followed the link"


def test_an_eviction_never_unlinks_through_a_symlinked_directory(make_tier, cache, tmp_path):
    tier = make_tier(config=TierConfig(max_bytes=2 * BLOCK))
    victim, *others = make_keys(3)
    fill_random(cache, range(3))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[victim], block_ids=[0])).success
    leaf = Path(tier.block_path(victim)).parent
    outside = tmp_path / "outside"
    outside.mkdir()
    innocent = outside / Path(tier.block_path(victim)).name  # a file of the victim's name, outside the root
    innocent.write_bytes(b"not yours")
    leaf.rename(tmp_path / "moved-away")
    os.symlink(outside, leaf)
    for j, key in enumerate(others):
        assert run_job(tier, "store", JobMetadata(job_id=10 + j, keys=[key], block_ids=[1 + j])).success
    assert tier.stats().blocks_evicted == 1
    assert innocent.read_bytes() == b"not yours"


def test_the_namespace_directory_as_a_symlink_is_refused(cache, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / NAMESPACE)
    with pytest.raises(OSError, match="not usable"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(root))
    assert list(elsewhere.iterdir()) == []



NO_OPENAT2 = textwrap.dedent(
    """
    #define _GNU_SOURCE
    #include <dlfcn.h>
    #include <errno.h>
    #include <fcntl.h>
    #include <stdarg.h>
    #include <stdlib.h>
    #include <unistd.h>
    long syscall(long number, ...) {
        va_list ap;
        long a[6];
        va_start(ap, number);
        for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
        va_end(ap);
        if (number == 437) {  /* openat2: refused with OPENAT2_ERRNO (a kernel before 5.6, a seccomp profile), and noted */
            int fd = open(getenv("OPENAT2_REFUSED"), O_WRONLY | O_CREAT | O_APPEND, 0600);
            if (fd >= 0) { write(fd, "x", 1); close(fd); }
            errno = atoi(getenv("OPENAT2_ERRNO"));
            return -1;
        }
        long (*real)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
        return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
    }
    """
)
NO_OPENAT2_HOST = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    root, outside = sys.argv[1], sys.argv[2]
    with PrimaryCache.create(num_blocks=4, block_bytes=65536) as cache:
        cache.array[0] = np.frombuffer(os.urandom(65536), dtype=cache.array.dtype)
        with FileSystemTierManager(primary_kv_view=cache, root_dir=root) as tier:
            kept, never, linked = (bytes([i]) * 32 + bytes(4) for i in (1, 2, 3))
            top = os.path.dirname(os.path.dirname(tier.block_path(linked)))
            planted = os.path.join(outside, os.path.relpath(tier.block_path(linked), top))
            os.makedirs(os.path.dirname(planted))
            with open(planted, "wb") as f:
                f.write(b"EVIL" * 16384)
            os.symlink(outside, top)
            jobs = [("store", kept, 0), ("load", kept, 1), ("load", never, 2), ("store", linked, 0), ("load", linked, 3)]
            codes = []
            for job_id, (op, key, block) in enumerate(jobs):
                getattr(tier, "submit_" + op)(JobMetadata(job_id=job_id, keys=[key], block_ids=[block]))
                tier.drain(30)
                codes += [r.error_code for r in tier.get_finished()]
            loaded = bool((cache.array[0] == cache.array[1]).all())
            print(json.dumps({"codes": codes, "loaded": loaded, "planted": bool(cache.array[3].any()), "at": planted}))
    """
)


@pytest.mark.parametrize("refusal", ["ENOSYS", "EPERM"])
def test_a_kernel_without_openat2_gets_the_same_confinement_one_component_at_a_time(tmp_path, refusal):
    """Where openat2 is missing (ENOSYS: kernels before 5.6, or a seccomp profile that does not know it) or
    refused (EPERM: the errno of Docker's default seccomp profile before 20.10), every path is walked one
    O_NOFOLLOW component at a time: blocks store into new directories and load, a missing one is ENOENT, and
    a symlinked directory is refused, as with openat2. With EPERM every block failed (EPERM)."""
    env = libc_shim(tmp_path, "no_openat2", NO_OPENAT2)
    refused = tmp_path / "openat2-refused"
    outside = tmp_path / "outside"
    outside.mkdir()
    host = [sys.executable, "-c", NO_OPENAT2_HOST, str(tmp_path / "blocks"), str(outside)]
    env |= {"OPENAT2_REFUSED": str(refused), "OPENAT2_ERRNO": str(getattr(errno, refusal))}
    done = subprocess.run(host, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert refused.exists(), "the shim did not stand in for openat2: the test proves nothing"
    seen = json.loads(done.stdout)
    assert seen["codes"][:3] == [None, None, "ENOENT"] and seen["loaded"], seen
    assert all(code in ("ELOOP", "ENOTDIR") for code in seen["codes"][3:]) and not seen["planted"], seen
    assert [p for p in outside.rglob("*") if p.is_file()] == [Path(seen["at"])]
    assert Path(seen["at"]).read_bytes() == b"EVIL" * 16384


def as_user(uid: int, gids: list[int], act: Callable[[], None], umask: int = 0o022) -> None:
    """Run ``act()`` in a forked child that switched to ``uid`` (primary group ``gids[0]``), as root may."""
    if os.geteuid() != 0:
        pytest.skip("switching to a second uid needs root")
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups(gids)
            os.setgid(gids[0])
            os.setuid(uid)
            os.umask(umask)
            act()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0, "the second user's part failed: its traceback is above"


def run_as(uid: int, gid: int, namespace: Path, block: Path, mode: int) -> None:
    """As a real second user: make ``namespace`` with ``mode`` and plant ``block`` in it."""

    def plant() -> None:
        os.makedirs(block.parent, mode=mode)
        namespace.chmod(mode)
        block.write_bytes(b"EVIL" * (BLOCK // 4))

    as_user(uid, [gid], plant, umask=0)


def test_a_namespace_another_user_prepared_is_refused(cache, shared_tmp):
    """Another user made the namespace first, world-writable, and planted a block in it: KV-cache poisoning
    through a shared /tmp. The tier refuses to use it, naming the owner, and reads nothing from it."""
    namespace = shared_tmp / NAMESPACE
    key = make_keys(1)[0]
    block = Path(BlockLayout(str(namespace)).path(key))
    run_as(NOBODY, NOBODY, namespace, block, 0o777)
    assert namespace.stat().st_uid == NOBODY
    with pytest.raises(PermissionError, match=f"owned by uid {NOBODY} .* another user could have planted blocks"):
        FileSystemTierManager(primary_kv_view=cache, root_dir=str(shared_tmp))


@pytest.mark.parametrize("file_mode, admitted", [("group", True), ("private", False)])
def test_group_mode_admits_a_namespace_of_the_group(cache, shared_tmp, file_mode, admitted):
    """A namespace another user of this process's group made, group-writable: shared between nodes'
    service users in group mode, refused in private mode. Its planted block file belongs to the group."""
    namespace = shared_tmp / NAMESPACE
    key = make_keys(1)[0]
    block = Path(BlockLayout(str(namespace)).path(key))
    run_as(NOBODY, os.getegid(), namespace, block, 0o770)
    config = TierConfig(file_mode=file_mode, n_read_workers=1, n_write_workers=1)
    if not admitted:
        with pytest.raises(PermissionError, match="owned by uid"):
            FileSystemTierManager(primary_kv_view=cache, root_dir=str(shared_tmp), config=config)
        return
    with FileSystemTierManager(primary_kv_view=cache, root_dir=str(shared_tmp), config=config) as tier:
        assert tier.lookup(key) is True
        assert run_job(tier, "load", JobMetadata(job_id=1, keys=[key], block_ids=[3])).success
        assert bytes(cache.array[3][:4]) == b"EVIL"


def test_a_group_member_loads_another_members_block_with_a_budget(shared_tmp):
    """Group mode, two service users of one group: one stores a block (0640), the other loads it with a
    byte budget on, so the load also refreshes the block's recency. utime on a file another user owns
    and the group cannot write is refused; the bytes were read, so the load succeeds."""
    group, reader = 4242, 4343
    key = make_keys(1)[0]
    config = TierConfig(file_mode="group", engine="threads", n_read_workers=1, n_write_workers=1, max_bytes=8 * BLOCK)
    shared_tmp.chmod(0o1777)

    def store() -> None:
        view = np.full((2, BLOCK), 7, np.uint8)
        with FileSystemTierManager(primary_kv_view=view, root_dir=str(shared_tmp), config=config) as tier:
            assert run_job(tier, "store", JobMetadata(job_id=1, keys=[key], block_ids=[0])).success

    def load() -> None:
        view = np.zeros((2, BLOCK), np.uint8)
        with FileSystemTierManager(primary_kv_view=view, root_dir=str(shared_tmp), config=config) as tier:
            tier.drain(30)  # the start-up scan
            result = run_job(tier, "load", JobMetadata(job_id=1, keys=[key], block_ids=[1]))
            assert result.success, result
            assert (view[1] == 7).all()

    as_user(NOBODY, [group], store)
    as_user(reader, [group], load)


def test_an_unreadable_block_file_is_rewritten_by_the_next_store(shared_tmp):
    """A block file of the right size and owner that its owner cannot read (mode 000: a botched chmod):
    its load fails with EACCES, and the next store of it writes it again instead of skipping it."""
    key = make_keys(1)[0]
    config = TierConfig(engine="threads", n_read_workers=1, n_write_workers=1)

    def act() -> None:
        view = np.full((2, BLOCK), 7, np.uint8)
        with FileSystemTierManager(primary_kv_view=view, root_dir=str(shared_tmp), config=config) as tier:
            assert run_job(tier, "store", JobMetadata(job_id=1, keys=[key], block_ids=[0])).success
            os.chmod(tier.block_path(key), 0)
            failed = run_job(tier, "load", JobMetadata(job_id=2, keys=[key], block_ids=[1]))
            assert not failed.success and failed.error_code == "EACCES", failed
            stored = run_job(tier, "store", JobMetadata(job_id=3, keys=[key], block_ids=[0]))
            assert stored.success and stored.transfer_size == BLOCK, stored
            assert run_job(tier, "load", JobMetadata(job_id=4, keys=[key], block_ids=[1])).success
            assert (view[1] == 7).all()

    as_user(NOBODY, [NOBODY], act)


@pytest.mark.parametrize("when", ["running", "before a restart"])
def test_a_block_file_of_another_owner_never_loads(make_tier, cache, when):
    """A regular file of the right size, owned by another uid (and group) inside the tier's own namespace:
    lookups say no, the start-up scan does not count it, a load refuses it (EPERM), and a store replaces
    it with the tier's own."""
    tier = make_tier()
    key = make_keys(1)[0]
    path = Path(tier.block_path(key))
    plant_block(path)
    os.chown(path, NOBODY, NOBODY)
    if when == "before a restart":
        tier.shutdown()
        tier = make_tier()
        tier.drain(30)  # the scan
        assert tier.stats().bytes_counted == 0
    assert tier.lookup_many([key], probe=False) == [False]
    assert tier.lookup(key) is False
    cache.array[1] = 0
    loaded = run_job(tier, "load", JobMetadata(job_id=1, keys=[key], block_ids=[1]))
    assert not loaded.success and loaded.error_code == "EPERM" and f"uid {NOBODY}" in loaded.error
    assert not cache.array[1].any()
    fill_random(cache, [0])
    stored = run_job(tier, "store", JobMetadata(job_id=2, keys=[key], block_ids=[0]))
    assert stored.success and stored.transfer_size == BLOCK
    assert path.stat().st_uid == os.geteuid()
    assert run_job(tier, "load", JobMetadata(job_id=3, keys=[key], block_ids=[1])).success
    assert np.array_equal(cache.array[1], cache.array[0])


def make_odd(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        with tempfile.TemporaryDirectory() as short, socket.socket(socket.AF_UNIX) as s:
            s.bind(f"{short}/s")  # a block path is longer than a socket address may be
            os.rename(f"{short}/s", path)
    elif kind == "symlink":
        os.symlink("/etc/passwd", path)
    elif kind == "dangling symlink":
        os.symlink("/nonexistent", path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind, load_code", [
    ("fifo", "EINVAL"), ("directory", "EINVAL"), ("socket", "ENXIO"), ("symlink", "ELOOP"), ("dangling symlink", "ELOOP"),
])
def test_an_odd_entry_at_a_block_path_fails_that_block_clearly_and_never_hangs(make_tier, cache, kind, load_code):
    """Only regular files are blocks: lookups say no, a load fails at once (a FIFO is opened non-blocking),
    a store fails (EEXIST) rather than claim success, and the entry is left for an operator."""
    tier = make_tier()
    key, other = make_keys(2)
    path = Path(tier.block_path(key))
    make_odd(path, kind)
    assert tier.lookup(key) is False
    loaded = run_job(tier, "load", JobMetadata(job_id=1, keys=[key], block_ids=[1]))
    assert not loaded.success and loaded.error_code == load_code, loaded.error
    assert loaded.successful_keys == ()
    fill_random(cache, [0, 3])
    stored = run_job(tier, "store", JobMetadata(job_id=2, keys=[key, other], block_ids=[0, 3]))
    assert not stored.success and stored.error_code == "EEXIST" and stored.successful_keys == (other,)
    assert stored.transfer_size == BLOCK
    assert tier.lookup_many([key]) == [False]
    tier.drain(30)
    assert tier.lookup_many([key]) == [False], "a probe took an odd entry for a block"
    assert os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode)
    assert tier.stats().workers_restarted == 0


def test_a_load_of_many_blocks_judges_each_and_moves_every_good_one(make_tier, cache):
    """One 11-block load: good blocks before, between and after a missing one, a symlink, a FIFO, a short
    file and a stranger's file. Each of those fails alone, only the short file (corrupt) is removed, and
    nothing reaches their cache blocks; every good block lands and, with a budget, its load sets its mtime."""
    tier = make_tier(config=TierConfig(max_bytes=64 * BLOCK))
    keys = make_keys(11, seed=3)
    good = [0, 2, 4, 6, 8, 10]
    fill_random(cache, range(11))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[keys[i] for i in good], block_ids=good)).success
    paths = [Path(tier.block_path(key)) for key in keys]
    make_odd(paths[3], "symlink")
    make_odd(paths[5], "fifo")
    plant_block(paths[7], bytes(BLOCK // 2))
    plant_block(paths[9])
    os.chown(paths[9], NOBODY, NOBODY)
    for i in (*good, 9):
        os.utime(paths[i], (1000, 1000))
    into = [100 + i for i in range(11)]
    cache.array[into] = 0
    loaded = run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=into))
    assert not loaded.success and loaded.error_code in ("ENOENT", "ELOOP", "EINVAL", "EBADMSG", "EPERM"), loaded
    assert loaded.successful_keys == tuple(keys[i] for i in good)
    assert loaded.transfer_size == len(good) * BLOCK, loaded
    for i in range(11):
        assert np.array_equal(cache.array[100 + i], cache.array[i]) if i in good else not cache.array[100 + i].any(), i
    assert all(paths[i].stat().st_mtime > 1000 for i in good), "a load with a budget records the use"
    assert paths[9].stat().st_mtime == 1000 and paths[9].stat().st_uid == NOBODY
    assert paths[3].is_symlink() and stat.S_ISFIFO(paths[5].lstat().st_mode) and not paths[7].exists()


def plant_hostile_names(base: Path) -> None:
    """Names the layout never gives, each a trap for a careless parser."""
    digest = "abcde" + "0" * 59
    traps = [
        base / "abc" / "de_g99999999999" / f"{digest}.bin",  # a group past 2**32
        base / "abc" / "de_g01" / f"{digest}.bin",  # a group with a leading zero
        base / "abc" / "de_gx" / f"{digest}.bin",  # not a number
        base / "zzz" / "de_g0" / f"{digest}.bin",  # not hex
        base / "abc" / "xy_g0" / f"{digest}.bin",  # does not match the digest
        base / "abc" / "de_g0" / "abcdeZZ.bin",  # not hex
        base / "abc" / "de_g0" / "abcde0.bin",  # too short a hash
        base / "abc" / "de_g0" / "notes.txt",
        base / "abc" / "de_g0" / "deep" / f"{digest}.bin",
        base / "abc" / "de_g\u00b2" / f"{digest}.bin",  # a digit to str.isdigit, and no number to int()
        base / "abc" / "de_g\u0663" / f"{digest}.bin",  # an Arabic-Indic 3: int() reads it as 3
    ]
    for trap in traps:
        trap.parent.mkdir(parents=True, exist_ok=True)
        trap.write_bytes(bytes(BLOCK))
    os.symlink(base / "abc" / "de_g0" / "notes.txt", base / "abc" / "de_g0" / f"{'abcde' + '1' * 59}.bin")



def test_hostile_names_are_skipped_and_counted_never_fatal(make_tier, cache, plant_chain):
    """The start-up scan and sweep meet names that are not the tier's, and a stranger's tree 1500
    directories deep: no worker dies, and the blocks that are the tier's are still counted."""
    tier = make_tier()
    keys = make_keys(20)
    fill_random(cache, range(20))
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(20)))).success
    base = Path(tier.layout.base)
    tier.shutdown()
    plant_hostile_names(base)
    plant_chain(base, 1500)
    plant_chain(base / "abc" / "de_g0", 1500)
    huge_pid = Path(tier.block_path(keys[0]) + f".{HOST_TAG}.99999999999999999999.1.tmp")
    odd_pid = Path(tier.block_path(keys[1]) + f".{HOST_TAG}.\u00b2\u0663.1.tmp")  # digits to str.isdigit only
    for temp in (huge_pid, odd_pid):
        temp.write_bytes(b"x")
    budgeted = make_tier(config=TierConfig(max_bytes=8 * BLOCK))
    budgeted.drain(30)
    budgeted.drain(30)  # the evictions the scan decided on
    stats = budgeted.stats()
    assert stats.workers_restarted == 0
    assert stats.foreign_entries > 0
    assert stats.bytes_counted == 8 * BLOCK
    assert sum(os.path.exists(budgeted.block_path(k)) for k in keys) == 8
    huge_pid.unlink()
    odd_pid.unlink()


@pytest.mark.parametrize("engine", ["processes"])
def test_a_key_too_long_for_a_file_name_is_refused_everywhere_and_changes_nothing(make_tier, tmp_path):
    tier = make_tier()
    longest = make_keys(1, hash_bytes=MAX_KEY_BYTES - 4)[0]
    assert len(longest) == MAX_KEY_BYTES
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=[longest], block_ids=[0])).success
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=[longest], block_ids=[1])).success
    too_long = longest + b"\0"
    for call in (
        lambda: tier.submit_store(JobMetadata(job_id=3, keys=[too_long], block_ids=[0])),
        lambda: tier.lookup(too_long),
        lambda: tier.lookup_many([make_keys(1)[0], too_long]),
        lambda: tier.touch([too_long]),
    ):
        with pytest.raises(ValueError, match=f"{MAX_KEY_BYTES}"):
            call()
    assert tier.lookup_many([longest]) == [True]
    tier.drain(30)  # no probe was left waiting by the refused lookup_many
    assert tier.stats().jobs_active == 0


LONG_HOSTNAME = textwrap.dedent(
    """
    import socket, sys
    socket.sethostname("n" * 64)  # the longest a host name can be, in this UTS namespace only
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    from mp_tier.layout import HOST_TAG, MAX_KEY_BYTES
    with PrimaryCache.create(4, 4096) as cache, FileSystemTierManager(
        primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1
    ) as tier:
        key = bytes(range(MAX_KEY_BYTES - 4)) + bytes(4)
        tier.submit_store(JobMetadata(job_id=1, keys=[key], block_ids=[0]))
        tier.drain(30)
        result = tier.get_finished()[0]
        assert result.success, result.error
        print(socket.gethostname())
    """
)


def test_the_longest_key_stores_whatever_the_host_name(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    done = subprocess.run(["unshare", "-u", sys.executable, "-c", LONG_HOSTNAME, str(tmp_path)], capture_output=True, text=True, timeout=60)
    if done.returncode and "Operation not permitted" in done.stderr:
        pytest.skip(f"no UTS namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "n" * 64
