"""The worker side stays small: a worker process imports no numpy and no module of the host's side."""

from __future__ import annotations

import json
import subprocess
import sys

from mp_tier.interpreter import PATHS, environment

# The host's side: what a worker must never load (each would cost its boot, and could pull in numpy).
HOST_SIDE = {
    "bench", "capacity", "config", "coordinator", "errors", "janitor", "jobs", "ledger", "pool", "recovery",
    "reentry", "residency", "shared_cache", "tier", "validation", "vllm_tier", "wiring", "workers",
}  # fmt: skip


def test_a_worker_imports_no_numpy_and_no_host_module():
    code = f"import sys, json; del sys.path[0]; sys.path += {PATHS!r}; import mp_tier.worker_process; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-S", "-c", code], env=environment(), capture_output=True, text=True, timeout=30, check=True)
    modules = json.loads(done.stdout)
    assert "mp_tier.worker_process" in modules and "mp_tier.block_io" in modules, "the check saw the worker's imports"
    assert [m for m in modules if m.split(".")[0] in ("numpy", "torch", "vllm")] == []
    assert sorted(HOST_SIDE & {m.split(".")[1] for m in modules if m.startswith("mp_tier.")}) == []
