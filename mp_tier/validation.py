"""Checks of what callers hand the tier, with the real limits; each raises ValueError naming the bad value.

Nothing here changes state, so a refused call leaves the tier as it was.
"""

from __future__ import annotations

import collections
import math
import numbers
from collections.abc import Iterable, Mapping, Set
from typing import Any

import numpy as np

from .layout import MAX_KEY_BYTES, MIN_KEY_BYTES

# What a key is, for messages.
KEY_RULE = f"bytes of at least {MIN_KEY_BYTES} and at most {MAX_KEY_BYTES} (its hash is a hex file name that must fit NAME_MAX)"


def _ordered(what: str, value: Any) -> list[Any]:
    """``value`` as a list if it is an ordered collection; a set or a mapping has no order a job could follow.

    Lists and tuples skip the abstract-class checks: they are what engines pass, on the submit path.
    """
    if type(value) is list or type(value) is tuple:
        return list(value)
    if isinstance(value, (str, bytes, bytearray, memoryview)) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be an ordered sequence, got {value!r:.80}")
    if isinstance(value, (Set, Mapping)):
        raise ValueError(f"{what} must be an ordered sequence, not a {type(value).__name__} (its order is arbitrary)")
    return list(value)


def is_key(key: object) -> bool:
    """Whether ``key`` is one the tier can store: a key that is not names no file, so it is never on disk."""
    return type(key) is bytes and MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES


def checked_keys(keys: Any) -> list[bytes]:
    """``keys`` as a list, or ValueError naming the first that is not a key."""
    checked: list[bytes] = _ordered("keys", keys)
    if not all(map(is_key, checked)):
        bad = next(k for k in checked if not is_key(k))
        raise ValueError(f"key {bad!r:.120} is not {KEY_RULE}")
    return checked


def _block_ids(job_id: int, block_ids: Any) -> list[int]:
    if isinstance(block_ids, np.ndarray):
        if block_ids.ndim != 1 or block_ids.dtype.kind not in "iu":
            raise ValueError(f"job {job_id}: block_ids must be a 1-D integer array, got {block_ids.dtype}{block_ids.shape}")
        ids: list[int] = block_ids.tolist()  # Python ints already
        return ids
    given = _ordered(f"job {job_id}: block_ids", block_ids)
    if set(map(type, given)) <= {int}:
        return given
    ids = []
    for b in given:
        if type(b) is not int and not isinstance(b, np.integer):  # numpy's bool is no np.integer
            raise ValueError(f"job {job_id}: block id {b!r} is not an int")
        ids.append(int(b))
    return ids


def checked_job(job: Any, loading: bool, num_blocks: int) -> tuple[int, list[bytes], list[int]]:
    """The job's id, keys and block ids, checked against the cache's size and the key limits.

    Every submit runs this: the checks are set operations in C where they can be, and the slow path that
    names the bad value runs only once something is wrong.
    """
    try:
        job_id, keys, block_ids = job.job_id, job.keys, job.block_ids
    except AttributeError:
        raise ValueError(f"expected a JobMetadata, got {job!r:.120}") from None
    if isinstance(job_id, np.integer):
        job_id = int(job_id)
    if type(job_id) is not int:
        raise ValueError(f"job_id must be an int, got {job_id!r}")
    keys = list(keys) if type(keys) is list else _ordered(f"job {job_id}: keys", keys)
    ids = list(block_ids) if type(block_ids) is list and set(map(type, block_ids)) <= {int} else _block_ids(job_id, block_ids)
    if len(keys) != len(ids):
        raise ValueError(f"job {job_id}: {len(keys)} keys but {len(ids)} block_ids")
    if not keys:
        return job_id, keys, ids
    for bad in (min(ids), max(ids)):
        if not 0 <= bad < num_blocks:
            raise ValueError(f"job {job_id}: block id {bad} is out of range [0, {num_blocks})")
    if set(map(type, keys)) != {bytes}:
        bad = next(k for k in keys if type(k) is not bytes)
        raise ValueError(f"job {job_id}: key {bad!r:.120} is not bytes")
    lengths = set(map(len, keys))  # usually one length
    if min(lengths) < MIN_KEY_BYTES:
        bad = next(k for k in keys if len(k) < MIN_KEY_BYTES)
        raise ValueError(f"job {job_id}: key {bad!r} is shorter than {MIN_KEY_BYTES} bytes (hash + 4-byte group)")
    if (longest := max(lengths)) > MAX_KEY_BYTES:
        raise ValueError(
            f"job {job_id}: a key of {longest} bytes is longer than {MAX_KEY_BYTES} (its hash is a hex file name that must fit NAME_MAX)"
        )
    if len(set(keys)) != len(keys):
        bad = next(k for k, c in collections.Counter(keys).items() if c > 1)
        raise ValueError(f"job {job_id}: key {bad!r} appears twice")
    if loading and len(set(ids)) != len(ids):
        bad = next(b for b, c in collections.Counter(ids).items() if c > 1)
        raise ValueError(f"job {job_id}: block id {bad} is loaded twice")
    return job_id, keys, ids


def checked_timeout(timeout: Any) -> float | None:
    """Seconds to wait, or None for no limit (``None`` or ``inf``); ValueError for anything else. Any real
    number will do (numpy's too, as for job ids), but a bool."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or timeout != timeout or timeout < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)
