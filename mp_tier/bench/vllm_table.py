"""The vLLM comparison's printed table and target lines: Markdown from per-round figures, nothing measured here.

A value cell is the median of the rounds with their range; a ratio cell the
median of the per-round ratios with their range. Every ratio column names the
vLLM path it divides by.
"""

from __future__ import annotations

from collections.abc import Sequence

from .units import size_label
from .vllm_targets import MP, RAW, VLLM_C, VLLM_PY, Cell, Figures, Verdict, median, per_round_ratios

ROWS = (  # (metric, row label)
    ("store_gbps", "store GB/s"),
    ("load_gbps", "cold load GB/s"),
    ("busy_idle", "host busy/idle, storing"),
    ("loss_per_gb", "host loss per GB, storing"),
    ("submit_p50_us", "submit_store p50 µs"),
    ("submit_p99_us", "submit_store p99 µs"),
    ("store_cpu_us_per_block", "worker CPU µs/block, store"),
    ("load_cpu_us_per_block", "worker CPU µs/block, load"),
    ("host_cpu_us_per_block", "host CPU µs/block, store"),
)
Marks = dict[tuple[str, str], str]  # (column, metric) -> a mark after the value, e.g. "*" for a time-limited phase


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def spread(values: Sequence[float | None], unit: str = "") -> str:
    """'1.2 (1.1–1.4)': the median and range of the known values; '-' if none."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    mid = f"{fmt(median(known))}{unit}"
    return mid if len(known) == 1 else f"{mid} ({fmt(min(known))}–{fmt(max(known))})"


def ratio_columns(columns: Sequence[str]) -> list[tuple[str, str]]:
    """(mine, theirs): every mp_tier column ÷ vLLM C, and mp_tier's default ÷ vLLM Python as the labelled extra."""
    mps = [c for c in columns if c not in (VLLM_C, VLLM_PY, RAW)]
    pairs = [(c, VLLM_C) for c in mps]
    return pairs + ([(MP, VLLM_PY)] if VLLM_PY in columns and MP in columns else [])


def header(columns: Sequence[str]) -> list[str]:
    ratios = [f"{mine} ÷ {theirs}" + (" (extra)" if theirs == VLLM_PY else "") for mine, theirs in ratio_columns(columns)]
    head = ["block", "metric", *columns, *ratios]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def rows(cell: Cell, figures: Figures, columns: Sequence[str], marks: Marks) -> list[str]:
    """One row per metric for one cell; a metric no column has is left out."""
    label = size_label(cell.block_bytes)
    lines = []
    for metric, row in ROWS:
        series = {c: figures.get(c, {}).get(metric, []) for c in columns}
        if not any(v is not None for values in series.values() for v in values):
            continue
        cells = [spread(series[c]) + marks.get((c, metric), "") for c in columns]
        cells += [spread(per_round_ratios(series[mine], series[theirs]), "x") for mine, theirs in ratio_columns(columns)]
        lines.append(f"| {label} | {row} | " + " | ".join(cells) + " |")
    return lines


def verdict_line(v: Verdict) -> str:
    """'PASS disk 16x8 256k  store GB/s: mp_tier ÷ vLLM C 1.43x (1.2–1.5), needs >= 1.3x'."""
    cell, t = v.cell, v.target
    where = f"{cell.root:5} {cell.shape:5} {size_label(cell.block_bytes):5}"
    op = ">=" if t.higher_is_better else "<="
    if v.ratio is None:
        got = v.note
    elif v.low is None or v.high is None:
        got = f"{fmt(v.ratio)}x (of medians)"
    else:
        got = f"{fmt(v.ratio)}x ({fmt(v.low)}–{fmt(v.high)})"
    return f"{'PASS' if v.passed else 'FAIL'}  {where} {t.label}: {MP} ÷ {t.against} {got}, needs {op} {fmt(v.bound)}x"
