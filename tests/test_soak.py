"""A short run of tools/soak.py (with the installed package), its invariants read back from its summary rather than taken on trust."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "tools" / "soak.py"


def numbers(line: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", line)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "chaos",
    [[], ["--stall-every", "0.5", "--kill-helpers"], ["--sigchld", "ignore", "--starve-every", "1.5", "--starve", "1"]],
    ids=["kills", "kills-stalls-helpers", "reaping-host-without-fds"],
)
def test_short_soak_with_kills_keeps_every_invariant(tmp_path: Path, chaos: list[str]) -> None:
    args = ["--seconds", "4", "--kill-every", "1", "--progress-every", "1", "--root-dir", str(tmp_path), *chaos]
    done = subprocess.run([sys.executable, str(SOAK), *args], check=False, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.splitlines()
    assert summary[-1] == "PASS" and not [line for line in summary if line.endswith(" FAIL")], done.stdout
    lines = {line.split()[0]: line for line in summary[1:-1]}

    submitted, received, missing, extra = numbers(lines["results"])
    assert submitted == received > 0 and missing == extra == 0
    torn, loaded = numbers(lines["torn"])
    assert torn == 0 and loaded > 0
    killed, by_tier, restarted = numbers(lines["restarts"])
    assert killed + by_tier >= restarted >= killed >= 2
    if not chaos:
        assert by_tier == 0 and restarted == killed
    if "--starve-every" in chaos:
        windows, _, spawns_failed = numbers(lines["starved"])
        assert windows >= 2 and spawns_failed >= windows, lines["starved"]
    assert numbers(lines["temp"]) == [0]
    for name in ("open", "/dev/shm", "processes"):
        start, end = numbers(lines[name])[:2]
        assert start == end, lines[name]
    assert re.search(r"^\[ +\d+s\] jobs \d+ submitted", done.stderr, re.MULTILINE), "no progress line"
    assert list(tmp_path.iterdir()) == [], "the soak left files behind"


def test_soak_reads_sizes_with_the_bench_parser() -> None:
    """tools/soak.py and the load generator share one size parser: same spellings, same one-line error."""
    done = subprocess.run([sys.executable, str(SOAK), "--block-size", "2x"], check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "argument --block-size: not a size: '2x' (expected e.g. 256k, 2m, 1g)" in done.stderr
    fine = subprocess.run([sys.executable, str(SOAK), "--max-disk", "1.5GiB", "--help"], check=False, capture_output=True, text=True, timeout=30)
    assert fine.returncode == 0, fine.stderr
