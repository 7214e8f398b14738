"""Issue 18's targets for mp_tier's default config against vLLM's C I/O path, judged from per-round figures.

Pure: figures in, verdicts out, no tier and no process. A cell is one root
(disk or tmpfs), one job shape and one block size; its figures hold, per
column and metric, one value per round (None where a round did not give one).
A ratio is the median of the per-round ratios (the columns of one round ran
back to back, so the disk's drift cancels), except host loss per GB, whose
per-round value can be zero or below: it compares the medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

VLLM_C = "vLLM C"  # vLLM's FS tier on its fs_io_C extension: the path vLLM users run, the headline peer
VLLM_PY = "vLLM Python"  # the same tier forced onto its pure-Python fallback: a labelled extra column
MP = "mp_tier"  # mp_tier's adapter with its default config
RAW = "raw"  # plain pwrite/preadv loops in processes, no tier: the ceiling

Rounds = list[float | None]
Figures = dict[str, dict[str, Rounds]]  # column -> metric -> one value per round


@dataclass(frozen=True)
class Cell:
    """One point of the matrix."""

    root: str  # "disk" or "tmpfs"
    shape: str  # "16x8": 16 blocks per job, 8 jobs in flight
    block_bytes: int


@dataclass(frozen=True)
class Target:
    """mine ÷ against, bounded; ``bound`` gives the bound for a cell, or None where the target does not apply."""

    metric: str
    label: str
    against: str
    higher_is_better: bool
    bound: Callable[[Cell], float | None]
    of_medians: bool = False


@dataclass(frozen=True)
class Verdict:
    cell: Cell
    target: Target
    ratio: float | None  # None: a figure is missing, which fails the target
    low: float | None  # range of the per-round ratios
    high: float | None
    bound: float
    passed: bool
    note: str = ""  # why there is no ratio


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def per_round_ratios(mine: Rounds, theirs: Rounds) -> Rounds:
    return [a / b if a is not None and b else None for a, b in zip(mine, theirs)]


def host_loss_per_gb(busy_idle: float | None, gbps: float | None) -> float | None:
    """(1 − busy/idle) ÷ GB/s: the share of the host's speed lost per GB/s moved."""
    return (1 - busy_idle) / gbps if busy_idle is not None and gbps else None


def _speed_bound(cell: Cell) -> float:
    return 1.0 if cell.block_bytes >= 2 << 20 else 1.3


def _on(root: str, bound: float, block_bytes: int | None = None) -> Callable[[Cell], float | None]:
    return lambda cell: bound if cell.root == root and block_bytes in (None, cell.block_bytes) else None


TARGETS = (
    Target("store_gbps", "store GB/s", VLLM_C, True, _speed_bound),
    Target("load_gbps", "cold-load GB/s", VLLM_C, True, _speed_bound),
    Target("busy_idle", "host busy/idle while storing", VLLM_C, True, _on("disk", 1.2)),
    Target("loss_per_gb", "host loss per GB while storing", VLLM_C, False, _on("tmpfs", 0.8), of_medians=True),
    Target("submit_p99_us", "submit_store p99", VLLM_C, False, lambda cell: 1.0),
    Target("store_cpu_us_per_block", "worker CPU per block, store", RAW, False, _on("tmpfs", 1.5, 16 << 10)),
    Target("load_cpu_us_per_block", "worker CPU per block, load", RAW, False, _on("tmpfs", 1.5, 16 << 10)),
)


def judge(cell: Cell, target: Target, figures: Figures) -> Verdict | None:
    """One target in one cell for mp_tier's default config, or None where the target does not apply."""
    bound = target.bound(cell)
    if bound is None:
        return None
    mine = figures.get(MP, {}).get(target.metric, [])
    theirs = figures.get(target.against, {}).get(target.metric, [])
    if target.of_medians:
        a, b = median(mine), median(theirs)
        if a is None or b is None:
            return Verdict(cell, target, None, None, None, bound, False, "a figure is missing")
        if b <= 0:  # the peer cost the host nothing measurable: mp_tier must not either
            return Verdict(cell, target, None, None, None, bound, a <= 0, f"{target.against} {b:.3g} <= 0, {MP} {a:.3g}")
        return Verdict(cell, target, a / b, None, None, bound, a / b <= bound)
    ratios = [r for r in per_round_ratios(mine, theirs) if r is not None]
    if not ratios:
        return Verdict(cell, target, None, None, None, bound, False, "a figure is missing")
    value = statistics.median(ratios)
    passed = value >= bound if target.higher_is_better else value <= bound
    return Verdict(cell, target, value, min(ratios), max(ratios), bound, passed)


def evaluate(cell: Cell, figures: Figures) -> list[Verdict]:
    """Every target that applies to this cell (variants are not judged: the targets are for the default config)."""
    return [v for t in TARGETS if (v := judge(cell, t, figures)) is not None]
