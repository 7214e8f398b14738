"""Channel framing over in-process pipes: frames round-trip, an overflow holds order, results reassemble."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import msgspec
import pytest

from mp_tier.channels import (
    FRAME_BYTES,
    PIPE_BUF,
    EndOfTasks,
    ResultReader,
    TaskPipe,
    WorkerEnds,
    decode_frame,
    encode_frames,
    make_pipe,
    send_completion,
    take_task,
    waiting_bytes,
)
from mp_tier.layout import BlockLayout
from mp_tier.messages import Completion, Op, Task
from mp_tier.namespace import Owners
from mp_tier.slots import Slots
from mp_tier.worker import WorkerSpec, run_worker


def task(seq: int, blocks: int = 2) -> Task:
    return Task(seq, Op.STORE, list(range(blocks)), [bytes([seq % 256]) * 36] * blocks, [])


def test_frames_are_fixed_size_and_round_trip():
    tasks = [task(0), task(1, 20), Task(2, Op.SCAN, [], [])]
    frames = encode_frames(tasks)
    assert len(frames) == 3 * FRAME_BYTES
    assert [decode_frame(bytes(frames[i : i + FRAME_BYTES])) for i in range(0, len(frames), FRAME_BYTES)] == tasks


def test_a_task_over_one_frame_is_refused():
    with pytest.raises(ValueError, match="over the 1024-byte frame"):
        encode_frames([task(0, 30)])


@pytest.fixture
def pipe():
    p = TaskPipe()
    yield p
    p.close()


def test_a_pipe_hands_out_one_task_per_read_and_ends(pipe):
    pipe.put(encode_frames([task(0), task(1)]))
    assert take_task(pipe.read_fd) == task(0) and take_task(pipe.read_fd) == task(1)
    assert take_task(pipe.read_fd) is None
    pipe.close_writer()
    with pytest.raises(EndOfTasks):
        take_task(pipe.read_fd)


def test_paused_frames_wait_on_the_host_in_order_and_reclaim_takes_them_all(pipe):
    pipe.put(encode_frames([task(0)]))
    pipe.paused = True
    pipe.put(encode_frames([task(s) for s in range(1, 9)]))
    pipe.put_front([task(99)])
    assert pipe.backlog == 9 and take_task(pipe.read_fd) == task(0) and take_task(pipe.read_fd) is None
    pipe.paused = False
    pipe.flush()
    assert pipe.backlog == 0
    assert [take_task(pipe.read_fd) for _ in range(9)] == [task(99), *(task(s) for s in range(1, 9))]
    pipe.paused = True
    pipe.put(encode_frames([task(10)]))
    pipe.paused = False
    pipe.put(encode_frames([task(11)]))
    assert pipe.reclaim() == [task(10), task(11)] and pipe.backlog == 0


def probe(seq: int) -> Task:
    return Task(seq, Op.PROBE, [], [bytes([seq % 256]) * 36])


def test_the_host_side_backlog_counts_its_probes_as_they_come_and_go(pipe):
    pipe.paused = True
    pipe.put(encode_frames([probe(s) for s in range(6)]), probes=True)
    pipe.put(encode_frames([task(s) for s in range(6, 9)]))
    pipe.put_front([task(20), probe(21), task(22), probe(23), probe(24)])  # a retry of several kinds
    assert (pipe.backlog, pipe.probes) == (14, 9)
    pipe.paused = False
    pipe.flush()
    assert (pipe.backlog, pipe.probes) == (0, 0)
    order = [take_task(pipe.read_fd) for _ in range(14)]
    assert [t.seq for t in order if t is not None] == [20, 21, 22, 23, 24, *range(9)]
    pipe.paused = True
    pipe.put(encode_frames([probe(30)]), probes=True)
    assert pipe.probes == 1 and len(pipe.reclaim()) == 1 and pipe.probes == 0


def test_a_full_pipe_overflows_without_blocking_and_drains_in_order(pipe):
    jobs = [encode_frames([task(s)]) for s in range(4096)]
    for frames in jobs:
        pipe.put(frames)
    assert pipe.backlog > 0, "the pipe filled"
    got = []
    while pipe.backlog or (t := take_task(pipe.read_fd)) is not None:
        if pipe.backlog:
            got.append(take_task(pipe.read_fd))
            pipe.flush()
        else:
            got.append(t)
    got.extend(iter(lambda: take_task(pipe.read_fd), None))
    assert [t.seq for t in got] == list(range(4096))


def test_completions_reassemble_from_partial_writes():
    reader = ResultReader()
    try:
        first = Completion(seq=1, worker=0, nbytes=10, failed=[])
        second = Completion(seq=2, worker=1, nbytes=0, failed=[0], error="ENOENT: no such block", code="ENOENT", found=[b"k" * 36])
        send_completion(reader.write_fd, first)
        payload = msgspec.msgpack.encode(second)
        message = len(payload).to_bytes(4, "big") + payload
        os.write(reader.write_fd, message[:3])
        assert reader.read() == [first]
        os.write(reader.write_fd, message[3:10])
        assert reader.read() == []
        os.write(reader.write_fd, message[10:])
        assert reader.read() == [second]
    finally:
        reader.close()


def test_a_completion_over_pipe_buf_is_refused():
    reader = ResultReader()
    try:
        with pytest.raises(ValueError, match="exceeds PIPE_BUF"):
            send_completion(reader.write_fd, Completion(seq=1, worker=0, nbytes=0, failed=[], found=[bytes(64)] * 100))
        assert reader.read() == []
    finally:
        reader.close()


def fill(fd: int) -> int:
    """Fill the pipe whose write end is ``fd``; returns how many bytes that took."""
    filled = 0
    while True:
        try:
            filled += os.write(fd, bytes(PIPE_BUF))
        except BlockingIOError:
            return filled


def sender(fd: int, given_up: int | None = None) -> tuple[threading.Thread, list[BaseException]]:
    """A thread sending one completion into ``fd``, waiting in poll for room (started and there on return),
    and what it raised."""
    raised: list[BaseException] = []
    watching = () if given_up is None else (given_up,)

    def send() -> None:
        try:
            send_completion(fd, Completion(seq=1, worker=0, nbytes=0, failed=[]), *watching)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(f"/proc/self/task/{thread.native_id}/syscall") as f:
                if f.read().split()[0] in ("7", "271"):  # poll, ppoll
                    return thread, raised
        except FileNotFoundError:
            thread.join()  # it ended
        assert thread.is_alive() and time.monotonic() < deadline, f"the sender never waited for room: {raised}"


def test_a_worker_thread_given_up_sends_nothing_and_one_waiting_for_room_ends():
    """Once ``given_up`` is readable (the tier shut down and left the thread running), a send waiting for room
    in a full result pipe that nobody reads any more ends with EPIPE, and a later one writes nothing."""
    reader = ResultReader()
    given_up = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        filled = fill(reader.write_fd)
        thread, raised = sender(reader.write_fd, given_up)
        os.eventfd_write(given_up, 1)
        thread.join(5)
        assert not thread.is_alive(), "the sender still waits on the full pipe"
        assert [type(e) for e in raised] == [BrokenPipeError]
        os.read(reader.read_fd, filled)
        with pytest.raises(BrokenPipeError, match="nobody reads"):
            send_completion(reader.write_fd, Completion(seq=2, worker=0, nbytes=0, failed=[]), given_up)
        assert waiting_bytes(reader.read_fd) == 0
    finally:
        reader.close()
        os.close(given_up)


def test_a_send_waits_for_room_in_a_pipe_numbered_past_1023():
    """A busy host's fds (a worker thread's result pipe, inherited numbers in a worker process) can be numbered
    past select()'s 1023: the wait for room works there too (it raised ValueError)."""
    reader = ResultReader()
    high = fcntl.fcntl(reader.write_fd, fcntl.F_DUPFD_CLOEXEC, 1024)
    try:
        filled = fill(high)
        thread, raised = sender(high)
        os.read(reader.read_fd, filled)
        thread.join(5)
        assert not thread.is_alive() and raised == []
        assert reader.read() == [Completion(seq=1, worker=0, nbytes=0, failed=[])]
    finally:
        os.close(high)
        reader.close()


def test_a_worker_thread_given_up_takes_no_task_from_its_pipe(tmp_path):
    """A worker thread left at shutdown that finishes its task before the pool has closed may find more tasks
    in the pipes (a tier broken while they were queued: those jobs fail without them): once ``given_up`` is
    readable it ends before taking one (EPIPE), where it used to take and do it, then fail to report it."""
    loads, stores, results = TaskPipe(), TaskPipe(), ResultReader()
    bell = make_pipe()
    slots = Slots(1)
    root = os.open(tmp_path, os.O_DIRECTORY | os.O_CLOEXEC)
    given_up = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    layout = BlockLayout(str(tmp_path))
    spec = WorkerSpec(0, True, layout, 4096, False, 0o600, 0o700, False, False, Owners(os.getuid()))
    try:
        loads.put(encode_frames([Task(seq=1, op=Op.PROBE, block_ids=[], keys=[bytes(36)])]), probes=True)
        os.eventfd_write(given_up, 1)
        ends = WorkerEnds(loads.read_fd, stores.read_fd, *bell, results.write_fd)
        with pytest.raises(BrokenPipeError, match="nobody reads"):
            run_worker(spec, root, memoryview(bytearray(4096)), ends, slots, given_up=given_up)
        assert waiting_bytes(loads.read_fd) == FRAME_BYTES, "the task was taken from the pipe"
        assert results.read() == []
    finally:
        for closing in (loads, stores, results, slots):
            closing.close()
        for fd in (*bell, root, given_up):
            os.close(fd)


def test_a_worker_thread_given_up_in_a_tasks_namespace_check_moves_no_block(tmp_path):
    """A worker thread held up at the start of a task (the namespace check, the first call of a task to reach a
    hung mount) while the tier shuts down and gives up on it: once it goes on, it ends before the task's first
    block (EPIPE). It used to do that block (here: store it) before finding nobody reads its completion."""
    loads, stores, results = TaskPipe(), TaskPipe(), ResultReader()
    bell = make_pipe()
    slots = Slots(1)
    root = os.open(tmp_path, os.O_DIRECTORY | os.O_CLOEXEC)
    given_up = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    spec = WorkerSpec(0, True, BlockLayout(str(tmp_path)), 4096, False, 0o600, 0o700, False, False, Owners(os.getuid()))

    def shut_down_meanwhile(task: Task, named: bool) -> None:  # the task is claimed and named: the tier gives up now
        if named:
            os.eventfd_write(given_up, 1)

    try:
        stores.put(encode_frames([Task(seq=1, op=Op.STORE, block_ids=[0], keys=[bytes(36)])]))
        stores.close_writer()
        loads.close_writer()
        ends = WorkerEnds(loads.read_fd, stores.read_fd, *bell, results.write_fd)
        with pytest.raises(BrokenPipeError, match="nobody reads"):
            run_worker(spec, root, memoryview(bytearray(4096)), ends, slots, pause=shut_down_meanwhile, given_up=given_up)
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [], "the task's block was stored"
    finally:
        for closing in (loads, stores, results, slots):
            closing.close()
        for fd in (*bell, root, given_up):
            os.close(fd)
