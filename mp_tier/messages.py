"""The wire schema between the coordinator and its workers.

Both messages are msgpack-encoded ``array_like`` Structs: positional fields
keep a 16-block task near 800 bytes, so a task fits one fixed-size frame on
the task pipe and a completion stays far below PIPE_BUF on the result pipe.
"""

from __future__ import annotations

import msgspec

LOAD = 0
STORE = 1
SWEEP = 2  # remove temp files that dead writers left; no blocks


class Task(msgspec.Struct, array_like=True):
    """A slice of one job for one worker; ``seq`` is unique per tier instance."""

    seq: int
    op: int
    block_ids: list[int]
    keys: list[bytes]


class Completion(msgspec.Struct, array_like=True):
    """What a worker did with one task.

    ``failed`` holds the task-relative indices of blocks that did not move;
    ``error`` is the first failure's message; ``removed`` counts files the
    task deleted (corrupt blocks, stale temp files).
    """

    seq: int
    worker: int
    nbytes: int
    failed: list[int]
    error: str | None = None
    skipped: int = 0
    removed: int = 0


task_encoder = msgspec.msgpack.Encoder()
task_decoder = msgspec.msgpack.Decoder(Task)
completion_encoder = msgspec.msgpack.Encoder()
completion_decoder = msgspec.msgpack.Decoder(Completion)
