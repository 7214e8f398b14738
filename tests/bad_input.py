"""Bad jobs and what each must be told: the unit layer checks every one against validation, the
process tests push all of them through one real tier per engine."""

from __future__ import annotations

import numpy as np
from helpers import make_keys

from mp_tier.layout import MAX_KEY_BYTES

KEY = make_keys(1, seed=42)[0]

BAD_JOBS = [
    ("not a job", {"job": {"job_id": 1}}, "expected a JobMetadata"),
    ("job_id not int", {"job_id": "1"}, "job_id must be an int"),
    ("job_id bool", {"job_id": True}, "job_id must be an int"),
    ("keys None", {"keys": None}, "keys must be an ordered sequence, got None"),
    ("keys one bytes", {"keys": KEY}, "keys must be an ordered sequence"),
    ("keys a set", {"keys": {KEY}}, "keys must be an ordered sequence, not a set"),
    ("key str", {"keys": ["k" * 36]}, "is not bytes"),
    ("key bytearray", {"keys": [bytearray(KEY)]}, "is not bytes"),
    ("block_ids None", {"block_ids": None}, "block_ids must be an ordered sequence"),
    ("block_ids a dict", {"block_ids": {0: 1}}, "block_ids must be an ordered sequence, not a dict"),
    ("block_ids a frozenset", {"block_ids": frozenset([0])}, "block_ids must be an ordered sequence, not a frozenset"),
    ("block id float", {"block_ids": [0.0]}, "is not an int"),
    ("block id bool", {"block_ids": [True]}, "is not an int"),
    ("block id numpy bool", {"block_ids": [np.bool_(False)]}, "is not an int"),
    ("block ids float array", {"block_ids": np.array([0.0])}, "1-D integer array"),
    ("block ids bool array", {"block_ids": np.array([False])}, "1-D integer array"),
    ("block ids 2-D array", {"block_ids": np.array([[0]])}, "1-D integer array"),
    ("negative block id", {"block_ids": [-1]}, "out of range"),
    ("huge block id", {"block_ids": [2**70]}, "out of range"),
    ("huge uint64 block id", {"block_ids": np.array([2**63], dtype=np.uint64)}, "out of range"),
    ("length mismatch", {"block_ids": [0, 1]}, "1 keys but 2 block_ids"),
    ("key too short", {"keys": [b"\x01\x02\x03\x00\x00\x00\x00"]}, "shorter than 8 bytes"),
    ("key one byte too long", {"keys": [bytes(MAX_KEY_BYTES + 1)]}, f"a key of {MAX_KEY_BYTES + 1} bytes is longer than {MAX_KEY_BYTES}"),
    ("key far too long", {"keys": [bytes(10**6)]}, "longer than"),
    ("duplicate keys", {"keys": [KEY, KEY], "block_ids": [0, 1]}, "appears twice"),
]
