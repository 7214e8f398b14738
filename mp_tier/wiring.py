"""Building a tier's parts from its settings (the memory, the namespace, the I/O mode, the workers), and
taking them down at its end.

Every step that can fail runs here, before the tier exists; a failure
closes whatever fds the steps before it opened and starts no worker that
outlives it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from . import block_io, fs_support, stdio
from .capacity import CapacityIndex
from .channels import close_listed
from .config import FILE_MODES, THREAD_NAMES, TierConfig, with_settings
from .coordinator import Coordinator
from .host_root import HostRoot
from .layout import BlockLayout, namespace_name
from .memory import buffer_address
from .namespace import describe_run, identity, owners_for, prepare_namespace
from .placement import Placement
from .pool import WorkerPool
from .residency import Residency
from .shared_cache import primary_memory
from .worker import WorkerSpec
from .worker_process import cpus_refused, policy_refused

log = logging.getLogger(__name__)


class Parts(NamedTuple):
    core: Coordinator
    layout: BlockLayout  # where blocks live: fixed for the tier's life
    direct: bool  # O_DIRECT in use
    num_blocks: int
    block_bytes: int
    release: Callable[[], None]  # lets go of the cache at the tier's end
    fds: list[int]  # the tier's to close at its end: the namespace, the cache's file, the wake pipe
    wake: tuple[int, int]  # rung when a result is made outside a pump


# The fds of each tier being built, from its first fd until the tier is listed for its own fork handler
# (``built``): a child forked meanwhile (a build starts the workers, which takes a while) closes them at once.
_building: dict[int, list[int]] = {}


def _close_in_child() -> None:
    for fds in _building.values():
        close_listed(fds)
    _building.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _abandon(fds: list[int]) -> None:
    close_listed(fds)
    del _building[id(fds)]


def built(parts: Parts) -> None:
    """The tier of ``parts`` is listed for its own fork handler now, which closes ``parts.fds`` in a child."""
    del _building[id(parts.fds)]


def configured(config: TierConfig | None, **arguments: Any) -> TierConfig:
    """``config`` (or the defaults) with the constructor's arguments that are not None put over it, each checked
    under the name the caller wrote (``n_read_threads``, vLLM's, is ``n_read_workers``)."""
    given = {name: value for name, value in arguments.items() if value is not None}
    config = with_settings(config or TierConfig(), given, THREAD_NAMES, "FileSystemTierManager", "vLLM's")
    if not config.root_dir:
        raise ValueError("root_dir is required (argument or TierConfig.root_dir)")
    return config


def build(config: TierConfig, primary_kv_view: Any, offloading_spec: Any, namespace: str | None) -> Parts:
    """Every part of a tier, its workers started; raises (leaving nothing open) if any part cannot be made.

    ``namespace`` names the namespace directory under ``root_dir``; by default
    the name describes the run (block size, and model and layout from
    ``offloading_spec``).
    """
    fds: list[int] = []
    _building[id(fds)] = fds
    try:
        held = stdio.hold(fds)  # until the fds the workers are passed are made
        primary = primary_memory(primary_kv_view, processes=config.engine == "processes")
        if primary.region:
            fds.append(primary.region.fd)
        capacity = CapacityIndex(primary.block_bytes, config.max_bytes, evict=config.eviction == "lru")
        modes = FILE_MODES[config.file_mode]
        owners = owners_for(config.file_mode == "group")
        if namespace is None:
            run, rank = describe_run(primary.block_bytes, offloading_spec)
            namespace = namespace_name(run, rank)
        else:
            run = {"block_bytes": primary.block_bytes}  # the name already says the rest
        layout, root = prepare_namespace(config.root_dir, namespace, run, modes, owners)
        fds.append(root)
        direct = choose_direct(config.o_direct, primary.block_bytes, buffer_address(primary.view), root, layout.base)
        if config.checksum and (why_not := fs_support.probe_xattr(root)):
            raise ValueError(f"checksum = true needs user xattrs under {layout.base}: {why_not}")
        if unknown := sorted(set(config.worker_cpus) - os.sched_getaffinity(0)):
            raise ValueError(f"worker_cpus {unknown} are not CPUs this process may run on ({sorted(os.sched_getaffinity(0))})")
        if config.engine == "processes" and (why := policy_refused(config.worker_sched)):
            raise ValueError(f"worker_sched = {config.worker_sched!r} is refused here: {why}")
        if config.engine == "processes" and (why := cpus_refused(config.worker_cpus)):
            raise ValueError(f"worker_cpus = {config.worker_cpus} is refused here: {why}")
        placement = Placement(os.sched_getaffinity(0) if config.engine == "processes" and not config.worker_cpus else set())
        wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fds.extend(wake)
        specs = [
            WorkerSpec(
                index,
                index < config.n_read_workers,
                layout,
                primary.block_bytes,
                direct,
                *modes,
                config.checksum,
                touch_on_use=config.max_bytes > 0,
                owners=owners,
                nice=config.worker_nice,
                cpus=tuple(config.worker_cpus),
                sched=config.worker_sched,
                io_depth=config.io_depth if config.engine == "processes" else 1,
                run=run,
            )
            for index in range(config.n_read_workers + config.n_write_workers)
        ]
        pool = WorkerPool(specs, root, primary.region, primary.view, config.engine, placement)
        for fd in held:
            fds.remove(fd)
            os.close(fd)
    except BaseException:
        _abandon(fds)
        raise
    try:
        for index in range(len(specs)):
            pool.start(index)
    except BaseException:
        pool.stop(1.0, lambda completion: None)
        pool.close()
        _abandon(fds)
        pool.once_let_go(primary.release)  # a thread that ended leaves the view in a cycle (its closures) for gc
        raise
    core = Coordinator(pool, Residency(capacity, config.events, identity(root)), HostRoot(root, layout, owners, primary.block_bytes), config)
    log.debug("tier up: %s, %d+%d %s, direct=%s", layout.base, config.n_read_workers, config.n_write_workers, config.engine, direct)
    return Parts(core, layout, direct, primary.num_blocks, primary.block_bytes, primary.release, fds, wake)


def teardown(parts: Parts, lock: threading.RLock, stop_timeout: float, pid: int) -> None:
    """A tier's end, run once: by shutdown(), when the tier broke, or as the finalizer of a tier dropped (or
    left at interpreter exit) without shutdown. Stops the workers, sweeps, closes the tier's fds.

    It takes the tier's lock, so a thread still using the tier at interpreter exit is never cut off inside
    a call; a thread that holds the lock past ``stop_timeout`` does not hold up the exit.
    """
    if os.getpid() != pid:
        return
    core = parts.core
    locked = lock.acquire(timeout=stop_timeout)
    try:
        core.shutdown(stop_timeout)
    finally:
        if locked:
            lock.release()
    core.sweep_leftovers()  # file-system work: outside the lock (calls meanwhile find the tier stopped)
    close_listed(parts.fds)  # a child forked meanwhile closes those still listed (the tier's _abandon_in_child)
    core.pool.once_let_go(parts.release)  # once a worker thread left on a hung mount has ended too
    log.debug("tier down: %s", parts.layout.base)


def choose_direct(mode: str, block_bytes: int, address: int, root: int, base: str) -> bool:
    """Whether to use O_DIRECT: ``on`` demands it, ``off`` refuses it, ``auto`` uses it where a probe works."""
    if mode == "off":
        return False
    why_not: str | None
    if block_bytes % block_io.DIRECT_ALIGN:
        why_not = f"block_bytes {block_bytes} is not a multiple of {block_io.DIRECT_ALIGN}"
    elif address % block_io.DIRECT_ALIGN:
        why_not = f"the cache's memory starts at {address:#x}, not on a {block_io.DIRECT_ALIGN}-byte boundary"
    else:
        why_not = fs_support.probe_direct(root)
    if why_not is None:
        return True
    if mode == "on":
        raise ValueError(f"o_direct = 'on' but O_DIRECT is unusable under {base}: {why_not}")
    log.warning("O_DIRECT unusable under %s (%s); using buffered I/O", base, why_not)
    return False
