"""The bench's parsers, labels and ratio maths, with no tier and no process."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from mp_tier import TierConfig
from mp_tier.bench import report
from mp_tier.bench.cli import build_parser
from mp_tier.bench.records import Dist, RunRecord, compute_ratios, ratio
from mp_tier.bench.report import median_range, table_row
from mp_tier.bench.tier_runs import worker_cpu_seconds
from mp_tier.bench.units import (
    parse_io_depth,
    parse_list,
    parse_positive,
    parse_size,
    parse_sweep,
    parse_workers,
    size_label,
)
from mp_tier.bench.workloads import WORKLOADS


@pytest.mark.parametrize(
    "text, expected", [("256k", 256 << 10), ("2m", 2 << 20), ("32M", 32 << 20), ("1g", 1 << 30), ("4096", 4096), ("2MiB", 2 << 20)]
)
def test_sizes(text, expected):
    assert parse_size(text) == expected
    assert parse_size(size_label(expected)) == expected


@pytest.mark.parametrize("text, expected", [("1.5g", 3 << 29), ("1t", 1 << 40), (" 64K ", 64 << 10), ("8kb", 8 << 10)])
def test_more_size_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "0k", "0.5", "-1m", "2x", "m", "", "1.5.2g", "٣k"])
def test_bad_sizes_name_the_text(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("n, label", [(262144, "256k"), (2 << 20, "2m"), (3 << 30, "3g"), (1 << 40, "1t"), (1536, "1536"), (1536 << 10, "1536k")])
def test_size_labels_are_the_shortest_exact_binary_spelling(n, label):
    assert size_label(n) == label


def test_workers_and_sweep_parsing():
    assert parse_workers("3") == (3, 3) and parse_workers("3+1") == (3, 1)
    key, values = parse_sweep("block_size=256k,2m")
    assert key == "block_size" and values == [("256k", 256 << 10), ("2m", 2 << 20)]
    with pytest.raises(Exception, match="KEY"):
        parse_sweep("colour=red")


@pytest.mark.parametrize("text", ["0", "1+0", "1+2+3", "x", "-1", ""])
def test_bad_worker_counts(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a worker count"):
        parse_workers(text)


@pytest.mark.parametrize("text", ["0", "65", "x", "-1", "٣"])
def test_bad_io_depths_are_refused_by_name(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not an io_depth"):
        parse_io_depth(text)
    assert parse_io_depth("8") == 8


def test_sweep_keys_take_dashes_and_parse_each_value_as_its_option_does():
    assert parse_sweep("blocks-per-job=4, 8") == ("blocks_per_job", [("4", 4), ("8", 8)])
    assert parse_sweep("workers=1,2+1") == ("workers", [("1", (1, 1)), ("2+1", (2, 1))])
    with pytest.raises(argparse.ArgumentTypeError, match="KEY"):
        parse_sweep("inflight=")
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
        parse_sweep("inflight=0")


def test_positive_integers():
    assert parse_positive("7") == 7
    for text in ("0", "-3", "2.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_positive(text)


def test_comma_lists_keep_order_drop_repeats_and_expand_all():
    workloads = parse_list(WORKLOADS)
    assert workloads("load, store,load") == ["load", "store"]
    assert workloads("all") == list(WORKLOADS)
    with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
        workloads("store,flood")
    with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
        parse_list(("threads", "raw"))("all")


def test_dist_of_a_sample_and_of_nothing():
    d = Dist.of([1000, 2000, 3000], scale=1e-3)
    assert d == Dist(n=3, p50=2.0, p99=pytest.approx(2.98), max=3.0, mean=2.0)
    assert Dist.of([]) is None


def test_ratio_is_none_when_a_side_is_unknown_or_zero():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(3.0, None) is None and ratio(3.0, 0.0) is None
    assert ratio(0.0, 2.0) == 0.0


def record(engine: str, rnd: int = 0, workload: str = "store", phase: str = "fresh", **figures) -> RunRecord:
    values = {"gbps": 1.0, "busy_idle": 0.9, "job_ms": Dist(1, 5.0, 10.0, 10.0, 5.0), "host_cpu_s_per_gb": 0.1}
    values.update(figures)
    return RunRecord(
        workload=workload, phase=phase, engine=engine, sweep="2m", block_bytes=2 << 20, blocks_per_job=16,
        read_workers=2, write_workers=2, inflight=4, direct=True, wall_s=1.0, bytes=1 << 30, blocks=512,
        blocks_per_s=512.0, submit_us=None, poll_us=None, worker_cpu_s_per_gb=None, idle_loop_rate=None, round=rnd,
        **values,
    )  # fmt: skip


def test_ratios_divide_processes_by_each_compared_engine_of_the_same_round_and_phase():
    records = [
        record("processes", gbps=2.0, busy_idle=0.9, host_cpu_s_per_gb=0.02),
        record("threads", gbps=1.0, busy_idle=0.3, job_ms=Dist(1, 5.0, 40.0, 40.0, 5.0), host_cpu_s_per_gb=0.4),
        record("raw", gbps=4.0, busy_idle=0.9, job_ms=None, host_cpu_s_per_gb=0.01),
        record("raw", rnd=1, gbps=8.0),  # no processes run in round 1: no ratio
        record("threads", phase="cold", gbps=1.0),  # no processes run of this phase: no ratio
    ]
    by_versus = {q.versus: q for q in compute_ratios(records)}
    assert set(by_versus) == {"threads", "raw"}
    threads, raw = by_versus["threads"], by_versus["raw"]
    assert (threads.sweep, threads.round, threads.workload, threads.phase) == ("2m", 0, "store", "fresh")
    assert threads.gbps == 2.0 and threads.busy_idle == pytest.approx(3.0)
    assert threads.job_p99 == 0.25 and threads.host_cpu_per_gb == pytest.approx(0.05)
    assert raw.gbps == 0.5 and raw.busy_idle == 1.0 and raw.job_p99 is None


def test_median_range_over_rounds():
    assert median_range([None]) == "-"
    assert median_range([0.934]) == "0.93x"
    assert median_range([1.02, None, 0.81, 0.93]) == "median 0.93x (0.81-1.02)"


def test_table_row_shows_thread_workers_as_in_host_and_unknowns_as_dashes():
    row = table_row(record("threads", gbps=1.5, busy_idle=None, job_ms=None), show_round=False)
    cells = row.split()
    assert cells[:4] == ["store", "fresh", "threads", "1.500"]
    assert "in host" in row and cells[-1] == "-"
    assert len(table_row(record("processes"), show_round=True)) == len(table_row(record("raw"), show_round=True))


def test_the_schema_reference_names_every_record_field():
    for name in (f.name for f in dataclasses.fields(RunRecord)):
        assert name in (report.__doc__ or ""), name
    assert report.SCHEMA in (report.__doc__ or "")


@pytest.mark.parametrize("text", ["300", "2+257", "²", "1+٣", pytest.param("9" * 5000, id="5000-digits")])
def test_worker_counts_beyond_the_tiers_bounds_are_refused_when_parsed(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"each an integer >= 1 and <= 256"):
        parse_workers(text)


SPINNER = """
import sys, time
end = time.process_time() + 0.025
while time.process_time() < end:
    pass
print(time.process_time(), flush=True)
sys.stdin.read()
"""


def test_worker_cpu_is_read_to_the_millisecond_not_the_clock_tick():
    """A worker's CPU read from outside agrees with its own count within 2 ms: /proc/<pid>/stat's clock
    ticks (10 ms) would make a phase of a few thousand small blocks read 5-10 µs a block off."""
    child = subprocess.Popen([sys.executable, "-c", SPINNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        seen = worker_cpu_seconds([child.pid])
    finally:
        child.communicate("", timeout=10)
    assert abs(seen - own) < 0.002, (seen, own)


def test_the_bench_runs_the_tiers_default_worker_counts_unless_told():
    """The README's main command measures the tier as a user gets it; it ran 2+2 whatever the machine."""
    config = TierConfig()
    assert build_parser().parse_args([]).workers == (config.n_read_workers, config.n_write_workers)
    assert build_parser().parse_args(["--workers", "3+2"]).workers == (3, 2)
