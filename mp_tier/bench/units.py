"""What the user types: sizes, worker counts, comma lists and sweeps, parsed as argparse types.

One size parser serves the load generator and tools/soak.py, so both accept
the same spellings (binary units: 256k, 2m, 1g).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any

SWEEP_KEYS = ("workers", "block_size", "blocks_per_job", "inflight")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'256k', '2m', '1.5g', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(?:i?b)?", text.strip().lower())
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (expected e.g. 256k, 2m, 1g)")
    return int(float(m[1]) * _UNITS[m[2]])


def size_label(n: int) -> str:
    """The shortest exact binary label of ``n`` bytes: 262144 -> '256k'."""
    for unit in "tgmk":
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_workers(text: str) -> tuple[int, int]:
    """'2' -> 2 read-priority + 2 write-priority workers; '3+1' -> 3 + 1."""
    parts = text.split("+")
    if len(parts) > 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"not a worker count: {text!r} (expected N or R+W, e.g. 2 or 3+1)")
    read = int(parts[0])
    return read, int(parts[-1])


def parse_positive(text: str) -> int:
    """A count that must be at least 1 (jobs, blocks, rounds)."""
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma list of ``choices``, in the order given, without repeats."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"] and "store" in choices:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return parse


SWEEP_PARSERS: dict[str, Callable[[str], Any]] = {
    "workers": parse_workers,
    "block_size": parse_size,
    "blocks_per_job": parse_positive,
    "inflight": parse_positive,
}


def parse_sweep(text: str) -> tuple[str, list[tuple[str, Any]]]:
    """'workers=1,2,4' -> ('workers', [('1', (1, 1)), ...]): each label with its value."""
    key, _, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if key not in SWEEP_PARSERS or not values.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    labels = [v.strip() for v in values.split(",") if v.strip()]
    return key, [(label, SWEEP_PARSERS[key](label)) for label in labels]
