"""vLLM's own test_fs_tier.py, run against mp_tier's adapter. ``.ci/vllm-compat`` copies this file, as
conftest.py, into the tiering tests it extracts from vLLM's source distribution; nothing of vLLM's is edited.

pytest imports a directory's conftest before its test modules, so the name the tests import (and the one
vLLM's factory resolves for ``"type": "fs"``) is rebound to the adapter first.

vLLM's tests hand the tier a torch tensor in private memory, which no worker process can map; here the
tier opts into mp_tier's thread engine for it, explicitly, as a deployment with such memory would.
mp_tier's own adapter tests (tests/test_vllm_tier.py) run the process engine on vLLM's real shared
region. Deselected: the tests that reach into private parts of vLLM's own class, each with why.
"""

from __future__ import annotations

from typing import Any

import pytest
import vllm.v1.kv_offload.tiering.fs.manager as fs_manager

from mp_tier.vllm_tier import MpFileSystemTierManager


class MpTierOnPrivateMemory(MpFileSystemTierManager):
    """The adapter, with the thread engine chosen for the tests' private tensors."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("engine", "threads")
        super().__init__(*args, **kwargs)


fs_manager.FileSystemTierManager = MpTierOnPrivateMemory

_INJECTS_STORE_FAILURES = "injects failures by patching fs.manager.batch_store_block, which only vLLM's class calls"
WHITE_BOX = {
    "test_shutdown_discards_pending_tasks": "reads vLLM's thread pool (_pool._load_q, _pool._store_q, _pool._threads)",
    "test_store_load_roundtrip_without_o_direct": "patches fs.manager.probe_o_direct, which only vLLM's class calls, and reads _use_o_direct",
    "test_mixed_job_results_emit_event_only_for_successful_job": _INJECTS_STORE_FAILURES,
    "test_partially_failed_store_emits_no_event": _INJECTS_STORE_FAILURES,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    white_box = [item for item in items if getattr(item, "originalname", item.name) in WHITE_BOX]
    if white_box:
        config.hook.pytest_deselected(items=white_box)
        items[:] = [item for item in items if item not in white_box]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.section("deselected: white-box tests of vLLM's own class")
    for name, why in WHITE_BOX.items():
        terminalreporter.write_line(f"{name}: {why}")
