"""The vLLM comparison's targets and table, from figures given here: no tier, no process, no vLLM."""

from __future__ import annotations

import pytest

from mp_tier.bench.vllm_table import header, rows, spread, verdict_line
from mp_tier.bench.vllm_targets import MP, RAW, VLLM_C, VLLM_PY, Cell, evaluate, host_loss_per_gb

DISK_2M = Cell("disk", "16x8", 2 << 20)
DISK_256K = Cell("disk", "1x16", 256 << 10)
TMPFS_16K = Cell("tmpfs", "1x16", 16 << 10)
TMPFS_256K = Cell("tmpfs", "16x8", 256 << 10)


def by_label(verdicts):
    return {v.target.label: v for v in verdicts}


def test_which_targets_apply_where():
    assert set(by_label(evaluate(DISK_2M, {}))) == {"store GB/s", "cold-load GB/s", "host busy/idle while storing", "submit_store p99"}
    assert set(by_label(evaluate(TMPFS_256K, {}))) == {"store GB/s", "cold-load GB/s", "host loss per GB while storing", "submit_store p99"}
    assert set(by_label(evaluate(TMPFS_16K, {}))) == {
        "store GB/s",
        "cold-load GB/s",
        "host loss per GB while storing",
        "submit_store p99",
        "worker CPU per block, store",
        "worker CPU per block, load",
    }


@pytest.mark.parametrize("cell, bound", [(DISK_2M, 1.0), (DISK_256K, 1.3), (TMPFS_16K, 1.3)])
def test_speed_bound_depends_on_block_size(cell, bound):
    figures = {MP: {"store_gbps": [bound * 1.0, bound * 0.99]}, VLLM_C: {"store_gbps": [1.0, 1.0]}}
    verdict = by_label(evaluate(cell, figures))["store GB/s"]
    assert verdict.bound == bound
    assert verdict.ratio == pytest.approx(bound * 0.995)
    assert not verdict.passed  # the median of the per-round ratios is just below the bound
    figures[MP]["store_gbps"] = [bound, bound * 1.01]
    assert by_label(evaluate(cell, figures))["store GB/s"].passed


def test_ratio_is_the_median_of_per_round_ratios_against_the_c_path_not_python():
    figures = {
        MP: {"load_gbps": [2.0, 1.0, 3.0]},
        VLLM_C: {"load_gbps": [1.0, 1.0, 1.0]},
        VLLM_PY: {"load_gbps": [0.1, 0.1, 0.1]},  # the straw man must not count
    }
    verdict = by_label(evaluate(DISK_256K, figures))["cold-load GB/s"]
    assert (verdict.ratio, verdict.low, verdict.high) == (2.0, 1.0, 3.0)
    assert verdict.target.against == VLLM_C


def test_missing_figures_fail_with_a_reason():
    verdict = by_label(evaluate(DISK_2M, {MP: {"store_gbps": [1.0, None]}, VLLM_C: {"store_gbps": [None, 2.0]}}))["store GB/s"]
    assert not verdict.passed and verdict.ratio is None and "missing" in verdict.note


def test_submit_p99_lower_is_better():
    figures = {MP: {"submit_p99_us": [50.0]}, VLLM_C: {"submit_p99_us": [40.0]}}
    assert not by_label(evaluate(DISK_2M, figures))["submit_store p99"].passed
    figures[MP]["submit_p99_us"] = [40.0]
    assert by_label(evaluate(DISK_2M, figures))["submit_store p99"].passed


def test_busy_idle_on_disk_needs_1_2x():
    figures = {MP: {"busy_idle": [0.9]}, VLLM_C: {"busy_idle": [0.8]}}
    assert not by_label(evaluate(DISK_2M, figures))["host busy/idle while storing"].passed  # 1.125x
    figures[MP]["busy_idle"] = [0.96]
    assert by_label(evaluate(DISK_2M, figures))["host busy/idle while storing"].passed


def test_host_loss_compares_medians_and_a_peer_that_lost_nothing():
    assert host_loss_per_gb(0.8, 2.0) == pytest.approx(0.1)
    assert host_loss_per_gb(None, 2.0) is None and host_loss_per_gb(0.8, 0.0) is None
    figures = {MP: {"loss_per_gb": [0.07, 0.09, 5.0]}, VLLM_C: {"loss_per_gb": [0.1, 0.1, 0.1]}}
    verdict = by_label(evaluate(TMPFS_256K, figures))["host loss per GB while storing"]
    assert verdict.ratio == pytest.approx(0.9) and not verdict.passed  # 0.09 / 0.1 > 0.8
    figures[VLLM_C]["loss_per_gb"] = [0.0, -0.01, 0.02]  # the peer's median loss is 0: mp_tier must lose nothing either
    verdict = by_label(evaluate(TMPFS_256K, figures))["host loss per GB while storing"]
    assert verdict.ratio is None and not verdict.passed and VLLM_C in verdict.note
    figures[MP]["loss_per_gb"] = [-0.01, 0.0, 0.01]
    assert by_label(evaluate(TMPFS_256K, figures))["host loss per GB while storing"].passed


def test_worker_cpu_is_against_the_raw_loop():
    figures = {
        MP: {"store_cpu_us_per_block": [14.0], "load_cpu_us_per_block": [16.0]},
        RAW: {"store_cpu_us_per_block": [10.0], "load_cpu_us_per_block": [10.0]},
    }
    verdicts = by_label(evaluate(TMPFS_16K, figures))
    assert verdicts["worker CPU per block, store"].passed
    assert not verdicts["worker CPU per block, load"].passed
    assert verdicts["worker CPU per block, load"].target.against == RAW


def test_table_rows_show_medians_ranges_marks_and_named_ratios():
    columns = [VLLM_C, VLLM_PY, MP, RAW]
    head = header(columns)
    assert head[0] == f"| block | metric | {VLLM_C} | {VLLM_PY} | {MP} | {RAW} | {MP} ÷ {VLLM_C} | {MP} ÷ {VLLM_PY} (extra) |"
    figures = {VLLM_C: {"store_gbps": [1.0, 2.0, 1.5]}, VLLM_PY: {"store_gbps": [0.5, 0.5, 0.5]}, MP: {"store_gbps": [2.0, 2.0, 3.0]}}
    lines = rows(DISK_256K, figures, columns, {(VLLM_PY, "store_gbps"): "*"})
    assert lines == ["| 256k | store GB/s | 1.5 (1–2) | 0.5 (0.5–0.5)* | 2 (2–3) | - | 2x (1–2) | 4x (4–6) |"]
    assert spread([None, 7.0]) == "7" and spread([]) == "-"


def test_verdict_line_names_the_peer_and_the_bound():
    figures = {MP: {"store_gbps": [1.2, 1.1]}, VLLM_C: {"store_gbps": [1.0, 1.0]}}
    line = verdict_line(by_label(evaluate(DISK_256K, figures))["store GB/s"])
    assert line.startswith("FAIL") and f"{MP} ÷ {VLLM_C} 1.15x (1.1–1.2)" in line and line.endswith("needs >= 1.3x")
