"""Entry point of a worker process: ``python -m mp_tier.worker_process <boot record>``.

Each worker is a fresh interpreter, not a fork of the host: it imports only
this package's worker side (no numpy, never the host's ``__main__``, so a
host that imported vLLM and torch still starts a worker in tens of
milliseconds), inherits exactly the fds named in its boot record, and has no
forkserver between it and the host. It maps the primary cache through the
inherited fd, never by name.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import msgspec

from .channels import WorkerEnds
from .memory import Prefault, SharedRegion, map_region
from .messages import Op, Task
from .slots import Slots
from .worker import WorkerSpec, run_worker

# Test hook: "<boot|claim|task>:<seconds>:<marker file>". boot: every worker
# appends its pid to the marker and sleeps that long before it is ready (a
# start-up that hangs). claim, task: a worker that reads a load task writes
# its pid to the marker and sleeps that long, before naming the task (claim:
# the claim window made wide enough to kill another worker inside it) or
# after (task: a worker stuck on a task it holds).
TEST_PAUSE = "MP_TIER_TEST_PAUSE"

_POLICIES = {"batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}


def _refused(attempt: Callable[[], None]) -> str | None:
    """Why ``attempt`` fails in a short-lived thread of the host (a sandbox that forbids it), or None.

    A thread of its own: on Linux a scheduling policy and a CPU affinity belong to the thread that sets them.
    """
    refusals: list[OSError] = []

    def trial() -> None:
        try:
            attempt()
        except OSError as e:
            refusals.append(e)

    thread = threading.Thread(target=trial, name="mp_tier-refusal-check")
    thread.start()
    thread.join()
    return refusals[0].strerror if refusals else None


def policy_refused(policy: str) -> str | None:
    """Why a worker could not take scheduling ``policy`` here, or None."""
    if policy not in _POLICIES:
        return None
    return _refused(lambda: os.sched_setscheduler(0, _POLICIES[policy], os.sched_param(0)))


def cpus_refused(cpus: list[int]) -> str | None:
    """Why a worker could not keep to ``cpus`` (``worker_cpus``) here, or None."""
    return _refused(lambda: os.sched_setaffinity(0, cpus)) if cpus else None


class Boot(msgspec.Struct, array_like=True):
    """What the host passes a worker process on its command line."""

    spec: WorkerSpec
    root: int  # fd of the namespace directory
    cache: SharedRegion
    ends: WorkerEnds
    slots_fd: int
    n_workers: int
    host: int  # the host's pid: the worker's parent while the host lives


def encode_boot(boot: Boot) -> str:
    return msgspec.msgpack.encode(boot).hex()


def _test_pause() -> Callable[[Task, bool], None] | None:
    """Stall here if TEST_PAUSE says "boot"; the pause for loads if it says "claim" or "task"."""
    setting = os.environ.get(TEST_PAUSE)
    if not setting:
        return None
    where, seconds, marker = setting.split(":", 2)
    if where == "boot":
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(float(seconds))
        return None

    def pause(task: Task, named: bool) -> None:
        if task.op == Op.LOAD and named == (where == "task"):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(float(seconds))

    return pause


def _close_all_but(keep: set[int]) -> None:
    """Close what the host left open without close-on-exec (an extension's fd, say): a worker holds only its own."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own fd, closed already


def _serve(boot: Boot, view: memoryview, slots: Slots) -> None:
    """Run ``io_depth`` lanes, the calling thread as lane 0, until the host closes the task pipes.

    A lane that fails takes the whole process down at once, as a one-lane
    worker's failure always did (a lane that finds the host gone just ends,
    so its siblings' stores finish or remove their temp files): the host then settles every task the
    process named, and no lane is left serving with a claim that never ends.
    """
    pause = _test_pause()
    prefault = Prefault(view, boot.spec.block_bytes, boot.cache.fd)

    def lane(index: int) -> None:
        try:
            run_worker(boot.spec, boot.root, view, boot.ends, slots, pause, index, boot.host, prefault)
        except BrokenPipeError:
            pass  # the host is gone; nobody is left to tell. The other lanes end their blocks (no temp file left) and see it too
        except BaseException:
            traceback.print_exc()
            os._exit(1)

    others = [threading.Thread(target=lane, args=(index,), name=f"lane{index}") for index in range(1, boot.spec.io_depth)]
    for thread in others:
        thread.start()
    lane(0)
    for thread in others:
        thread.join()


def main() -> None:
    # Ctrl-C at a terminal reaches the whole process group: the host decides
    # what happens to its workers, which exit when it closes their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    boot = msgspec.msgpack.decode(bytes.fromhex(sys.argv[1]), type=Boot)
    _close_all_but({0, 1, 2, *boot.ends, boot.root, boot.cache.fd, boot.slots_fd})
    if boot.spec.nice:
        os.nice(boot.spec.nice)
    if boot.spec.cpus:
        os.sched_setaffinity(0, boot.spec.cpus)
    if boot.spec.sched != "normal":
        os.sched_setscheduler(0, _POLICIES[boot.spec.sched], os.sched_param(0))
    mapping, view = map_region(boot.cache)
    slots = Slots(boot.n_workers, boot.spec.io_depth, boot.slots_fd)
    try:
        _serve(boot, view, slots)
    finally:
        view.release()
        mapping.close()
        slots.close()
        for fd in (*boot.ends, boot.root, boot.cache.fd):
            os.close(fd)


if __name__ == "__main__":
    main()
