"""The records an engine hands to the tier and gets back.

Their field names follow vLLM's offloading connector so an engine can pass its
own metadata through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec


class JobMetadata(msgspec.Struct, kw_only=True):
    """One store or load: ``keys[i]`` goes to or from cache block ``block_ids[i]``.

    Both are ordered sequences (a list, tuple, range or 1-D integer numpy
    array); a set or a dict is refused because its order is arbitrary.
    """

    job_id: int
    keys: Sequence[bytes]
    block_ids: Any  # Sequence[int] or a 1-D integer numpy array
    is_promotion: bool = False
    req_context: object = None


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    """The one outcome of a submitted job.

    ``successful_keys`` is None for a job that fully succeeded; for a failed
    job it lists, in job order, the keys whose blocks were moved intact.
    ``error_code`` is an errno name (``ENOENT``, ``ENOSPC``, ``EBADMSG`` for a
    corrupt block, ``ECANCELED`` for a job cancelled by shutdown,
    ``EOWNERDEAD`` when its worker died twice, ``ETIMEDOUT`` when a task
    outlived ``task_timeout`` twice...), for callers that branch on the cause;
    ``error`` is the same for people.
    """

    job_id: int
    success: bool
    successful_keys: tuple[bytes, ...] | None
    transfer_size: int
    transfer_time: float
    error: str | None = None
    error_code: str | None = None


class TierEvent(msgspec.Struct, frozen=True):
    """A change routers care about: blocks that were stored or removed.

    Mirrors vLLM's KV-cache events, which tell a router where prefixes live.
    """

    kind: Literal["stored", "removed"]
    keys: tuple[bytes, ...]


class TierStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters since construction, and a snapshot of the tier's state."""

    jobs_stored: int  # store jobs that fully succeeded
    jobs_loaded: int  # load jobs that fully succeeded
    jobs_failed: int  # jobs whose result says success=False (refused ones included)
    bytes_stored: int
    bytes_loaded: int
    blocks_skipped: int  # stores of blocks already on disk
    blocks_evicted: int  # blocks the byte budget chose to delete
    files_removed: int  # stale temp files swept and corrupt blocks deleted
    foreign_entries: int  # names under the namespace that are not the tier's, skipped by scans and sweeps
    workers_restarted: int
    tasks_timed_out: int  # tasks whose worker was killed for outliving task_timeout
    jobs_active: int  # submitted, result not yet produced
    bytes_counted: int  # bytes of the blocks counted against max_bytes
    blocks_seen_elsewhere: int  # blocks other instances wrote, learned by probes
    tasks_queued: int  # tasks held on the host side because a pipe was full
    workers_alive: int
    workers_starting: int  # alive but not yet serving (mapping the cache, importing)
    tasks_by_worker: tuple[int, ...]  # job tasks each worker slot completed
    spawns_failed: int  # worker spawns that failed (no fds or processes left, no interpreter) and were retried


class Counters(msgspec.Struct):
    """The counters of ``TierStats`` as the coordinator adds to them, one typed field each (not a Counter
    by key), so a misspelt counter is a type error. The rest of ``TierStats`` is read from the tier's state."""

    jobs_stored: int = 0
    jobs_loaded: int = 0
    jobs_failed: int = 0
    bytes_stored: int = 0
    bytes_loaded: int = 0
    blocks_skipped: int = 0
    files_removed: int = 0
    foreign_entries: int = 0
    workers_restarted: int = 0
    tasks_timed_out: int = 0
    spawns_failed: int = 0

    def add_job(self, store: bool, success: bool, nbytes: int) -> None:
        """A finished job: counted if it fully succeeded, its bytes whether or not."""
        if store:
            self.jobs_stored += success
            self.bytes_stored += nbytes
        else:
            self.jobs_loaded += success
            self.bytes_loaded += nbytes
