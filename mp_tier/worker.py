"""The worker loop: take a task, move its blocks, report a completion.

The same loop runs in a worker process (``process_main``) or a thread of the
host (``run_worker``). A read-priority worker tries the load pipe before the
store pipe and a write-priority worker the reverse; when both are empty it
sleeps in ``poll`` on both, so either kind of work wakes every idle worker and
neither kind starves.

A worker exits when the host closes both task pipes (end-of-file), which is
also what the kernel does for the host if it dies, so workers never outlive it.

Each worker names the task it holds in two slots of a small shared array:
the first for the task its loop took, the second for a load it serves in the
middle of a store (``STARTING`` until it is ready, ``IDLE`` when empty). It
marks a slot ``CLAIMING`` before it reads a task pipe and names the task right
after, so the host can always tell which tasks a dead worker held: it waits
out a live worker's claim before deciding.
"""

from __future__ import annotations

import itertools
import os
import select
from typing import Any, Callable, Iterator

import msgspec

from . import block_io
from .channels import EndOfTasks, WorkerEnds, hush, ring, send_completion, take_task, waiting_bytes
from .layout import BlockLayout
from .messages import LOAD, SCAN, STORE, SWEEP, TOUCH, Completion, Task

_MAX_ERROR_CHARS = 512
_SCAN_BATCH_BYTES = 3000  # keys per scan completion, well under PIPE_BUF with their framing
IDLE = -1
STARTING = -2
CLAIMING = -3
SLOTS_PER_WORKER = 2


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to know, fixed for the tier's lifetime."""

    index: int
    read_priority: bool
    layout: BlockLayout
    block_bytes: int
    direct: bool
    file_mode: int
    dir_mode: int
    checksum: bool
    touch_on_load: bool


def handle(
    spec: WorkerSpec, cache: memoryview, task: Task, between: Callable[[], None] | None = None
) -> Iterator[Completion]:
    """The completion of a task; a scan sends its findings in several."""
    if task.op == SCAN:
        found = spec.layout.scan()
        step = _SCAN_BATCH_BYTES // (max(map(len, found), default=1) + 2)
        for first in range(0, len(found), step):
            yield Completion(task.seq, spec.index, 0, [], found=found[first : first + step], more=True)
        yield Completion(task.seq, spec.index, 0, [])
    elif task.op == SWEEP:
        paths = [spec.layout.path(key) for key in task.keys] if task.keys else None
        yield Completion(task.seq, spec.index, 0, [], swept=block_io.remove_stale_temps(spec.layout.base, paths))
    else:
        yield per_block(spec, cache, task, between)


def per_block(spec: WorkerSpec, cache: memoryview, task: Task, between: Callable[[], None] | None) -> Completion:
    """Do ``task.op`` to every block of the task; a failed block does not stop the others.

    ``between`` runs before every block but the first: a read-priority worker
    serves loads there that arrived while it was storing.
    """
    error = None
    for key in task.evict:
        try:
            block_io.remove_block(spec.layout.path(key))
        except OSError as e:
            error = error or block_io.describe(e)[:_MAX_ERROR_CHARS]
    op = task.op
    size = spec.block_bytes
    nbytes = skipped = 0
    failed: list[int] = []
    corrupt: list[int] = []
    for i, (block_id, key) in enumerate(zip(task.block_ids or itertools.repeat(0), task.keys)):
        if between is not None and i:
            between()
        path = spec.layout.path(key)
        try:
            if op == LOAD:
                nbytes += block_io.load_block(path, cache, block_id * size, size, direct=spec.direct, checksum=spec.checksum)
                if spec.touch_on_load:
                    block_io.touch_block(path)
            elif op == STORE:
                moved = block_io.store_block(
                    path,
                    cache,
                    block_id * size,
                    size,
                    direct=spec.direct,
                    file_mode=spec.file_mode,
                    dir_mode=spec.dir_mode,
                    checksum=spec.checksum,
                )
                nbytes += moved
                skipped += moved == 0
            elif op == TOUCH:
                block_io.touch_block(path)
            elif not os.path.exists(path):  # PROBE
                failed.append(i)
        except Exception as e:  # any failure belongs to this block's result, not to the worker
            if isinstance(e, block_io.CorruptBlock):
                corrupt.append(i)
            failed.append(i)
            error = error or block_io.describe(e)[:_MAX_ERROR_CHARS]
    return Completion(task.seq, spec.index, nbytes, failed, error, skipped, corrupt)


def run_worker(spec: WorkerSpec, cache: memoryview, ends: WorkerEnds, slots: Any) -> None:
    """Serve tasks until the host closes both task pipes."""
    main = SLOTS_PER_WORKER * spec.index
    nested = main + 1
    slots[nested] = IDLE
    slots[main] = IDLE

    def claim(fd: int, slot: int) -> Task | None:
        slots[slot] = CLAIMING
        try:
            task = take_task(fd)
        finally:
            slots[slot] = IDLE
        if task is not None:
            slots[slot] = task.seq
        return task

    def run(task: Task, slot: int) -> None:
        between = loads_first if spec.read_priority and task.op == STORE else None
        for completion in handle(spec, cache, task, between):
            send_completion(ends.results, completion)
        slots[slot] = IDLE

    def loads_first() -> None:
        """Inside a store task: a load that arrives waits one block, not the whole task."""
        try:
            while waiting_bytes(ends.loads) and (task := claim(ends.loads, nested)) is not None:
                run(task, nested)
        except EndOfTasks:
            pass  # the main loop sees it too

    order = [ends.loads, ends.stores] if spec.read_priority else [ends.stores, ends.loads]
    sleeper = select.epoll()
    for fd in (*order, ends.bell_read):
        sleeper.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    try:
        while order:
            task = None
            for fd in order:
                try:
                    task = claim(fd, main)
                except EndOfTasks:
                    order.remove(fd)
                    sleeper.unregister(fd)
                    ring(ends.bell_write)  # pass the news on: one sleeper woke for it
                    break
                if task is not None:
                    break
            if task is None:
                if order:
                    sleeper.poll()
                    hush(ends.bell_read)
                continue
            if any(waiting_bytes(fd) for fd in order):
                ring(ends.bell_write)
            run(task, main)
    finally:
        sleeper.close()


def process_main(spec: WorkerSpec, cache_name: str, num_blocks: int, ends: WorkerEnds, slots: Any) -> None:
    """Entry point of a worker process: attach to the cache, then serve."""
    from .shared_cache import PrimaryCache

    cache = PrimaryCache.attach(cache_name, num_blocks, spec.block_bytes)
    try:
        run_worker(spec, cache.view, ends, slots)
    except BrokenPipeError:
        pass  # the host is gone; nobody is left to tell
    finally:
        cache.close()
        for fd in ends:
            os.close(fd)
