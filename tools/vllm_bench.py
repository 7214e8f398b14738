"""vLLM 0.33's own file-system tier against mp_tier's adapter, driven through the very same vLLM calls.

    /work/venv-vllm/bin/python tools/vllm_bench.py                     # 2m, 256k, 16k blocks, 3 rounds
    /work/venv-vllm/bin/python tools/vllm_bench.py --sizes 2m --variant direct-off:o_direct=off --json out.json

Both tiers get what vLLM's tiering manager gives a secondary tier: a
``SharedOffloadRegion`` under /dev/shm as the primary memory, ``TransferJob``s
of ``--blocks-per-job`` chunks through ``submit_store``/``submit_load``,
``get_finished_jobs()`` polled by a host that runs pure-Python work for
``--spin-us`` between polls (a scheduler holds the GIL that way), and
``drain_jobs()``. One run, one root, vLLM's ``FileMapper`` layout for both,
engines interleaved and their order reversed every other round, because the
disk's speed drifts on a shared VM. Every figure is a median over ``--rounds``.

Per block size it reports store and cold-load GB/s (the files are dropped
from the page cache before each load phase and checked with mincore; ``NOT
COLD`` if that failed), host busy/idle while storing (busy-loop speed with the
tier working / with it idle), the ``submit_store`` call alone (p50/p99), and
the ceiling of the same run: plain pwrite/preadv loops in as many processes
as mp_tier has workers (``mp_tier.bench.raw``). ``--variant NAME:key=value,...``
adds an mp_tier column whose adapter gets those settings as keyword arguments.
It also times a fresh adapter from its constructor to the first store's
result, with vLLM imported in the host.

A phase moves ``--total`` bytes (at most ``--max-blocks`` blocks), or stops
submitting after ``--seconds`` and waits at most as long again for the jobs in flight: a tier that all but stops
under a busy host is measured, not waited for. GB/s counts completed jobs over
the time from the first submit to the last result (or to that cut-off).

Without vLLM importable, the baseline column is mp_tier's own thread engine
(``engine = "threads"``) through mp_tier's ``FileSystemTierManager`` API, and
the header says so. vLLM is imported only inside functions: the raw
baseline's forkserver re-imports this script, which must stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

import mp_tier
from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
from mp_tier.bench.case import Case, Settings
from mp_tier.bench.driver import Spinner, calibrate_spin
from mp_tier.bench.errors import UsageError
from mp_tier.bench.keys import Keys
from mp_tier.bench.page_cache import drop_page_cache
from mp_tier.bench.raw import raw_run
from mp_tier.bench.records import GB, Dist
from mp_tier.bench.root_dir import cleanup, fs_type, prepare_root
from mp_tier.bench.tier_runs import settle, worker_cpu_seconds
from mp_tier.bench.units import parse_positive, parse_size, parse_workers, size_label

SCHEMA = "mp_tier.vllm_bench/1"
BASELINE = "baseline"  # the column kind of vLLM's tier (or, without vLLM, mp_tier's thread engine)
TIMEOUT = 120.0  # seconds any single wait may take before the run is declared stuck


# -- what the driver drives ------------------------------------------------------------


@dataclass
class Column:
    """One tier configuration in the table: the baseline, mp_tier, or an mp_tier variant with its settings."""

    name: str
    kind: str  # BASELINE or "mp"
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
    pids: list[int]


class VllmApi:
    """The tiers through vLLM 0.33's interface: ``SharedOffloadRegion`` memory, ``TransferJob``, ``get_finished_jobs``.

    The imports happen here, not at module level: they take seconds and
    hundreds of MB, and a forkserver child re-imports this script.
    """

    baseline = "vLLM threads"

    def __init__(self) -> None:
        from vllm.v1.kv_offload.base import OffloadingKVEventsConfig, ReqContext
        from vllm.v1.kv_offload.config import OffloadingCacheConfig, OffloadingConfig, OffloadingModelConfig, OffloadingParallelConfig
        from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
        from vllm.v1.kv_offload.tiering.base import TransferJob
        from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager as VllmFsTier

        from mp_tier.vllm_tier import MpFileSystemTierManager

        self._region_class = SharedOffloadRegion
        self._job_class = TransferJob
        self._vllm_tier = VllmFsTier
        self._mp_tier = MpFileSystemTierManager
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
        try:
            importlib.import_module("vllm.fs_io_C")
            path = "its fs_io_C extension imported: C I/O path"
        except ImportError as e:
            path = f"pure-Python I/O path: its CUDA-linked fs_io_C extension does not load here ({e})"
        return f"vLLM {version} FileSystemTierManager ({path}) vs mp_tier {mp_tier.__version__} MpFileSystemTierManager"

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

    def open(self, column: Column, view: Any, root: str, args: argparse.Namespace) -> Tier:
        if column.kind == BASELINE:
            read, write = args.vllm_threads
            tier = self._vllm_tier(self._spec, view, "fs", root, n_read_threads=read, n_write_threads=write)
            direct, pids = tier._use_o_direct, []
        else:
            tier = self._mp_tier(self._spec, view, "MpFileSystemTierManager", root_dir=root, **worker_settings(column, args.workers, "threads"))
            direct, pids = tier._tier.direct, tier._tier.worker_pids()
        job_class, context = self._job_class, self._context

        def make_job(job_id: int, keys: list[bytes], chunk_ids: np.ndarray, load: bool) -> Any:
            return job_class(job_id=job_id, keys=keys, chunk_ids=chunk_ids, is_promotion=load, req_context=context)

        return Tier(
            tier.submit_store,
            tier.submit_load,
            tier.get_finished_jobs,
            tier.drain_jobs,
            tier.shutdown,
            make_job,
            tier.file_mapper.get_file_name,
            direct,
            pids,
        )


class MpApi:
    """Without vLLM: mp_tier's own ``FileSystemTierManager`` API, the baseline its thread engine."""

    baseline = "mp_tier threads"

    def describe(self) -> str:
        return (
            f"vLLM is not importable here: the baseline is mp_tier {mp_tier.__version__}'s thread engine "
            "(the vLLM-style GIL-bound pool) through mp_tier's own API, not vLLM's FS tier"
        )

    @contextmanager
    def memory(self, chunks: int, block: int) -> Iterator[Any]:
        """mp_tier's own shared primary cache, random bytes, unlinked at the end."""
        cache = PrimaryCache.create(num_blocks=chunks, block_bytes=block)
        try:
            fill_random(cache.array)
            yield cache
        finally:
            gc.collect()
            cache.close()

    def open(self, column: Column, view: Any, root: str, args: argparse.Namespace) -> Tier:
        if column.kind == BASELINE:
            read, write = args.vllm_threads
            tier = FileSystemTierManager(primary_kv_view=view, root_dir=root, n_read_workers=read, n_write_workers=write, engine="threads")
        else:
            settings = worker_settings(column, args.workers, "workers")
            counts = {k: settings.pop(k) for k in ("n_read_workers", "n_write_workers") if k in settings}
            config = msgspec.structs.replace(TierConfig.from_env(), **settings)  # its __post_init__ checks every value
            tier = FileSystemTierManager(primary_kv_view=view, root_dir=root, config=config, **counts)

        def make_job(job_id: int, keys: list[bytes], chunk_ids: np.ndarray, load: bool) -> Any:
            return JobMetadata(job_id=job_id, keys=keys, block_ids=chunk_ids, is_promotion=load)

        return Tier(
            tier.submit_store,
            tier.submit_load,
            tier.get_finished,
            lambda: tier.drain(None),
            tier.shutdown,
            make_job,
            tier.block_path,
            tier.direct,
            tier.worker_pids(),
        )


def load_api() -> VllmApi | MpApi:
    """vLLM's interface where vLLM imports; mp_tier's own otherwise."""
    if importlib.util.find_spec("vllm") is None:
        return MpApi()
    return VllmApi()


def worker_settings(column: Column, workers: tuple[int, int], style: str) -> dict[str, Any]:
    """The column's settings plus ``--workers``, unless the variant sets the counts itself.

    ``style`` "threads" spells the counts as vLLM does (``n_read_threads``), which
    the adapter maps to mp_tier's workers; an explicit ``n_read_workers`` in a
    variant would otherwise lose to them.
    """
    settings = dict(column.settings)
    names = {"threads": ("n_read_threads", "n_write_threads"), "workers": ("n_read_workers", "n_write_workers")}[style]
    for name, count, own in zip(names, workers, ("n_read_workers", "n_write_workers")):
        if own not in settings and name not in settings:
            settings[name] = count
    return settings


def fill_random(array: np.ndarray) -> None:
    """Random bytes, so nothing below can compress them; writing also faults every page in now."""
    flat = array.reshape(-1).view(np.uint8)
    flat[:] = np.frombuffer(np.random.default_rng().bytes(flat.size), np.uint8)


# -- one phase, as a scheduler drives it ------------------------------------------------


@dataclass
class Phase:
    """One direction (store or cold load) of one tier's run, as the host saw it."""

    gbps: float
    bytes: int
    blocks: int
    wall_s: float
    jobs: int
    failed_jobs: int
    time_limited: bool  # stopped submitting at --seconds before its last job
    cut_short: bool  # gave up at twice --seconds with jobs still in flight
    busy_idle: float | None
    idle_loop_rate: float | None
    submit_us: Dist | None
    job_ms: Dist | None
    host_cpu_s_per_gb: float | None  # host CPU less the busy loop's; vLLM's threads are the host's
    worker_cpu_s_per_gb: float | None
    cache_drop: str | None = None


def run_phase(
    tier: Tier, load: bool, jobs: Sequence[list[bytes]], slots: Sequence[np.ndarray], ids: Iterator[int], args: argparse.Namespace
) -> Phase:
    """Keep ``len(slots)`` jobs in flight, poll every step and spin between polls; only the submit call is timed."""
    spinner = Spinner(args.spin_chunk)
    idle = args.idle_seconds
    spinner.measure_idle(tier.poll, idle)
    submit = tier.submit_load if load else tier.submit_store
    todo = iter(jobs)
    free = list(range(len(slots)))
    pending: dict[int, tuple[int, int, int]] = {}  # job id -> slot, blocks, submit time (ns)
    submit_ns: list[int] = []
    latency_ns: list[int] = []
    blocks = failed = 0
    exhausted = cut = limited = False
    cpu0, wcpu0 = time.process_time(), worker_cpu_seconds(tier.pids)
    t0 = time.perf_counter_ns()
    stop_submitting = t0 + int(args.seconds * 1e9)
    give_up = stop_submitting + int(args.seconds * 1e9)
    last = t0
    while True:
        while free and not exhausted and time.perf_counter_ns() < stop_submitting:
            keys = next(todo, None)
            if keys is None:
                exhausted = True
                break
            slot = free.pop()
            job = tier.make_job(next(ids), keys, slots[slot][: len(keys)], load)
            start = time.perf_counter_ns()
            submit(job)
            submit_ns.append(time.perf_counter_ns() - start)
            pending[job.job_id] = (slot, len(keys), start)
        results = tier.poll()
        now = time.perf_counter_ns()
        for result in results:
            slot, n, start = pending.pop(result.job_id)
            free.append(slot)
            latency_ns.append(now - start)
            last = now
            if result.success:
                blocks += n
            else:
                failed += 1
        if not exhausted and now >= stop_submitting:
            limited = True
        if not pending and (exhausted or limited):
            break
        if now >= give_up:
            cut, last = True, now
            break
        if spinner.chunk:
            spinner.slice()
        else:
            time.sleep(0.0002)  # --spin-us 0: a host with nothing else to do
    host_cpu = time.process_time() - cpu0 - spinner.busy_cpu
    worker_cpu = worker_cpu_seconds(tier.pids) - wcpu0 if tier.pids else None
    if pending:
        tier.drain()  # the rest finishes untimed, the host asleep in drain_jobs()
        list(tier.poll())
    spinner.measure_idle(tier.poll, idle)
    wall = (last - t0) / 1e9
    nbytes = blocks * args.block
    gb = nbytes / GB
    return Phase(
        gbps=gb / wall if wall > 0 else 0.0,
        bytes=nbytes,
        blocks=blocks,
        wall_s=wall,
        jobs=len(submit_ns),
        failed_jobs=failed,
        time_limited=limited,
        cut_short=cut,
        busy_idle=spinner.busy_idle(),
        idle_loop_rate=spinner.rate("idle"),
        submit_us=Dist.of(submit_ns, 1e-3),
        job_ms=Dist.of(latency_ns, 1e-6),
        host_cpu_s_per_gb=host_cpu / gb if gb else None,
        worker_cpu_s_per_gb=worker_cpu / gb if worker_cpu is not None and gb else None,
    )


def limit_note(phase: Phase) -> str:
    return " (cut off with jobs in flight)" if phase.cut_short else f" ({phase.blocks} blocks by the time limit)" if phase.time_limited else ""


def remove_blocks(paths: Iterable[str]) -> None:
    """Unlink a run's block files and the directories that held only them.

    Every run then starts from the same directory tree: a new leaf directory
    costs a store ~0.25 ms here, so runs that inherit another's directories
    would look faster than they are.
    """
    dirs = set()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        dirs.add(os.path.dirname(path))
    for leaf in dirs:
        for d in (leaf, os.path.dirname(leaf)):
            try:
                os.rmdir(d)  # only if empty: staged blocks and other runs' files stay
            except OSError:
                pass


# -- the run --------------------------------------------------------------------------


@dataclass
class SizeRuns:
    """Everything measured at one block size."""

    block_bytes: int
    staged_blocks: int
    tiers: list[dict[str, Any]] = field(default_factory=list)  # {round, column, direct, store: Phase, load: Phase}
    raw: list[dict[str, Any]] = field(default_factory=list)  # {round, store: RunRecord, load: RunRecord}


def schedule(columns: list[Column], rounds: int) -> list[tuple[int, Column | None]]:
    """(round, column) pairs, None for the raw baseline; every other round in reverse order."""
    order: list[Column | None] = [*columns, None]
    return [(r, c) for r in range(rounds) for c in (order if r % 2 == 0 else order[::-1])]


def stage(api: VllmApi | MpApi, view: Any, root: str, args: argparse.Namespace, slots: Sequence[np.ndarray]) -> tuple[list[list[bytes]], Tier]:
    """Store the load phases' blocks with mp_tier, untimed, the host waiting in ``drain_jobs()``.

    Returns them and the (shut down) tier that stored them, whose layout and O_DIRECT choice the raw runs follow.
    """
    keys = Keys()
    jobs = [keys.fresh(args.blocks_per_job) for _ in range(n_jobs(args))]
    tier = api.open(Column("mp_tier", "mp"), view, root, args)
    ids = itertools.count(1)
    failed = 0
    try:
        for first in range(0, len(jobs), len(slots)):
            for batch, slot in zip(jobs[first : first + len(slots)], slots):
                tier.submit_store(tier.make_job(next(ids), batch, slot, False))
            tier.drain()
            failed += sum(not r.success for r in tier.poll())
    finally:
        tier.shutdown()
    if failed:
        raise RuntimeError(f"staging under {root}: {failed} store jobs failed")
    return jobs, tier


def n_jobs(args: argparse.Namespace) -> int:
    """Jobs a phase submits at most: ``--total`` bytes and ``--max-blocks`` blocks (so small blocks stay minutes, not hours)."""
    return max(1, min(int(args.total) // args.block, args.max_blocks) // args.blocks_per_job)


def measure_size(api: VllmApi | MpApi, columns: list[Column], view: Any, root: str, args: argparse.Namespace) -> SizeRuns:
    """Every column and the raw baseline at one block size, ``--rounds`` times, interleaved."""
    bpj = args.blocks_per_job
    slots = [np.arange(s * bpj, (s + 1) * bpj, dtype=np.int32) for s in range(args.inflight)]
    staged, stager = stage(api, view, root, args, slots)
    path_of, direct = stager.path_of, stager.direct
    staged_paths = [path_of(k) for keys in staged for k in keys]
    runs = SizeRuns(args.block, len(staged_paths))
    ids = itertools.count(1_000_000)  # job ids are never reused, as vLLM never reuses them
    case = Case(
        Settings(args.block, bpj, args.workers, args.inflight),
        argparse.Namespace(idle_seconds=args.idle_seconds, progress=False),
        root,
        None,
        args.spin_chunk,
        path_of,
        direct,
    )
    try:
        for rnd, column in schedule(columns, args.rounds):
            fresh = [Keys().fresh(bpj) for _ in range(n_jobs(args))]
            fresh_paths = case.paths(fresh)
            os.sync()  # the previous run's dirty pages are not this run's work
            if column is None:
                try:
                    store = raw_run(case, "store", "fresh", fresh_paths)
                finally:
                    remove_blocks(fresh_paths)
                dropped = drop_page_cache(staged_paths)
                load = raw_run(case, "load", "cold", staged_paths)
                load.cache_drop = dropped
                runs.raw.append({"round": rnd, "store": store, "load": load})
                note(args, f"{size_label(args.block)} round {rnd + 1} raw: store {store.gbps:.3f}, cold load {load.gbps:.3f} GB/s")
                continue
            tier = api.open(column, view, root, args)
            try:
                tier.drain()  # its start-up sweep and scan are not this run's work
                list(tier.poll())
                settle(tier.pids)
                store_phase = run_phase(tier, False, fresh, slots, ids, args)
                remove_blocks(fresh_paths)
                dropped = drop_page_cache(staged_paths)
                load_phase = run_phase(tier, True, staged, slots, ids, args)
                load_phase.cache_drop = dropped
                runs.tiers.append({"round": rnd, "column": column.name, "direct": tier.direct, "store": store_phase, "load": load_phase})
            finally:
                tier.shutdown()
                del tier
            note(
                args,
                f"{size_label(args.block)} round {rnd + 1} {column.name}: store {store_phase.gbps:.3f} GB/s{limit_note(store_phase)}, "
                f"cold load {load_phase.gbps:.3f} GB/s{limit_note(load_phase)}, busy/idle {fmt(store_phase.busy_idle)}",
            )
    finally:
        remove_blocks(staged_paths)
    return runs


def first_results(api: VllmApi | MpApi, columns: list[Column], view: Any, run_dir: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per column: from the constructor's start (fresh root, workers starting) to the first store job's result.

    The host polls and spins as in the runs; every tier is shut down and its
    root removed before the next, and the columns alternate their order.
    """
    bpj = args.blocks_per_job
    chunk_ids = np.arange(bpj, dtype=np.int32)
    samples: dict[str, dict[str, list[float]]] = {c.name: {"constructor_s": [], "first_result_s": []} for c in columns}
    for i in range(args.ttfr):
        for column in columns if i % 2 == 0 else columns[::-1]:
            root = os.path.join(run_dir, f"ttfr-{i}-{uuid.uuid4().hex[:8]}")
            spinner = Spinner(args.spin_chunk)
            t0 = time.perf_counter()
            tier = api.open(column, view, root, args)
            t1 = time.perf_counter()
            try:
                tier.submit_store(tier.make_job(1, Keys().fresh(bpj), chunk_ids, False))
                while not (results := list(tier.poll())):
                    if time.perf_counter() - t0 > TIMEOUT:
                        raise TimeoutError(f"{column.name}: no result {TIMEOUT:.0f} s after construction")
                    if spinner.chunk:
                        spinner.slice()
                    else:
                        time.sleep(0.0002)
                t2 = time.perf_counter()
                if not results[0].success:
                    raise RuntimeError(f"{column.name}: the first store failed: {results[0]}")
            finally:
                tier.shutdown()
                del tier
                shutil.rmtree(root, ignore_errors=True)
            samples[column.name]["constructor_s"].append(t1 - t0)
            samples[column.name]["first_result_s"].append(t2 - t0)
    return {
        name: {**s, "median_constructor_s": statistics.median(s["constructor_s"]), "median_first_result_s": statistics.median(s["first_result_s"])}
        for name, s in samples.items()
        if s["first_result_s"]
    }


def check_columns(api: VllmApi | MpApi, columns: list[Column], view: Any, run_dir: str, args: argparse.Namespace) -> None:
    """Build every column's tier once, so a bad variant setting fails now and not after minutes of runs."""
    for column in columns:
        root = os.path.join(run_dir, f"check-{uuid.uuid4().hex[:8]}")
        try:
            api.open(column, view, root, args).shutdown()
        except (TypeError, ValueError) as e:
            raise UsageError(f"column {column.name!r} {column.settings}: {e}") from None
        finally:
            shutil.rmtree(root, ignore_errors=True)


# -- the table --------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratio_cell(values: Sequence[float | None]) -> str:
    """Median of the per-round ratios, with their range."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{fmt(known[0])}x"
    return f"{fmt(statistics.median(known))}x ({fmt(min(known))}–{fmt(max(known))})"


def _pick(phase: Phase, metric: str) -> float | None:
    if metric in ("submit p50", "submit p99"):
        return None if phase.submit_us is None else phase.submit_us.p50 if metric == "submit p50" else phase.submit_us.p99
    return getattr(phase, metric)


METRICS = (  # (row label, phase, figure)
    ("store GB/s", "store", "gbps"),
    ("cold load GB/s", "load", "gbps"),
    ("host busy/idle (store)", "store", "busy_idle"),
    ("submit_store p50 µs", "store", "submit p50"),
    ("submit_store p99 µs", "store", "submit p99"),
)


def table(runs: SizeRuns, columns: list[Column]) -> tuple[list[str], dict[str, Any]]:
    """The table's rows for one block size, and the medians and ratios it shows."""
    label = size_label(runs.block_bytes)
    rounds = sorted({r["round"] for r in runs.tiers})
    by = {(r["round"], r["column"]): r for r in runs.tiers}
    raw = {r["round"]: r for r in runs.raw}
    base, mps = columns[0], columns[1:]
    lines, summary = [], {}

    def per_round(column: str, phase: str, metric: str) -> list[float | None]:
        return [_pick(by[(r, column)][phase], metric) if (r, column) in by else None for r in rounds]

    def raw_figure(phase: str, metric: str) -> list[float | None]:
        return [getattr(raw[r][phase], metric, None) if r in raw else None for r in rounds]

    for row, phase, metric in METRICS:
        cells, figures = [], {}
        for column in columns:
            value = median(per_round(column.name, phase, metric))
            figures[column.name] = value
            phases = [by[(r, column.name)][phase] for r in rounds if (r, column.name) in by]
            cut = metric == "gbps" and any(p.time_limited or p.cut_short for p in phases)
            warm = phase == "load" and any(
                (by[(r, column.name)]["load"].cache_drop or "").startswith("NOT COLD") for r in rounds if (r, column.name) in by
            )
            cells.append(fmt(value) + ("*" if cut else "") + (" NOT COLD" if warm else ""))
        raw_value = median(raw_figure(phase, metric)) if metric in ("gbps", "busy_idle") else None
        figures["raw"] = raw_value
        cells.append(fmt(raw_value))
        ratios = {}
        for column in mps:
            mine, theirs = per_round(column.name, phase, metric), per_round(base.name, phase, metric)
            per = [a / b if a is not None and b else None for a, b in zip(mine, theirs)]
            ratios[column.name] = per
            cells.append(ratio_cell(per))
        lines.append(f"| {label} | {row} | " + " | ".join(cells) + " |")
        summary[row] = {"median": figures, "ratio_to_baseline": ratios}
    for row, phase in (("store ÷ raw", "store"), ("cold load ÷ raw", "load")):
        cells, ratios = [], {}
        raw_gbps = raw_figure(phase, "gbps")
        for column in columns:
            per = [a / b if a is not None and b else None for a, b in zip(per_round(column.name, phase, "gbps"), raw_gbps)]
            ratios[column.name] = per
            cells.append(ratio_cell(per))
        cells.append("1")
        cells += [""] * len(mps)
        lines.append(f"| {label} | {row} | " + " | ".join(cells) + " |")
        summary[row] = {"ratio_to_raw": ratios}
    return lines, summary


def print_report(all_runs: list[SizeRuns], columns: list[Column], ttfr: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    head = ["block", "metric", *(c.name for c in columns), "raw", *(f"{c.name}/{columns[0].name}" for c in columns[1:])]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    summaries = {}
    for runs in all_runs:
        lines, summary = table(runs, columns)
        print("\n".join(lines))
        summaries[size_label(runs.block_bytes)] = summary
    print(
        f"\nMedians of {args.rounds} rounds; ratios: median of the per-round ratios (range). raw: pwrite/preadv loops in "
        f"{sum(args.workers)} processes, no tier. * = in some round the phase stopped submitting at the {args.seconds:g} s limit "
        "(and waited at most as long again for its jobs in flight): it moved less than the others, at the rate shown."
    )
    if ttfr:
        bpj, block = args.blocks_per_job, args.sizes[0]
        job = f"{bpj} x {size_label(block)}"
        print(f"\nTime to first result (fresh root; constructor start -> the first {job} store's result; host spinning; median of {args.ttfr}):")
        for name, t in ttfr.items():
            print(f"  {name}: {t['median_first_result_s']:.3f} s (constructor {t['median_constructor_s'] * 1e3:.0f} ms)")
    print(f"\ncommand: {shlex.join(sys.orig_argv)}")
    return summaries


def note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


# -- the command line --------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """'2m,256k,16k' -> bytes; each a multiple of the page size, as vLLM's region requires."""
    sizes = [parse_size(t) for t in text.split(",") if t.strip()]
    page = os.sysconf("SC_PAGESIZE")
    if not sizes or any(s % page for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of sizes, each a multiple of {page} bytes")
    return sizes


def parse_variant(text: str) -> Column:
    """'4x4:n_read_workers=4,n_write_workers=4' -> an mp_tier column; values are JSON where they parse (4, true, 0.5), else text."""
    name, sep, body = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:key=value,key=value (e.g. direct-off:o_direct=off)")
    settings: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not key=value")
        try:
            settings[key.strip()] = json.loads(value)
        except ValueError:
            settings[key.strip()] = value.strip()
    return Column(name.strip(), "mp", settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="vLLM 0.33's FS tier against mp_tier's adapter, through the same vLLM calls, with a busy host.",
        epilog="Sizes are binary (256k, 2m, 1g); GB = 1e9 bytes. Needs vLLM 0.33 for the comparison it is named for; "
        "without it the baseline is mp_tier's thread engine.",
    )
    p.add_argument("--sizes", type=parse_sizes, default=[2 << 20, 256 << 10, 16 << 10], help="block sizes (default 2m,256k,16k)")
    p.add_argument("--rounds", type=parse_positive, default=3, help="rounds per size, engine order reversed every other round (default 3)")
    p.add_argument("--blocks-per-job", type=parse_positive, default=16, help="blocks (chunks) per job (default 16)")
    p.add_argument("--inflight", type=parse_positive, default=8, help="jobs kept in flight (default 8)")
    p.add_argument("--total", type=parse_size, default=1 << 30, help="bytes each phase moves at most (default 1g)")
    p.add_argument("--max-blocks", type=parse_positive, default=8192, help="blocks each phase moves at most (default 8192)")
    p.add_argument("--seconds", type=float, default=4.0, help="a phase stops submitting after this long (default 4)")
    p.add_argument("--spin-us", type=int, default=1000, help="host busy-loop slice between polls, µs; 0 = sleep instead (default 1000)")
    p.add_argument("--idle-seconds", type=float, default=0.3, help="busy-loop idle speed measured this long before and after each phase")
    p.add_argument("--workers", type=parse_workers, default=(2, 2), help="mp_tier's workers, N or R+W (default 2+2); also the raw processes")
    p.add_argument("--vllm-threads", type=parse_workers, default=(16, 16), help="vLLM's read+write threads, N or R+W (default 16+16)")
    p.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="NAME:K=V,...",
        help="add an mp_tier column with these adapter settings (any TierConfig field, e.g. o_direct=off); repeatable",
    )
    p.add_argument("--ttfr", type=int, default=5, help="constructions per column timed to the first result (default 5; 0 skips)")
    p.add_argument("--root", help="directory to work in: new, empty, or holding only earlier loadgen runs (default: a fresh temp dir)")
    p.add_argument("--json", metavar="FILE", help=f"write every figure as JSON (schema {SCHEMA})")
    p.add_argument("--quiet", action="store_true", help="no per-run lines on stderr")
    return p


def to_json(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: to_json(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    return x


def run(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    api = load_api()
    columns = [Column(api.baseline, BASELINE), Column("mp_tier", "mp"), *args.variant]
    if len({c.name for c in columns}) != len(columns):
        raise UsageError(f"column names must differ: {', '.join(c.name for c in columns)}")
    args.spin_chunk = calibrate_spin(args.spin_us)
    header = api.describe()
    print(header)
    print(
        f"root {os.path.dirname(run_dir)} ({fs_type(run_dir)}), {os.cpu_count()} CPUs; jobs of {args.blocks_per_job} blocks, "
        f"{args.inflight} in flight; host spins {args.spin_us} µs between polls; {api.baseline} "
        f"{args.vllm_threads[0]}+{args.vllm_threads[1]}, mp_tier {args.workers[0]}+{args.workers[1]} workers; "
        f"<= {size_label(args.total)}, {args.max_blocks} blocks or {args.seconds:g} s per phase; {args.rounds} rounds, order alternated",
        flush=True,
    )
    all_runs: list[SizeRuns] = []
    ttfr: dict[str, dict[str, Any]] = {}
    for i, block in enumerate(args.sizes):
        args.block = block
        with api.memory(args.inflight * args.blocks_per_job, block) as view:
            if i == 0:
                check_columns(api, columns, view, run_dir, args)
                ttfr = first_results(api, columns, view, run_dir, args) if args.ttfr > 0 else {}
            root = os.path.join(run_dir, size_label(block))
            runs = measure_size(api, columns, view, root, args)
            all_runs.append(runs)
            directs = {(r["column"], r["direct"]) for r in runs.tiers}
            note(args, f"{size_label(block)}: O_DIRECT " + ", ".join(f"{c}={'on' if d else 'off'}" for c, d in sorted(directs)))
            shutil.rmtree(root, ignore_errors=True)
            del view  # the region unmaps only once no view of it is left
    summaries = print_report(all_runs, columns, ttfr, args)
    return {
        "schema": SCHEMA,
        "command": sys.orig_argv,
        "header": header,
        "args": {k: v for k, v in vars(args).items() if k not in ("variant", "block")} | {"variant": [to_json(c) for c in args.variant]},
        "platform": {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release(), "fs": fs_type(run_dir)},
        "columns": [to_json(c) for c in columns],
        "sizes": [to_json(r) for r in all_runs],
        "summary": summaries,
        "time_to_first_result": ttfr,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 2 on a usage error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        run_dir, created = prepare_root(args.root)
    except UsageError as e:
        print(f"vllm_bench: error: {e}", file=sys.stderr)
        return 2
    try:
        document = run(args, run_dir)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(document, f, indent=1)
    except UsageError as e:
        print(f"vllm_bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vllm_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(run_dir, created, keep=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
