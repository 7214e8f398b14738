"""``mp-tier du ROOT``: what each namespace under a cache root holds, read-only, in one ``scandir`` pass.

No file is opened: a block's size and mtime come from one ``lstat`` (which
``scandir`` entries make from the parent's fd), so a million files cost a
million ``lstat`` calls and nothing more.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..bench.progress import make_bar
from ..layout import VERSION_KEY, rank_of_dir
from .tree import BLOCK, FOREIGN, LIVE_TEMP, REFUSED, STALE_TEMP, Namespace, Walk, namespaces, open_root, shown, walk

EXAMPLES = 5  # names shown of each kind of odd file; the counts are complete


@dataclass
class Usage:
    """One namespace's contents, as ``--json`` prints it."""

    namespace: str
    run: dict[str, Any] | None
    rank: int | None
    skipped: str | None = None
    blocks: int = 0
    bytes: int = 0
    groups: dict[int, list[int]] = field(default_factory=dict)  # group -> [blocks, bytes]
    oldest: float | None = None
    newest: float | None = None
    live_temps: int = 0
    stale_temps: int = 0
    temp_bytes: int = 0
    foreign: int = 0
    refused: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    files: int = 0


def survey(ns: Namespace, bar_update: Any = None) -> Usage:
    """Count what ``ns`` holds; ``bar_update(n)`` is told the files seen after each top-level directory."""
    usage = Usage(shown(ns.name), ns.run, rank_of_dir(ns.name), ns.problem)
    if ns.problem:
        return usage
    seen = Walk()
    counted = [0]

    def top_done() -> None:
        if bar_update is not None:
            bar_update(usage.files - counted[0])
        counted[0] = usage.files

    kinds: Counter[str] = Counter()
    for entry in walk(ns, seen, on_top=top_done):
        usage.files += 1
        kinds[entry.kind] += 1
        st = entry.st
        if entry.kind == BLOCK and st is not None:
            usage.bytes += st.st_size
            group = usage.groups.setdefault(entry.group, [0, 0])
            group[0] += 1
            group[1] += st.st_size
            mtime = st.st_mtime
            usage.oldest = mtime if usage.oldest is None or mtime < usage.oldest else usage.oldest
            usage.newest = mtime if usage.newest is None or mtime > usage.newest else usage.newest
        elif entry.kind in (LIVE_TEMP, STALE_TEMP) and st is not None:
            usage.temp_bytes += st.st_size
        if entry.kind in (FOREIGN, REFUSED, STALE_TEMP, LIVE_TEMP):
            odd = usage.examples.setdefault(entry.kind, [])
            if len(odd) < EXAMPLES:
                odd.append(shown(entry.path.rel.lstrip("/")) + (f" ({entry.why})" if entry.why else ""))
    top_done()
    usage.blocks, usage.refused = kinds[BLOCK], kinds[REFUSED]
    usage.live_temps, usage.stale_temps = kinds[LIVE_TEMP], kinds[STALE_TEMP]
    usage.foreign = kinds[FOREIGN] + len(seen.foreign_dirs)
    if seen.foreign_dirs:
        usage.examples.setdefault(FOREIGN, []).extend(f"{d}/ (directory)" for d in seen.foreign_dirs[:EXAMPLES])
    if seen.unreadable:
        usage.examples["unreadable"] = seen.unreadable[:EXAMPLES]
    return usage


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe(u: Usage) -> list[str]:
    """The text lines of one namespace."""
    if u.skipped:
        return [f"namespace {u.namespace}: skipped: {u.skipped}"]
    run = u.run or {}
    facts = [f"{k}={run[k]}" for k in ("model", "dtype", "tp", "pp") if k in run]
    facts += [f"rank {u.rank if u.rank is not None else '-'}", f"block {size(run['block_bytes']) if 'block_bytes' in run else '-'}"]
    facts.append(f"layout version {run.get(VERSION_KEY, 1)}")  # a config.json without one is of version 1
    lines = [f"namespace {u.namespace}  ({', '.join(facts)})"]
    for group, (blocks, nbytes) in sorted(u.groups.items()):
        lines.append(f"  group {group:<6} {blocks:>12,} blocks {size(nbytes):>12}")
    lines.append(f"  blocks       {u.blocks:>12,}        {size(u.bytes):>12}   oldest {_when(u.oldest)}   newest {_when(u.newest)}")
    lines.append(f"  temp files   {u.live_temps:,} of live writers, {u.stale_temps:,} stale ({size(u.temp_bytes)})")
    lines.append(f"  foreign      {u.foreign:,} names the layout does not give")
    lines.append(f"  refused      {u.refused:,} block files the tier would not load")
    for kind, names in u.examples.items():
        lines += [f"    {kind}: {name}" for name in names]
    return lines


def totals(usages: list[Usage], seconds: float) -> dict[str, Any]:
    keys = ("blocks", "bytes", "live_temps", "stale_temps", "temp_bytes", "foreign", "refused", "files")
    total: dict[str, Any] = {k: sum(getattr(u, k) for u in usages) for k in keys}
    total.update(namespaces=len(usages), skipped=sum(u.skipped is not None for u in usages), seconds=round(seconds, 3))
    return total


def run(root: str, as_json: bool) -> int:
    t0 = time.perf_counter()
    root_fd = open_root(root)
    bar = make_bar(sys.stderr.isatty(), "du", None, unit="files")
    usages: list[Usage] = []
    try:
        for ns in namespaces(root_fd, root):
            usages.append(survey(ns, bar.update))
    finally:
        bar.close()
        os.close(root_fd)
    total = totals(usages, time.perf_counter() - t0)
    if as_json:
        print(json.dumps({"root": shown(root), "namespaces": [asdict(u) for u in usages], "total": total}, indent=1))
        return 0
    for u in usages:
        print("\n".join(describe(u)))
    print(
        f"total: {total['namespaces']} namespaces ({total['skipped']} skipped), {total['blocks']:,} blocks, {size(total['bytes'])}, "
        f"{total['live_temps']:,} live and {total['stale_temps']:,} stale temp files, {total['foreign']:,} foreign, "
        f"{total['refused']:,} refused; {total['files']:,} files in {total['seconds']:.2f} s"
    )
    return 0
