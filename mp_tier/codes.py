"""Every error code a ``JobResult`` can carry, and what each one means.

A code is an errno name, so callers branch on it and never parse the message.
The tier makes the first group itself; the second comes from the operating
system, through a worker, for one block (the list names those the tier
documents; any other errno name passes through the same way). A ``Literal``,
not an enum: the codes stay plain strings on the wire and in ``JobResult``,
and mypy still rejects a misspelt one where the tier names a code.
"""

from __future__ import annotations

from typing import Literal, get_args

# Codes the tier itself gives a job.
TierCode = Literal["EAGAIN", "EBUSY", "ENOSPC", "ECANCELED", "EOWNERDEAD", "ETIMEDOUT", "ENOTRECOVERABLE", "EIO", "EMFILE", "ENFILE", "ENOMEM"]
# Codes the file system gives a block, passed through.
OsCode = Literal["ENOENT", "EBADMSG", "ELOOP", "ENOTDIR", "EINVAL", "ENXIO", "EEXIST", "EACCES", "EPERM", "ESTALE", "EDQUOT"]
ErrorCode = Literal[TierCode, OsCode]

MEANINGS: dict[ErrorCode, str] = {
    "EAGAIN": "refused at submit: max_queued_tasks tasks already wait on the host; submit again later; or no worker could be spawned"
    " for start_timeout because a process limit (RLIMIT_NPROC) was reached",
    "EBUSY": "refused at submit: a block of the store is still being evicted; store it again later",
    "ENOSPC": "refused at submit: the store does not fit max_bytes (eviction off, or too few unpinned blocks); or the disk is full",
    "ECANCELED": "shutdown() came before the task ran, or before its worker finished it",
    "EOWNERDEAD": "the task was lost twice to a worker's death (the error names the worker, its pid and signal)",
    "ETIMEDOUT": "the task's worker held it past task_timeout twice and was killed each time",
    "ENOTRECOVERABLE": "the tier broke (workers kept dying as they started); every job in flight fails with this",
    "EIO": "the file system said EIO, or a worker met an error that is not an OSError (its type is in the message)",
    "EMFILE": "no worker could be spawned for start_timeout: this process is out of file descriptors (ulimit -n)",
    "ENFILE": "no worker could be spawned for start_timeout: the system is out of file descriptors",
    "ENOMEM": "no worker could be spawned for start_timeout: out of memory",
    "ENOENT": "a load found no block file (never stored, evicted, or deleted by another instance): a miss",
    "EBADMSG": "a block file of the wrong size or checksum; it was removed",
    "ELOOP": "a symlink where a block or its directory should be; nothing outside the root is touched",
    "ENOTDIR": "a non-directory where a block's directory should be",
    "EINVAL": "a FIFO, directory or device at a block path; the entry is left for an operator",
    "ENXIO": "a socket at a block path",
    "EEXIST": "a store found something that is not a block file at its path, and did not claim success",
    "EACCES": "the tier may not read or write that path (another user's file or directory)",
    "EPERM": "the file system refused the operation (an immutable file, a directory another user made read-only)",
    "ESTALE": "a shared file system's handle went stale: another node replaced or removed the file; or the namespace directory"
    " was moved away while a store ran, after some of its blocks were written (or twice while one of its tasks ran)",
    "EDQUOT": "the user's disk quota is used up",
}

CODES: tuple[ErrorCode, ...] = (*get_args(TierCode), *get_args(OsCode))
