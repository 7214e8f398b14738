"""What the user types: sizes, worker counts, comma lists and sweeps, parsed as argparse types.

One size parser serves the load generator and tools/soak.py, so both accept
the same spellings (binary units: 256k, 2m, 1g).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any

from mp_tier.block_io import DIRECT_ALIGN
from mp_tier.config import ConfigError, IoDepth, Workers, check, describe

SWEEP_KEYS = ("workers", "block_size", "blocks_per_job", "inflight")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# ASCII digits only (int() and float() also take '٣' and '1_0'), and few enough that int() and float() stay exact.
_WHOLE = re.compile(r"[0-9]{1,15}")
_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.[0-9]*)?|\.[0-9]+")


def parse_size(text: str) -> int:
    """'256k', '2m', '1.5g', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"([0-9]{1,15}(?:\.[0-9]+)?)([kmgt]?)(?:i?b)?", text.strip().lower())
    if not m or int(float(m[1]) * _UNITS[m[2]]) <= 0:  # '0.5' is less than a byte
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (expected e.g. 256k, 2m, 1g)")
    return int(float(m[1]) * _UNITS[m[2]])


def parse_block_size(text: str) -> int:
    """A size in whole pages (O_DIRECT's unit): a 3-byte block would only measure the cost of a file."""
    size = parse_size(text)
    if size % DIRECT_ALIGN:
        raise argparse.ArgumentTypeError(f"not a block size: {text!r} is {size} bytes, not a multiple of {DIRECT_ALIGN} bytes (e.g. 64k, 256k, 2m)")
    return size


def size_label(n: int) -> str:
    """The shortest exact binary label of ``n`` bytes: 262144 -> '256k'."""
    for unit in "tgmk":
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_workers(text: str) -> tuple[int, int]:
    """'2' -> 2 read-priority + 2 write-priority workers; '3+1' -> 3 + 1; each within the tier's bounds."""
    parts = [p.strip() for p in text.split("+")]
    counts = [int(p) for p in parts if _WHOLE.fullmatch(p)]
    if len(parts) > 2 or len(counts) != len(parts) or not all(_fits(count, Workers) for count in counts):
        raise argparse.ArgumentTypeError(f"not a worker count: {text!r} (expected N or R+W, e.g. 2 or 3+1, each {describe(Workers)})")
    return counts[0], counts[-1]


def parse_io_depth(text: str) -> int:
    """Lanes per worker process, within the tier's bounds."""
    if not _WHOLE.fullmatch(text.strip()) or not _fits(int(text), IoDepth):
        raise argparse.ArgumentTypeError(f"not an io_depth: {text!r} (expected {describe(IoDepth)})")
    return int(text)


def _fits(value: Any, type_: Any) -> bool:
    try:
        check("value", value, type_)
    except ConfigError:
        return False
    return True


def parse_positive(text: str) -> int:
    """A count that must be at least 1 (jobs, blocks, rounds)."""
    if not _WHOLE.fullmatch(text.strip()) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_whole(text: str) -> int:
    """A whole number that may be 0 (--spin-us 0 means no busy loop)."""
    if not _WHOLE.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def parse_seconds(text: str) -> float:
    """A time limit: a plain decimal above 0 (0, a sign, inf or nan would stop at once or never)."""
    if not _DECIMAL.fullmatch(text.strip()) or float(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return float(text)


def parse_non_negative(text: str) -> float:
    """A plain decimal, 0 or more: a pause, an idle window, an exponent (no sign, inf or nan)."""
    if not _DECIMAL.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return float(text)


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
    "block_size": parse_block_size,
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
