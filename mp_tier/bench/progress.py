"""Progress bars on stderr, drawn by tqdm when the bench extra is installed and left out when not."""

from __future__ import annotations

import importlib
import sys
from typing import Protocol


class Bar(Protocol):
    """What the bench asks of a progress bar: bytes moved, and an end."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


class NoBar:
    """Stands in for tqdm when progress is off or tqdm is missing."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_bar(enabled: bool, desc: str, total: int | None, unit: str = "B") -> Bar:
    """A progress bar on stderr (of bytes unless ``unit`` says) that shows up only after a second.

    tqdm is imported by name when a bar is wanted: it is an optional extra
    (the run just has no bar without it) and ships no type hints.
    """
    if not enabled:
        return NoBar()
    try:
        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        return NoBar()
    divisor = 1024 if unit == "B" else 1000
    bar: Bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=divisor, delay=1.0, leave=False, file=sys.stderr)
    return bar
