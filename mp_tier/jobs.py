"""The job records an engine hands to the tier and gets back.

Their field names follow vLLM's offloading connector so an engine can pass its
own metadata through unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec


class JobMetadata(msgspec.Struct, kw_only=True):
    """One store or load: ``keys[i]`` goes to or from cache block ``block_ids[i]``."""

    job_id: int
    keys: Sequence[bytes]
    block_ids: Any  # Sequence[int] or a 1-D integer numpy array
    is_promotion: bool = False
    req_context: object = None


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    """The one outcome of a submitted job.

    ``successful_keys`` is None for a job that fully succeeded; for a failed
    job it lists, in job order, the keys whose blocks were moved intact.
    """

    job_id: int
    success: bool
    successful_keys: tuple[bytes, ...] | None
    transfer_size: int
    transfer_time: float
    error: str | None = None


class TierEvent(msgspec.Struct, frozen=True):
    """A change routers care about: ``kind`` is "stored" or "removed".

    Mirrors vLLM's KV-cache events, which tell a router where prefixes live.
    """

    kind: str
    keys: tuple[bytes, ...]
