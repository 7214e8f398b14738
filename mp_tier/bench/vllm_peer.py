"""The tiers under comparison, opened through vLLM 0.33's own interface: its FS tier (C or Python I/O) and mp_tier's adapter.

Both get what vLLM's tiering manager gives a secondary tier: a
``SharedOffloadRegion`` under /dev/shm as the primary memory and
``TransferJob``s. vLLM's io module picks its C batch I/O (``vllm.fs_io_C``)
at import when it loads, and reads the flag ``_HAS_FSIO_C`` at every call:
the Python column clears that flag (and the lookup's) while its tier is open.
vLLM is imported here only inside functions: it takes seconds and hundreds of
MB, and a forkserver child re-imports the tool that uses this module.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mp_tier

from .errors import UsageError
from .vllm_targets import MP, VLLM_C, VLLM_PY

KINDS = (VLLM_C, VLLM_PY, MP)  # how a column's tier is opened; a variant is opened as MP with its settings


@dataclass
class Column:
    """One tier in the table: vLLM C, vLLM Python, mp_tier's default, or an mp_tier variant with its settings."""

    name: str
    kind: str  # one of KINDS
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tier:
    """One open tier as the driver sees it: the calls a scheduler makes, and what the bench needs to know.

    ``make_job`` builds the job object outside the timed submit, as vLLM's
    manager builds its ``TransferJob`` before calling the tier.
    """

    submit_store: Callable[[Any], None]
    submit_load: Callable[[Any], None]
    poll: Callable[[], Iterable[Any]]  # results with .job_id and .success
    drain: Callable[[], None]
    shutdown: Callable[[], None]
    make_job: Callable[[int, list[bytes], np.ndarray, bool], Any]
    path_of: Callable[[bytes], str]
    direct: bool
    pids: list[int]  # mp_tier's worker processes; vLLM's threads are the host's
    workers: tuple[int, int]  # read, write: threads for vLLM, processes for mp_tier


def fill_random(array: np.ndarray) -> None:
    """Random bytes, so nothing below can compress them; writing also faults every page in now."""
    flat = array.reshape(-1).view(np.uint8)
    flat[:] = np.frombuffer(np.random.default_rng().bytes(flat.size), np.uint8)


class VllmApi:
    """vLLM 0.33's FS tier and mp_tier's adapter, through ``SharedOffloadRegion``, ``TransferJob`` and ``get_finished_jobs``."""

    def __init__(self, vllm_threads: tuple[int, int]) -> None:
        try:
            from vllm.v1.kv_offload.base import OffloadingKVEventsConfig, ReqContext
            from vllm.v1.kv_offload.config import OffloadingCacheConfig, OffloadingConfig, OffloadingModelConfig, OffloadingParallelConfig
            from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
            from vllm.v1.kv_offload.tiering.base import TransferJob
            from vllm.v1.kv_offload.tiering.fs import io as vllm_io
            from vllm.v1.kv_offload.tiering.fs import manager as vllm_manager
        except ImportError as e:
            raise UsageError(f"vLLM 0.33's tiering code does not import here ({e}); run in the venv .ci/vllm-compat builds") from None
        if not vllm_io._HAS_FSIO_C:
            raise UsageError(
                "vLLM's C batch I/O (vllm.fs_io_C) does not load here, and it is the path vLLM users run: build it from the "
                "0.33.0 sdist's csrc/fs_io.cpp as .ci/vllm-compat does"
            )
        from mp_tier.vllm_tier import MpFileSystemTierManager

        self._io, self._manager = vllm_io, vllm_manager
        self._region_class, self._job_class = SharedOffloadRegion, TransferJob
        self._mp_tier = MpFileSystemTierManager
        self._threads = vllm_threads
        self._context = ReqContext(req_id="vllm-bench")
        parallel = OffloadingParallelConfig(
            rank=0,
            world_size=1,
            tp_size=1,
            pp_size=1,
            pcp_size=1,
            dcp_size=1,
            data_parallel_index=0,
            data_parallel_size=1,
            data_parallel_rank_local=None,
            is_parallelism_agnostic=False,
        )
        config = OffloadingConfig(
            groups=(),
            worker_kv_bytes_per_block=0,
            enable_kv_cache_events=False,
            extra_config={},
            engine_id="vllm-bench",
            model=OffloadingModelConfig(name="mp-tier/vllm-bench", dtype="bfloat16"),
            cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
            parallel=parallel,
            replicated_layout=False,
        )
        # What a secondary tier reads of vLLM's OffloadingSpec (an abstract class whose subclasses need a
        # whole engine config): its normalized OffloadingConfig, blocks_per_chunk and the events switch.
        self._spec = argparse.Namespace(
            config=config,
            blocks_per_chunk=1,
            kv_events_config=OffloadingKVEventsConfig(enable_kv_cache_events=False, self_describing_kv_events=False),
        )

    def describe(self) -> str:
        version = importlib.import_module("vllm").__version__
        read, write = self._threads
        return (
            f"vLLM {version} FileSystemTierManager, {read}+{write} threads, on its fs_io_C extension ({VLLM_C}) and forced onto "
            f"its pure-Python fallback ({VLLM_PY}); mp_tier {mp_tier.__version__} MpFileSystemTierManager, default config ({MP})"
        )

    @contextmanager
    def memory(self, chunks: int, block: int) -> Iterator[Any]:
        """vLLM's own primary memory: a MAP_SHARED file under /dev/shm, random bytes, unlinked at the end."""
        region = self._region_class(f"vllm-bench-{uuid.uuid4().hex[:12]}", chunks, None, block, os.sysconf("SC_PAGESIZE"))
        try:
            view = region.create_kv_memoryview()
            fill_random(np.asarray(view))
            yield view
            del view
        finally:
            gc.collect()  # the tiers' references to the view go first, so the mapping can close
            region.cleanup()

    def _set_c_path(self, on: bool) -> None:
        """vLLM's I/O and lookups on its C extension (on) or their pure-Python fallbacks: read at every call."""
        self._io._HAS_FSIO_C = self._manager._HAS_BATCH_LOOKUP_C = on

    def open(self, column: Column, view: Any, root: str) -> Tier:
        if column.kind == MP:
            mp = self._mp_tier(self._spec, view, "MpFileSystemTierManager", root_dir=root, **column.settings)
            info = mp.config_info()
            workers = (int(info["read_workers"]), int(info["write_workers"]))
            return self._wrap(mp, mp.shutdown, mp._tier.direct, mp._tier.worker_pids(), workers)
        read, write = self._threads
        self._set_c_path(column.kind == VLLM_C)
        try:
            tier = self._manager.FileSystemTierManager(self._spec, view, "fs", root, n_read_threads=read, n_write_threads=write)
        except BaseException:
            self._set_c_path(True)
            raise

        def shutdown() -> None:
            try:
                tier.shutdown()
            finally:
                self._set_c_path(True)

        return self._wrap(tier, shutdown, tier._use_o_direct, [], self._threads)

    def _wrap(self, tier: Any, shutdown: Callable[[], None], direct: bool, pids: list[int], workers: tuple[int, int]) -> Tier:
        job_class, context = self._job_class, self._context

        def make_job(job_id: int, keys: list[bytes], chunk_ids: np.ndarray, load: bool) -> Any:
            return job_class(job_id=job_id, keys=keys, chunk_ids=chunk_ids, is_promotion=load, req_context=context)

        return Tier(
            tier.submit_store,
            tier.submit_load,
            tier.get_finished_jobs,
            tier.drain_jobs,
            shutdown,
            make_job,
            tier.file_mapper.get_file_name,
            bool(direct),
            pids,
            workers,
        )
