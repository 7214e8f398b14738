"""The wire schema between the coordinator and its workers.

Both messages are msgpack-encoded ``array_like`` Structs: positional fields
keep a 16-block task near 800 bytes, so a task fits one fixed-size frame on
the task pipe and a completion stays far below PIPE_BUF on the result pipe.
"""

from __future__ import annotations

import enum

import msgspec


class Op(enum.IntEnum):
    """What a task asks of a worker."""

    LOAD = 0  # read ``keys``' blocks into cache blocks ``block_ids``
    STORE = 1  # write cache blocks ``block_ids`` as ``keys``' blocks (after deleting ``evict``)
    SWEEP = 2  # remove temp files that dead writers left beside ``keys`` (none: everywhere)
    SCAN = 3  # report every block on disk, oldest first, in several completions
    EVICT = 4  # only delete the ``evict`` blocks
    TOUCH = 5  # mark ``keys``' blocks used now (mtime), so recency survives a restart
    PROBE = 6  # which of ``keys`` have a block on disk


# Ops that go on the load pipe, which read-priority workers serve first: the engine waits for these.
READ_OPS = frozenset({Op.LOAD})


class Task(msgspec.Struct, array_like=True):
    """A slice of one job for one worker; ``seq`` is unique per tier instance.

    A store's ``evict`` lists blocks to delete before writing, so the budget
    holds while the task runs.
    """

    seq: int
    op: Op
    block_ids: list[int]
    keys: list[bytes]
    evict: list[bytes] = []


class Completion(msgspec.Struct, array_like=True):
    """What a worker did with one task.

    ``failed`` holds the task-relative indices of blocks that did not move
    (for a probe: that are not on disk); ``error`` is the first failure's
    message and ``code`` its errno name; ``corrupt`` the indices of blocks
    whose files were found corrupt and deleted; ``missing`` the indices of
    blocks a load found no file for; ``kept`` the indices into the task's
    ``evict`` of blocks whose files could not be deleted and are still
    there; ``present`` the indices of blocks a store failed whose name
    still holds a file (one there before: a failed store leaves it as it
    was); ``swept`` the temp files a sweep deleted; ``foreign`` the names
    a scan or sweep skipped as not the tier's. A scan sends its ``found``
    keys in several completions, all but the last with ``more``. ``namespace``
    is set when the worker found the namespace directory removed or replaced
    and made it again before the task: the new one's (device, inode).
    """

    seq: int
    worker: int
    nbytes: int
    failed: list[int]
    error: str | None = None
    code: str | None = None
    skipped: int = 0
    corrupt: list[int] = []
    missing: list[int] = []
    swept: int = 0
    foreign: int = 0
    found: list[bytes] = []
    more: bool = False
    kept: list[int] = []
    present: list[int] = []
    namespace: tuple[int, int] | None = None


task_encoder = msgspec.msgpack.Encoder()
task_decoder = msgspec.msgpack.Decoder(Task)
completion_encoder = msgspec.msgpack.Encoder()
completion_decoder = msgspec.msgpack.Decoder(Completion)
