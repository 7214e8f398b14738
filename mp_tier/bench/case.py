"""One point of a sweep: the settings it runs with, its directory, and the engines it runs in which order."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """What one case runs with; ``--sweep`` replaces one field per case."""

    block_size: int
    blocks_per_job: int
    workers: tuple[int, int]
    inflight: int


@dataclass
class Case:
    """One point of the sweep: its settings, its directory, and what its first tier told."""

    settings: Settings
    args: argparse.Namespace
    root: str
    sweep: str | None
    spin_chunk: int
    path_of: Callable[[bytes], str] | None = None  # the tier's key -> file mapping, for the raw runs
    direct: bool | None = None

    @property
    def job_bytes(self) -> int:
        return self.settings.block_size * self.settings.blocks_per_job

    @property
    def n_jobs(self) -> int:
        return max(1, math.ceil(int(self.args.total) / self.job_bytes))

    @property
    def tier_engines(self) -> list[str]:
        return ["processes"] + [e for e in ("threads", "checksum") if e in self.args.compare]

    def deadline(self) -> float:
        return time.perf_counter() + self.args.seconds if self.args.seconds else math.inf

    def paths(self, jobs: Sequence[list[bytes]]) -> list[str]:
        assert self.path_of is not None
        return [self.path_of(k) for keys in jobs for k in keys]


def schedule(case: Case, with_raw: bool) -> list[tuple[int, str]]:
    """(round, engine) pairs; every other round runs the engines in reverse order.

    The disk's speed drifts by several times over seconds on a shared VM;
    alternating the order spreads that drift over every engine alike.
    """
    engines = case.tier_engines + (["raw"] if with_raw and "raw" in case.args.compare else [])
    return [(r, e) for r in range(case.args.repeat) for e in (engines if r % 2 == 0 else engines[::-1])]
