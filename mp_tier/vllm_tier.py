"""mp_tier inside vLLM 0.33: a secondary tier for ``TieringOffloadingSpec``, importable where vLLM is.

Select it with one entry of ``secondary_tiers`` in ``--kv-transfer-config``,
by class and module::

    {"type": "MpFileSystemTierManager", "module_path": "mp_tier.vllm_tier", "root_dir": "/mnt/kv"}

or, with mp_tier installed as a package, by the name ``"mp_fs"`` that its
``vllm.general_plugins`` entry point registers. Every other key of the entry
is a setting: vLLM's FS-tier names (``n_read_threads``, ``n_write_threads``,
``enable_kv_events``, ``locality``), any ``TierConfig`` field (``max_bytes``,
``checksum``, ``o_direct``, ``engine``, ...; ``events`` is ``enable_kv_events``),
or ``config_file``, a TOML preset; ``MP_TIER_*`` variables apply too. A bad
value is refused naming the key the entry wrote, before anything is created.

What vLLM hands a tier, and what it gets back (docs/vllm.md has the whole of it):

* Memory: vLLM's own shared mapping, which the workers map through its file
  (no copy); a view over private memory is refused unless ``"engine": "threads"``.
* Disk: vLLM's ``FileMapper`` names the namespace directory, and vLLM's
  ``config.json`` sits beside it, so each tier reads what the other wrote.
* Lookups: from the tier's memory first (a store in flight is RETRY, "being
  transferred"), then through vLLM's own ``AsyncLookupManager`` on disk.
* Results: one per job, refused jobs included, as failed results; a failed
  promotion reports the prefix it loaded, as vLLM's FS tier does.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import weakref
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats
from vllm.v1.kv_offload.base import (
    ConfigInfoMapping,
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadingMetricMetadata,
    OffloadKey,
    ReqContext,
)
from vllm.v1.kv_offload.file_mapper import FileMapper
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector
from vllm.v1.kv_offload.tiering.base import (
    JobResult,
    RequestOffloadingContext,
    ScheduleEndContext,
    SecondaryTierManager,
    TransferJob,
)
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory

from .config import FILE_MODES, THREAD_NAMES, TierConfig, with_settings
from .errors import TierBroken
from .jobs import JobMetadata
from .layout import rank_dir
from .namespace import OtherRun, write_once
from .tier import FileSystemTierManager
from .validation import KEY_RULE, is_key

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec

log = logging.getLogger(__name__)

PLUGIN_NAME = "mp_fs"
_COUNTERS = {  # metric -> (TierStats field, what it counts)
    "mp_tier_workers_restarted": ("workers_restarted", "Worker processes of mp_tier replaced after they died."),
    "mp_tier_tasks_timed_out": ("tasks_timed_out", "Tasks whose worker mp_tier killed for outliving task_timeout."),
    "mp_tier_blocks_evicted": ("blocks_evicted", "Blocks mp_tier deleted to keep its byte budget."),
    "mp_tier_blocks_skipped": ("blocks_skipped", "Blocks mp_tier did not write because a whole copy was on disk."),
    "mp_tier_files_removed": ("files_removed", "Stale temp files and corrupt blocks mp_tier removed."),
}
_GAUGES = {
    "mp_tier_bytes_counted": ("bytes_counted", "Bytes of blocks mp_tier counts against its budget."),
    "mp_tier_workers_alive": ("workers_alive", "Worker processes of mp_tier alive."),
    "mp_tier_tasks_queued": ("tasks_queued", "mp_tier tasks held on the host because a pipe was full."),
}
_CONFIG_INFO = ("engine", "read_workers", "write_workers", "o_direct", "max_bytes", "checksum")
_VLLM_KEYS = {**THREAD_NAMES, "enable_kv_events": "events"}


class _DiskLookups(AsyncLookupManager):
    """vLLM's asynchronous lookups, answered on its lookup thread by a path lookup in the tier (thread-safe).
    It holds the tier weakly: its thread, which waits on a queue for ever, would keep a dropped adapter's tier alive."""

    def __init__(self, tier: FileSystemTierManager, tier_type: str):
        self._tier = weakref.ref(tier)
        super().__init__(tier_type)

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        tier = self._tier()
        return [tier is not None and tier.lookup(key) is True for key in keys]  # None: the adapter was dropped


class MpFileSystemTierManager(SecondaryTierManager):
    """A file-system tier whose block I/O runs in mp_tier's worker processes, not in vLLM's scheduler."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: BackpressureDetector | None = None,
        *,
        root_dir: str,
        locality: str | None = None,
        config_file: str | None = None,
        **settings: Any,
    ):
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality is not None else None
        config = with_settings(TierConfig.from_toml(config_file) if config_file else TierConfig.from_env(), settings, _VLLM_KEYS, tier_type, "vLLM's")
        self.events: list[OffloadingEvent] | None = None  # None: events are off
        if config.events:
            if offloading_spec.kv_events_config.enable_kv_cache_events:
                self.events = []
            else:
                log.warning("events are asked for on tier %r but KV cache events are off globally: no events", tier_type)
        self.file_mapper = FileMapper.from_offloading_spec(
            root_dir=root_dir, offloading_spec=offloading_spec, blocks_per_file=offloading_spec.blocks_per_chunk, parallel_agnostic=True
        )
        config = msgspec.structs.replace(config, root_dir=os.path.dirname(self.file_mapper.base_path), events=self.events is not None)
        self._tier = self._open_tier(primary_kv_view, config)  # first: a cache it refuses leaves the root as it was
        _publish_run_config(self.file_mapper, config)  # if this raises, the tier dropped with this object stops
        self._lookup_manager = _DiskLookups(self._tier, tier_type)
        self._stop_lookups = weakref.finalize(self, self._lookup_manager.shutdown)  # its thread, if shutdown() never is
        self._jobs: dict[int, tuple[TransferJob, bool]] = {}  # submitted (and whether a load), result not yet handed to vLLM
        self._store_job_keys: dict[int, list[OffloadKey]] = {}  # store jobs whose success becomes an event
        self._refused: list[JobResult] = []  # jobs refused at submit: their results go out with the next poll
        self._loading: collections.Counter[OffloadKey] = collections.Counter()  # keys of promotions in flight
        self._told: dict[OffloadKey, set[str]] = {}  # keys answered HIT from memory -> the requests told so
        self._asked: dict[str, set[OffloadKey]] = {}  # the same, by request, to forget them when it finishes
        self._missed: dict[str, set[OffloadKey]] = {}  # per request: keys a failed promotion made misses for it
        self._reported = self._tier.stats()  # counters as last reported to get_stats()

    def _open_tier(self, primary_kv_view: memoryview, config: TierConfig) -> FileSystemTierManager:
        """The tier in vLLM's directory for this rank, or beside it if that one holds blocks of another size."""
        name, rank = os.path.basename(self.file_mapper.base_path), self.file_mapper.rank
        try:
            return FileSystemTierManager(primary_kv_view=primary_kv_view, config=config, namespace=rank_dir(name, rank))
        except OtherRun as e:
            if set(e.recorded) != {"block_bytes"}:  # not a run of this kind: refused, as any other
                raise
        return FileSystemTierManager(primary_kv_view=primary_kv_view, config=config, namespace=rank_dir(f"{name}_bs{self.block_size_bytes}", rank))

    # -- lookups ------------------------------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        if not is_key(key):  # vLLM's own tier finds no file for such a key: a miss, never an exception in its step
            log.warning("lookup of %.80r, which is not %s: a miss", key, KEY_RULE)
            return LookupResult.MISS
        if key in self._missed.get(req_context.req_id, ()):
            return LookupResult.MISS
        known = self._tier.lookup_many([key], probe=False)[0]
        if known and key not in self._loading:  # while a load of it runs, the disk is the better witness
            self._told.setdefault(key, set()).add(req_context.req_id)
            self._asked.setdefault(req_context.req_id, set()).add(key)
            return LookupResult.HIT
        if known is None:
            return LookupResult.RETRY  # a store of it is in flight: "being transferred"
        verdict = self._lookup_manager.lookup(key, req_context)
        return LookupResult.RETRY if verdict is None else LookupResult.HIT if verdict else LookupResult.MISS

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Keys that are not the tier's are left out, as vLLM's own tier has no file of theirs to touch."""
        self._tier.touch([key for key in keys if is_key(key)])

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookup_manager.cleanup(req_context.req_id)
        self._missed.pop(req_context.req_id, None)
        for key in self._asked.pop(req_context.req_id, ()):
            told = self._told[key]
            told.discard(req_context.req_id)
            if not told:
                del self._told[key]

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookup_manager.flush()

    # -- transfers ------------------------------------------------------------------

    def submit_store(self, job_metadata: TransferJob) -> None:
        if self._submit(job_metadata, loading=False) and self.events is not None:
            self._store_job_keys[job_metadata.job_id] = list(job_metadata.keys)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, loading=True)

    def _submit(self, job: TransferJob, loading: bool) -> bool:
        """Hand ``job`` to the tier; False if it refused it.

        A job the tier refuses (an out-of-range chunk id, a malformed key) fails
        through its result, as in vLLM's FS tier; only a job id still in
        flight, which vLLM never reuses, raises.
        """
        if job.job_id in self._jobs:
            raise ValueError(f"job_id {job.job_id} is still active")
        metadata = JobMetadata(job_id=job.job_id, keys=list(job.keys), block_ids=job.chunk_ids, is_promotion=job.is_promotion)
        try:
            (self._tier.submit_load if loading else self._tier.submit_store)(metadata)
        except ValueError as e:
            log.warning("tier %s: job %d refused: %s", self.tier_type, job.job_id, e)
            self._refused.append(JobResult(job.job_id, False, None, 0.0, self._job_bytes(job)))
            return False
        self._jobs[job.job_id] = (job, loading)
        if loading:
            self._loading.update(job.keys)
        return True

    def get_finished_jobs(self) -> Iterable[JobResult]:
        finished, self._refused = self._refused, []
        try:
            results = self._tier.get_finished()
        except TierBroken:
            if not finished:
                raise
            results = []  # the refused jobs' results first, as a broken tier hands out its own before it raises
        for result in results:
            job, loading = self._jobs.pop(result.job_id)
            if loading:
                for key in job.keys:  # keys that reach zero go, so membership stays exact
                    if left := self._loading[key] - 1:
                        self._loading[key] = left
                    else:
                        del self._loading[key]
            if not result.success:  # vLLM's JobResult has no field for the code: its log carries it
                log.warning("tier %s: job %d failed (%s): %s", self.tier_type, job.job_id, result.error_code, result.error)
            successful_keys = self._loaded_prefix(job, result.successful_keys) if loading else None
            stored = self._store_job_keys.pop(job.job_id, None)
            if stored is not None and result.success and self.events is not None:
                self.events.append(OffloadingEvent(keys=stored, medium=Medium.STORAGE, removed=False, locality=self.locality))
            finished.append(JobResult(job.job_id, result.success, successful_keys, result.transfer_time, self._job_bytes(job)))
        return finished

    def _loaded_prefix(self, job: TransferJob, successful: tuple[bytes, ...] | None) -> tuple[OffloadKey, ...] | None:
        """What vLLM's FS tier reports for a failed load: the keys loaded before the first failure (None if
        none). The keys from the first failure on become misses for every request that was told they were
        there, as vLLM's cached verdicts do, so no request asks for the doomed promotion again; a new request
        looks again."""
        if successful is None:
            return None
        keys = list(job.keys)
        loaded = set(successful)
        cut = next((i for i, key in enumerate(keys) if key not in loaded), len(keys))
        self._lookup_manager.mark_miss(keys[cut:])
        for key in keys[cut:]:
            for request in {job.req_context.req_id, *self._told.get(key, ())}:
                self._missed.setdefault(request, set()).add(key)
        return tuple(keys[:cut]) or None

    def _job_bytes(self, job: TransferJob) -> int | None:
        """What vLLM's FS tier reports, and its backpressure detector expects: the job's size (None if empty)."""
        return len(job.keys) * self.block_size_bytes if len(job.keys) else None

    def has_pending_work(self) -> bool:
        return bool(self._jobs or self._refused)

    def drain_jobs(self) -> None:
        """Returns once no worker touches the primary memory; every result waits for ``get_finished_jobs``."""
        self._tier.drain(None)

    def take_events(self) -> Iterable[OffloadingEvent]:
        if self.events is None:
            return ()
        for event in self._tier.take_events():
            if event.kind == "removed":  # stores become events from their results, in job order
                self.events.append(OffloadingEvent(keys=list(event.keys), medium=Medium.STORAGE, removed=True, locality=self.locality))
        events, self.events = self.events, []
        return events

    def shutdown(self) -> None:
        self._stop_lookups()
        self._tier.shutdown()

    # -- metrics --------------------------------------------------------------------

    @classmethod
    def build_metric_definitions(cls, extra_config: dict[str, Any]) -> dict[str, OffloadingMetricMetadata]:
        metrics: dict[str, OffloadingMetricMetadata] = {name: OffloadingCounterMetadata(doc) for name, (_, doc) in _COUNTERS.items()}
        metrics.update({name: OffloadingGaugeMetadata(doc) for name, (_, doc) in _GAUGES.items()})
        return metrics

    def get_stats(self) -> OffloadingConnectorStats | None:
        """Counter increments since the last call, and the gauges now."""
        now, before = self._tier.stats(), self._reported
        self._reported = now
        stats = OffloadingConnectorStats()
        for name, (field, _) in _COUNTERS.items():
            if delta := getattr(now, field) - getattr(before, field):
                stats.increase_counter(name, delta)
        for name, (field, _) in _GAUGES.items():
            stats.set_gauge(name, getattr(now, field))
        return stats

    @classmethod
    def config_info_keys(cls, tier_config: dict[str, Any]) -> tuple[str, ...]:
        return _CONFIG_INFO

    def config_info(self) -> ConfigInfoMapping:
        config = self._tier.config
        return dict(
            zip(
                _CONFIG_INFO,
                (config.engine, config.n_read_workers, config.n_write_workers, config.o_direct, config.max_bytes, config.checksum),
                strict=True,
            )
        )


def _publish_run_config(file_mapper: FileMapper, config: TierConfig) -> None:
    """vLLM's ``config.json`` beside the rank directories, as its FS tier writes it, but once and durably."""
    directory = file_mapper.base_path
    try:
        os.makedirs(directory, mode=FILE_MODES[config.file_mode][1], exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"root_dir for {directory!r} is not usable: {e.strerror}", e.filename) from None
    try:
        text = json.dumps(file_mapper.get_run_config(), indent=2, sort_keys=True)
        write_once(fd, os.path.basename(file_mapper.get_config_file_path()), text.encode(), FILE_MODES[config.file_mode][0])
    finally:
        os.close(fd)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: ``"type": "mp_fs"`` selects this tier.

    vLLM calls it once per process (engine core, workers, argument parsing);
    a second call, or a process that registered it already, changes nothing.
    """
    try:
        SecondaryTierFactory.register_tier(PLUGIN_NAME, __name__, MpFileSystemTierManager.__name__)
    except ValueError:
        pass  # registered already

