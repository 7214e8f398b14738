"""From the matrix's runs to the figures per round, the printed tables and target lines, and the JSON parts."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from typing import Any

from .records import GB, RunRecord
from .vllm_matrix import CellRuns
from .vllm_peer import Column
from .vllm_phase import Phase, per_block_us
from .vllm_table import Marks, header, rows, verdict_line
from .vllm_targets import MP, RAW, Figures, Verdict, evaluate, host_loss_per_gb


def tier_metrics(store: Phase, load: Phase) -> dict[str, float | None]:
    return {
        "store_gbps": store.gbps,
        "load_gbps": load.gbps,
        "busy_idle": store.busy_idle,
        "loss_per_gb": host_loss_per_gb(store.busy_idle, store.gbps),
        "submit_p50_us": store.submit_us.p50 if store.submit_us else None,
        "submit_p99_us": store.submit_us.p99 if store.submit_us else None,
        "store_cpu_us_per_block": per_block_us(store.worker_cpu_s, store.blocks),
        "load_cpu_us_per_block": per_block_us(load.worker_cpu_s, load.blocks),
        "host_cpu_us_per_block": per_block_us(store.host_cpu_s, store.blocks),
    }


def raw_metrics(store: RunRecord, load: RunRecord) -> dict[str, float | None]:
    def cpu(r: RunRecord) -> float | None:
        return r.worker_cpu_s_per_gb * r.block_bytes / GB * 1e6 if r.worker_cpu_s_per_gb is not None else None

    return {
        "store_gbps": store.gbps,
        "load_gbps": load.gbps,
        "busy_idle": store.busy_idle,
        "loss_per_gb": host_loss_per_gb(store.busy_idle, store.gbps),
        "store_cpu_us_per_block": cpu(store),
        "load_cpu_us_per_block": cpu(load),
    }


def figures(runs: CellRuns, columns: list[Column]) -> tuple[Figures, Marks]:
    """Per column and metric, one value per round; marks for time-limited phases and loads that were not cold."""
    rounds = sorted({r["round"] for r in runs.tiers} | {r["round"] for r in runs.raw})
    by = {(r["round"], r["column"]): r for r in runs.tiers} | {(r["round"], RAW): r for r in runs.raw}
    out: Figures = {}
    marks: Marks = {}
    for name in [c.name for c in columns] + [RAW]:
        per = [by.get((rnd, name)) for rnd in rounds]
        metric = [(tier_metrics if name != RAW else raw_metrics)(r["store"], r["load"]) if r else {} for r in per]
        out[name] = {m: [values.get(m) for values in metric] for m in set().union(*metric)}
        for op in ("store", "load"):
            phases = [r[op] for r in per if r]
            if any(getattr(p, "time_limited", False) or getattr(p, "cut_short", False) for p in phases):
                marks[(name, f"{op}_gbps")] = "*"
            if any((p.cache_drop or "").startswith("NOT COLD") for p in phases if op == "load"):
                marks[(name, "load_gbps")] = marks.get((name, "load_gbps"), "") + " NOT COLD"
    return out, marks


def report(all_runs: list[CellRuns], columns: list[Column], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[Verdict]]:
    names = [c.name for c in columns] + [RAW]
    cells, verdicts = [], []
    for kind, shape in itertools.product(args.roots, args.shapes):
        group = [r for r in all_runs if r.cell.root == kind and r.cell.shape == shape.label]
        if not group:
            continue
        print(f"\n{kind}, jobs of {shape.blocks_per_job} blocks, {shape.inflight} in flight:\n")
        print("\n".join(header(names)))
        for runs in group:
            figs, marks = figures(runs, columns)
            print("\n".join(rows(runs.cell, figs, names, marks)))
            found = evaluate(runs.cell, figs)
            verdicts += found
            cells.append({"cell": to_json(runs.cell), "figures": figs, "verdicts": [verdict_json(v) for v in found]})
    print(
        f"\nMedians of {args.rounds} rounds (range); ratios: median of the per-round ratios (range). {RAW}: pwrite/preadv loops in as many "
        f"processes as {MP} has workers, no tier. * = in some round the phase stopped submitting at the {args.seconds:g} s limit: it moved "
        "less, at the rate shown. host loss per GB = (1 - busy/idle) ÷ GB/s. Worker CPU: mp_tier's worker processes and the raw loops, "
        "from /proc; vLLM's threads are the host's (host CPU row). tmpfs loads read memory, not a cold disk."
    )
    for kind in args.roots:
        directs = sorted({(t["column"], t["direct"]) for r in all_runs if r.cell.root == kind for t in r.tiers})
        print(f"O_DIRECT on {kind}: " + ", ".join(f"{c} {'on' if d else 'off'}" for c, d in directs))
    print(f"\nTargets (issue 18), {MP} default ÷ the column named, {len(verdicts)} checks:")
    for v in verdicts:
        print("  " + verdict_line(v))
    print(f"targets met: {sum(v.passed for v in verdicts)} of {len(verdicts)}")
    return cells, verdicts


def verdict_json(v: Verdict) -> dict[str, Any]:
    t = v.target
    return {"target": t.label, "metric": t.metric, "against": t.against, "ratio": v.ratio, "low": v.low, "high": v.high} | {
        "bound": v.bound,
        "higher_is_better": t.higher_is_better,
        "passed": v.passed,
        "note": v.note,
    }


def to_json(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: to_json(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    return x
