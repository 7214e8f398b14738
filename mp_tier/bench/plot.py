"""``--plot``: throughput and host busy/idle against the swept value, drawn by matplotlib (the plot extra)."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from .errors import UsageError
from .records import RunRecord

STYLES = {"processes": "-o", "threads": "--s", "raw": ":^", "checksum": "-.d"}


def load_pyplot() -> Any:
    """matplotlib's pyplot without a display, or a UsageError naming the extra to install.

    Imported by name: matplotlib is an optional extra, not needed to type-check the bench.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install -e '.[plot]'") from None


def plot(path: str, key: str, labels: list[str], runs: list[RunRecord]) -> None:
    """Throughput and host busy/idle against the swept value, one line per workload phase and engine."""
    plt = load_pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = dict.fromkeys((r.workload, r.phase, r.engine) for r in runs)
    x = range(len(labels))
    for workload, phase, engine in series:
        by_label = {r.sweep: r for r in runs if (r.workload, r.phase, r.engine) == (workload, phase, engine)}
        points = [by_label.get(label) for label in labels]
        name = f"{workload} {phase} ({engine})"
        left.plot(x, [r.gbps if r else np.nan for r in points], STYLES[engine], label=name)
        right.plot(x, [r.busy_idle if r and r.busy_idle else np.nan for r in points], STYLES[engine], label=name)
    for ax, title in ((left, "throughput (GB/s)"), (right, "host busy-loop speed, busy / idle")):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("workers (N read + N write, or R+W)" if key == "workers" else key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_ylim(0, 1.1)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
