"""The worker loop: take a task, move its blocks, report a completion.

The same loop runs in a worker process (``worker_process``), once per lane
(``io_depth`` threads, so one process keeps several blocks in flight), or in
a thread of the host (the ``threads`` engine, one lane). A read-priority worker tries the load pipe
before the store pipe and a write-priority worker the reverse; when both are
empty it sleeps in epoll on both (EPOLLEXCLUSIVE, so a write wakes one
worker, not all), and neither kind of work starves.

A worker exits when the host closes both task pipes (end-of-file), which is
also what the kernel does for the host if it dies, so workers never outlive it;
a worker process whose host dies mid-task ends after the block it is on.

Every task a worker takes is named in its slot (``slots``) from the moment
it leaves the pipe until its completion is written, so the host can always
tell which tasks a dead worker held.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable, Iterator

import msgspec

from . import _block_calls, block_io, housekeeping
from .channels import EndOfTasks, WorkerEnds, gave_up, hush, readable, ring, send_completion, take_task, waiting_bytes
from .layout import BlockLayout
from .memory import Prefault
from .messages import Completion, Op, Task
from .namespace import Owners, held, renew
from .slots import CLAIMING, IDLE, MAIN, NESTED, Slots

_MAX_ERROR_CHARS = 512
_SCAN_BATCH_BYTES = 3000  # keys per scan completion, well under PIPE_BUF with their framing
_PLACING = frozenset({Op.STORE, Op.PROBE})  # ops whose completion says which blocks are at their paths


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
    touch_on_use: bool  # a load, or a store that finds the block whole, sets its mtime: the LRU order a restart reads
    owners: Owners
    nice: int = 0  # added to a worker process's niceness: the host keeps its CPU
    cpus: tuple[int, ...] = ()  # the CPUs a worker process may run on (empty: any)
    sched: str = "normal"  # a worker process's scheduling policy: batch and idle never preempt the host on wake-up
    io_depth: int = 1  # lanes of a worker process: tasks it serves at once, so the disk sees several I/Os in flight
    run: dict[str, str | int] = {}  # the run config.json records, to make the namespace again if it is removed


def handle(
    spec: WorkerSpec,
    root: int,
    cache: memoryview,
    task: Task,
    between: Callable[[], None] | None = None,
    prefault: Prefault | None = None,
) -> Iterator[Completion]:
    """The completion of a task; a scan sends its findings in several.

    A scan or sweep that fails (the namespace changed under it) ends with its
    error in the completion: what a stranger left in the namespace never
    takes a worker down.
    """
    if task.op not in (Op.SCAN, Op.SWEEP):
        yield per_block(spec, root, cache, task, between, prefault)
        return
    try:
        if task.op == Op.SCAN:
            found, foreign = housekeeping.scan_blocks(root, spec.owners)
            step = _SCAN_BATCH_BYTES // (max(map(len, found), default=1) + 2)
            for first in range(0, len(found), step):
                yield Completion(task.seq, spec.index, 0, [], found=found[first : first + step], more=True)
            yield Completion(task.seq, spec.index, 0, [], foreign=foreign)
        else:
            beside = [spec.layout.locate(key) for key in task.keys] if task.keys else None
            swept, foreign = housekeeping.remove_stale_temps(root, beside)
            yield Completion(task.seq, spec.index, 0, [], swept=swept, foreign=foreign)
    except Exception as e:
        code, error = block_io.describe(e)
        yield Completion(task.seq, spec.index, 0, [], error[:_MAX_ERROR_CHARS], code)


def in_namespace(spec: WorkerSpec, root: int, task: Task, completions: Callable[[], Iterator[Completion]]) -> Iterator[Completion]:
    """The task's completions, done in the namespace directory as it is now.

    One removed or replaced since the last task is made (or checked) again
    first, as at start, and the first completion names it; if that fails, the
    task fails with why, and nothing lands in the old directory. A store or a
    probe says where blocks are, so it is checked again when it ends: moved
    meanwhile (an operator's ``mv``, or another lane that made it again),
    some blocks went to the old directory, and the task is done once more in
    the one now at the path (its bytes are still in the cache). Moved again
    by then, the task fails (ESTALE).
    """
    base = spec.layout.base

    def again() -> tuple[tuple[int, int], bool]:
        return renew(root, base, spec.run, (spec.file_mode, spec.dir_mode), spec.owners)

    try:
        now, made = again()
    except (OSError, ValueError) as e:
        yield _failed(spec, task, e, list(range(len(task.evict))))
        return
    if task.op not in _PLACING:
        for completion in completions():
            completion.namespace, made = now if made else None, False
            yield completion
        return
    [completion] = completions()
    try:
        if held(root, base) != now:
            now, made = again()[0], True
            [completion] = completions()
            if held(root, base) != now:
                raise OSError(errno.ESTALE, "the namespace directory was replaced twice while the task ran: its blocks are not at their paths", base)
    except (OSError, ValueError) as e:
        completion = _failed(spec, task, e, completion.kept)
    completion.namespace = now if made else None
    yield completion


def _failed(spec: WorkerSpec, task: Task, e: Exception, kept: list[int]) -> Completion:
    """Every block of ``task`` failed for ``e``; ``kept``: the victims whose files may remain."""
    code, error = block_io.describe(e)
    return Completion(task.seq, spec.index, 0, list(range(len(task.keys))), error[:_MAX_ERROR_CHARS], code, kept=kept)


def per_block(
    spec: WorkerSpec, root: int, cache: memoryview, task: Task, between: Callable[[], None] | None, prefault: Prefault | None
) -> Completion:
    """Do ``task.op`` to every block of the task; a failed block does not stop the others.

    ``between`` runs before every block but the first: a read-priority worker
    serves loads there that arrived while it was storing. ``prefault`` maps a
    block's cache pages once its bytes are about to move (a worker process's
    own mapping): a load that misses or a store skipped maps none.
    """
    error = code = None
    kept: list[int] = []
    for i, key in enumerate(task.evict):
        path = spec.layout.locate(key)
        try:
            block_io.remove_block(root, path)
        except OSError as e:
            if error is None:
                code, error = block_io.describe(e)
            if block_io.may_remain(root, path, spec.owners):
                kept.append(i)
    op = task.op
    size = spec.block_bytes
    nbytes = skipped = 0
    failed: list[int] = []
    corrupt: list[int] = []
    missing: list[int] = []
    present: list[int] = []
    ids = task.block_ids or [0] * len(task.keys)
    batched = op == Op.LOAD and not spec.checksum
    hooks = prefault.hooks(ids) if batched and prefault is not None else None
    i = failed_io = 0
    while i < len(task.keys):
        if batched:  # the usual blocks in one C call; it stops at, and has run ``between`` for, one it leaves here
            done, failed_io = _block_calls.load_run(
                root, task.keys, ids, cache, size, spec.direct, spec.owners.uid, spec.owners.gids, spec.touch_on_use, between, hooks, i
            )
            nbytes += (done - i) * size
            if done == len(task.keys):
                break
            i = done
        elif between is not None and i:
            between()
        block_id, key = ids[i], task.keys[i]
        path = spec.layout.locate(key)
        ready = None if prefault is None else prefault.hook(block_id)
        try:
            if failed_io:  # its read in the run, or the touch after it, failed: not read again (on a failing disk, seconds)
                raise OSError(failed_io, os.strerror(failed_io), path.rel)
            if op == Op.LOAD:
                moved = block_io.load_block(
                    root, path, cache, block_id * size, size, direct=spec.direct, checksum=spec.checksum, owners=spec.owners, ready=ready
                )
                if spec.touch_on_use:
                    block_io.note_use(root, path)
                nbytes += moved  # once its touch is done too: a block that failed moved nothing
            elif op == Op.STORE:
                moved = block_io.store_block(
                    root,
                    path,
                    cache,
                    block_id * size,
                    size,
                    direct=spec.direct,
                    file_mode=spec.file_mode,
                    dir_mode=spec.dir_mode,
                    checksum=spec.checksum,
                    owners=spec.owners,
                    ready=ready,
                )
                nbytes += moved
                if moved == 0:
                    skipped += 1
                    if spec.touch_on_use:
                        block_io.note_use(root, path)
            elif op == Op.TOUCH:
                block_io.touch_block(root, path)
            elif not block_io.has_block(root, path, spec.owners, size):  # PROBE
                failed.append(i)
        except Exception as e:  # any failure belongs to this block's result, not to the worker
            if isinstance(e, block_io.CorruptBlock):
                corrupt.append(i)
            elif isinstance(e, FileNotFoundError) and op == Op.LOAD:
                missing.append(i)
            elif op == Op.STORE and block_io.may_remain(root, path, spec.owners):
                present.append(i)  # a file was there before: it takes room still
            failed.append(i)
            if error is None:
                code, error = block_io.describe(e)
        i += 1
    error = error and error[:_MAX_ERROR_CHARS]
    return Completion(task.seq, spec.index, nbytes, failed, error, code, skipped, corrupt, missing, kept=kept, present=present)


def run_worker(
    spec: WorkerSpec,
    root: int,
    cache: memoryview,
    ends: WorkerEnds,
    slots: Slots,
    pause: Callable[[Task, bool], None] | None = None,
    lane: int = 0,
    host: int | None = None,
    prefault: Prefault | None = None,
    given_up: int | None = None,
) -> None:
    """Serve tasks until the host closes both task pipes, naming them in ``lane``'s slots.

    A worker process runs one of these per lane, each in its own thread with
    its own epoll; the blocking system calls release the GIL, so the lanes'
    I/O overlaps. ``pause(task, named)`` runs between reading a task and naming it
    (``named`` False) and right after naming it (True): tests hold a worker
    in the claim window, or on a task, with it. ``host``: a worker process's parent, the host; one that is no
    longer its parent has died, and the lane ends after the block it is on (BrokenPipeError, as when it
    writes a completion the host is not there to read) rather than finish the task for nobody. ``given_up``: a
    worker thread's, readable once the tier has shut down and left it running (see ``send_completion``); it
    ends the same way, after the block it is on (or before the task it would claim): the task's job has its
    ECANCELED result, and a load's next blocks would land in cache blocks the host may have reused.
    """
    me = spec.index

    def claim(fd: int, slot: int) -> Task | None:
        if given_up is not None and readable(given_up):
            raise gave_up()
        slots.set(me, slot, CLAIMING, lane)
        try:
            task = take_task(fd)
        except EndOfTasks:
            slots.set(me, slot, IDLE, lane)
            raise
        # Any other failure leaves CLAIMING: the worker dies of it, and the host counts the frame as its.
        if task is not None and pause is not None:
            pause(task, False)
        slots.set(me, slot, IDLE if task is None else task.seq, lane)
        if task is not None and pause is not None:
            pause(task, True)
        return task

    def run(task: Task, slot: int) -> None:
        between = loads_first if spec.read_priority and task.op == Op.STORE else watch
        for completion in in_namespace(spec, root, task, lambda: begin(task, between)):
            send_completion(ends.results, completion, given_up)
        slots.set(me, slot, IDLE, lane)

    def begin(task: Task, between: Callable[[], None] | None) -> Iterator[Completion]:
        """Past the namespace check, where a lane on a hung mount waits first: still served, as between blocks."""
        if watch is not None:
            watch()
        return handle(spec, root, cache, task, between, prefault)

    def still_served() -> None:
        """Between two blocks: a getppid, no I/O (a parent that died leaves its children to another); a
        worker thread's poll of ``given_up``."""
        if host is not None and os.getppid() != host:
            raise BrokenPipeError(errno.EPIPE, f"the host (pid {host}) is gone")
        if given_up is not None and readable(given_up):
            raise gave_up()

    def loads_first() -> None:
        """Inside a store task: a load that arrives waits one block, not the whole task."""
        still_served()
        try:
            while waiting_bytes(ends.loads) and (task := claim(ends.loads, NESTED)) is not None:
                run(task, NESTED)
        except EndOfTasks:
            pass  # the main loop sees it too

    watch = None if host is None and given_up is None else still_served
    order = [ends.loads, ends.stores] if spec.read_priority else [ends.stores, ends.loads]
    sleeper = select.epoll()
    for fd in (*order, ends.bell_read):
        sleeper.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    # Which task pipes have a frame, or their end, right now: one poll(2), where a read of an empty pipe
    # would cost a claim, an exception and a system call each. Asked of the pipes themselves, not of the
    # epoll, whose exclusive wake-ups tell only one sleeper.
    looker = select.poll()
    for fd in order:
        looker.register(fd, select.POLLIN)
    slots.set(me, MAIN, IDLE, lane)  # lane 0: the worker is ready
    try:
        while order:
            task = None
            have = {fd for fd, _ in looker.poll(0)}
            for fd in order:
                if fd not in have:
                    continue
                try:
                    task = claim(fd, MAIN)
                except EndOfTasks:
                    order.remove(fd)
                    sleeper.unregister(fd)
                    looker.unregister(fd)
                    ring(ends.bell_write)  # pass the news on: one sleeper woke for it
                    break
                if task is not None:
                    break
            if task is None:
                if order and any(fd == ends.bell_read for fd, _ in sleeper.poll()):
                    hush(ends.bell_read)
                continue
            if looker.poll(0):
                ring(ends.bell_write)
            run(task, MAIN)
    finally:
        sleeper.close()
