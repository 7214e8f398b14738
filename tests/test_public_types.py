"""The public API as a type checker sees it: user code that calls it right passes strict mypy, and each
wrong call is a type error on its own line (as msgspec checks its own stubs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RIGHT = """
from mp_tier import FileSystemTierManager, JobMetadata, JobResult, PrimaryCache, TierConfig, TierStats

cache = PrimaryCache.create(num_blocks=4, block_bytes=4096)
tier = FileSystemTierManager(primary_kv_view=cache, root_dir="/tmp/kv", n_read_workers=1, n_write_workers=1)
tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
tier.drain(timeout=10)
results: list[JobResult] = tier.get_finished()
codes: list[str] = [r.error_code for r in results if r.error_code is not None]
hit: bool | None = tier.lookup(bytes(36))
stats: TierStats = tier.stats()
busy: int = stats.jobs_active + stats.bytes_stored
config: TierConfig = TierConfig.from_env()
tier.shutdown()
cache.close()
"""

# Each wrong line ends with the error mypy must report there.
WRONG = """
from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache

cache = PrimaryCache.create(num_blocks=4, block_bytes=4096)
tier = FileSystemTierManager(primary_kv_view=cache, root_dir="/tmp/kv")
tier.submit_store([bytes(36)])  # arg-type
tier.submit_load(JobMetadata(job_id="1", keys=[bytes(36)], block_ids=[0]))  # arg-type
tier.drain(timeout="10")  # arg-type
tier.get_finished()[0].error_code.startswith("E")  # union-attr
tier.stats().jobs_stord  # attr-defined
tier.stats()["jobs_stored"]  # index
tier.lookup("ab" * 18)  # arg-type
"""


@pytest.mark.timeout(300)
def test_mypy_accepts_right_calls_and_names_every_wrong_one(tmp_path: Path) -> None:
    (tmp_path / "right.py").write_text(RIGHT)
    (tmp_path / "wrong.py").write_text(WRONG)
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # this checkout's package, whatever is installed
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--hide-error-context", "right.py", "wrong.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    errors = re.findall(r"^(\w+)\.py:(\d+): error: .*\[([\w-]+)\]$", done.stdout, re.M)
    assert [e for e in errors if e[0] == "right"] == [], done.stdout
    expected = [(str(n), line.rsplit("# ", 1)[1]) for n, line in enumerate(WRONG.split("\n"), 1) if "  # " in line]
    assert sorted((line, code) for _, line, code in errors) == sorted(expected), done.stdout
