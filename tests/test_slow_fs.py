"""A hung mount holds up only the call that waits on it: no call of the tier holds its lock across file-system I/O.

The root is on a real GlusterFS volume (tools/glusterfs_nodes.py builds it) whose FUSE client is stopped with
SIGSTOP: every file-system call that reaches the mount then waits, as on a slow or hung network file system,
until the client is continued. Skipped, with the reason, only where GlusterFS cannot run at all;
MP_TIER_GLUSTERFS=required turns the skip into a failure, for CI.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import glusterfs_nodes as gl
import pytest
from helpers import gluster_volume, make_keys

from mp_tier import FileSystemTierManager, JobMetadata

pytestmark = [pytest.mark.glusterfs, pytest.mark.timeout(120)]

CLUSTER = gl.Cluster(volume="mp_tier_slow", nodes=("host",), replica=1)
# System calls a path lookup or a stat waits in (x86-64 and the generic table's openat2), as /proc shows them
FILE_SYSCALLS = {"4", "5", "6", "257", "262", "332", "437"}


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
    """Whether ``thread`` is asleep in a path lookup or stat (not on a lock: that is a futex)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
            return f.read().split()[0] in FILE_SYSCALLS
    except (OSError, IndexError):
        return False


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
