"""The pipes between the coordinator and its workers.

Task pipes (one for loads, one for stores) carry fixed-size frames. The host
is the only writer and writes at most PIPE_BUF bytes of whole frames per
``write``, which Linux makes atomic; every reader asks for exactly one frame,
and a pipe read holds the pipe's lock while it copies, so any number of
workers can pull from one pipe without a lock of their own that a killed
worker could leave held. A frame is a 2-byte length, a msgpack ``Task`` and
zero padding.

Idle workers sleep in epoll with EPOLLEXCLUSIVE, so a write wakes one worker,
not all of them: on two cores, waking every worker for every job cost the
host ~20 µs per submit. A worker that takes a task and sees more waiting
rings the doorbell pipe, which wakes one more; so does a worker that sees
end-of-file, so that every worker learns of it.

The result pipe carries length-prefixed ``Completion`` messages. Every worker
writes whole messages smaller than PIPE_BUF, so concurrent writers never
interleave; the host reads it without blocking.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import select
import termios
from collections.abc import Sequence
from typing import NamedTuple

from .messages import Completion, Op, Task, completion_decoder, completion_encoder, task_decoder, task_encoder

FRAME_BYTES = 1024
PIPE_BUF = select.PIPE_BUF
_FRAMES_PER_WRITE = PIPE_BUF // FRAME_BYTES
TASK_HEADER = 2
_RESULT_HEADER = 4


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 16


PIPE_BYTES = min(1 << 20, _pipe_max_size())


def close_fds(*fds: int) -> None:
    """Close each fd that is not -1. Callers mark an fd closed before closing it: a child forked in between
    (by another thread, while the close let the GIL go) then keeps one copy rather than closing a number its
    parent had already freed, which failed its fork handler half way (a bad fd) and left it the rest."""
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def close_listed(fds: list[int]) -> None:
    """Close every fd of ``fds``, taking each off the list before closing it: a child forked meanwhile, whose
    fork handler closes what is still listed, then never closes a number twice (see ``close_fds``)."""
    while fds:
        close_fds(fds.pop())


def make_pipe() -> tuple[int, int]:
    """A pipe of PIPE_BYTES capacity, both ends non-blocking.

    The read end is shared by workers (one open file description), so
    O_NONBLOCK set here holds for all of them: a worker polls, then tries.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # a smaller pipe only means more host-side overflow
    return r, w


# A task's fields in Task's order: an array_like Struct encodes as the same msgpack array, and on the
# submit path a tuple is cheaper to build than a Struct.
TaskFields = tuple[int, int, list[int], list[bytes], list[bytes]]
_HEADER = bytes(TASK_HEADER)
_PADDING = bytes(FRAME_BYTES)


def encode_frames(tasks: Sequence[Task | TaskFields]) -> bytearray:
    """``tasks`` as fixed-size frames, one after another; ValueError if one does not fit its frame."""
    frames = bytearray()
    for task in tasks:
        at = len(frames)
        frames += _HEADER
        task_encoder.encode_into(task, frames, -1)  # appended in place (-1: at the end, in every msgspec version)
        size = len(frames) - at - TASK_HEADER
        if size > FRAME_BYTES - TASK_HEADER:
            raise ValueError(f"a task encodes to {size} bytes, over the {FRAME_BYTES}-byte frame")
        frames[at : at + TASK_HEADER] = size.to_bytes(TASK_HEADER, "big")
        frames += _PADDING[: FRAME_BYTES - TASK_HEADER - size]
    return frames


def decode_frame(frame: bytes) -> Task:
    size = int.from_bytes(frame[:TASK_HEADER], "big")
    return task_decoder.decode(memoryview(frame)[TASK_HEADER : TASK_HEADER + size])


class WorkerEnds(NamedTuple):
    """The pipe ends every worker gets."""

    loads: int
    stores: int
    bell_read: int
    bell_write: int
    results: int


def waiting_bytes(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), "little")


def ring(bell: int) -> None:
    """Wake one more sleeping worker (a full doorbell has rung enough)."""
    try:
        os.write(bell, b"\0")
    except BlockingIOError:
        pass


def hush(bell: int) -> None:
    """Consume the rings that woke us; the task pipes say what there is to do."""
    try:
        os.read(bell, PIPE_BUF)
    except BlockingIOError:
        pass


class EndOfTasks(Exception):
    """The host closed a task pipe: no task will ever come from it."""


def take_task(fd: int) -> Task | None:
    """One task from a task pipe, or None if it is empty right now."""
    try:
        frame = os.read(fd, FRAME_BYTES)
    except BlockingIOError:
        return None
    if not frame:
        raise EndOfTasks
    return decode_frame(frame)


class TaskPipe:
    """The host's end of one task pipe, with an overflow that never blocks.

    Frames that do not fit wait in ``_overflow`` in order and go out on the
    next ``flush``; the host flushes on every call it already makes. It
    counts the probes among them: max_queued_tasks bounds the jobs waiting
    on the host, and background probes are not jobs.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = make_pipe()
        # whole frames, at most PIPE_BUF per item, and how many of them are probes
        self._overflow: collections.deque[tuple[bytes, int]] = collections.deque()
        self.backlog = 0  # frames held on the host side
        self.probes = 0  # ... of which probes
        self.paused = False  # while a death is settled, nothing new may reach a worker

    def put(self, frames: bytearray, probes: bool = False) -> None:
        """Queue ``frames`` (``probes``: all of probe tasks) behind everything held back; a job that fits one
        atomic write goes straight in."""
        if len(frames) <= PIPE_BUF and not self._overflow and not self.paused:
            try:
                os.write(self.write_fd, frames)  # all of it or nothing: at most PIPE_BUF bytes
                return
            except BlockingIOError:
                pass
        self._hold(frames, [probes] * (len(frames) // FRAME_BYTES), front=False)

    def put_front(self, tasks: Sequence[Task]) -> None:
        """Queue ``tasks`` ahead of everything held back (tasks taken back after a death go first)."""
        self._hold(encode_frames(tasks), [task.op == Op.PROBE for task in tasks], front=True)

    def _hold(self, frames: bytearray, probe: list[bool], front: bool) -> None:
        """Hold ``frames`` on the host side (``probe[i]``: frame i is a probe's), then flush what fits."""
        step = _FRAMES_PER_WRITE
        items = [(bytes(frames[i * FRAME_BYTES : (i + step) * FRAME_BYTES]), sum(probe[i : i + step])) for i in range(0, len(probe), step)]
        if front:
            self._overflow.extendleft(reversed(items))
        else:
            self._overflow.extend(items)
        self.backlog += len(probe)
        self.probes += sum(probe)
        self.flush()

    def flush(self) -> None:
        """Move overflow into the pipe, as much as fits."""
        overflow = self._overflow
        while overflow and not self.paused:
            try:
                os.write(self.write_fd, overflow[0][0])
            except BlockingIOError:
                return
            chunk, probes = overflow.popleft()
            self.backlog -= len(chunk) // FRAME_BYTES
            self.probes -= probes

    def reclaim(self) -> list[Task]:
        """Take back every task no worker has started: the pipe's and the overflow's."""
        tasks = []
        while (task := take_task(self.read_fd)) is not None:
            tasks.append(task)
        for chunk, _ in self._overflow:
            tasks.extend(decode_frame(chunk[i : i + FRAME_BYTES]) for i in range(0, len(chunk), FRAME_BYTES))
        self._overflow.clear()
        self.backlog = self.probes = 0
        return tasks

    def close_writer(self) -> None:
        """Workers see end-of-file once the pipe is empty."""
        fd, self.write_fd = self.write_fd, -1
        close_fds(fd)

    def close(self) -> None:
        self.close_writer()
        fd, self.read_fd = self.read_fd, -1
        close_fds(fd)


def send_completion(fd: int, completion: Completion, given_up: int | None = None) -> None:
    """Write one completion whole; blocks while the host is behind.

    ``given_up`` (a worker thread's): readable once the host reads no more results (``WorkerPool.close`` left
    the thread running). BrokenPipeError then, before the write and while waiting for room, as a worker
    process gets once the host closed the pipe: a left thread never waits for ever on a full pipe nobody
    reads. Closing the read end under it instead would raise SIGPIPE, which kills a host that set it back
    to its default.
    """
    payload = completion_encoder.encode(completion)
    message = len(payload).to_bytes(_RESULT_HEADER, "big") + payload
    if len(message) > PIPE_BUF:
        raise ValueError(f"completion of {len(message)} bytes exceeds PIPE_BUF")
    view = memoryview(message)
    while view:
        if given_up is not None and readable(given_up):
            raise gave_up()
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            waiter = select.poll()  # not select(): it refuses an fd numbered past 1023, which a busy host's can be
            waiter.register(fd, select.POLLOUT)
            if given_up is not None:
                waiter.register(given_up, select.POLLIN)
            waiter.poll()  # room, or given up


def readable(fd: int) -> bool:
    """Without waiting (poll, as ``fd`` may be numbered past 1023)."""
    waiter = select.poll()
    waiter.register(fd, select.POLLIN)
    return bool(waiter.poll(0))


def gave_up() -> BrokenPipeError:
    """What a worker thread raises once the tier has given up on it (see ``send_completion``)."""
    return BrokenPipeError(errno.EPIPE, "the tier has shut down: nobody reads its results any more")


class ResultReader:
    """The host's non-blocking end of the result pipe."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = make_pipe()
        self._buf = bytearray()

    def read(self) -> list[Completion]:
        """Every completion that has arrived; never blocks."""
        buf = self._buf
        while True:
            try:
                chunk = os.read(self.read_fd, PIPE_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                break
            buf += chunk
            if len(chunk) < PIPE_BYTES:
                break
        done = []
        pos = 0
        with memoryview(buf) as view:
            while len(view) - pos >= _RESULT_HEADER:
                end = pos + _RESULT_HEADER + int.from_bytes(view[pos : pos + _RESULT_HEADER], "big")
                if end > len(view):
                    break
                done.append(completion_decoder.decode(view[pos + _RESULT_HEADER : end]))
                pos = end
        del buf[:pos]
        return done

    def close(self) -> None:
        fds = self.read_fd, self.write_fd
        self.read_fd = self.write_fd = -1
        close_fds(*fds)
