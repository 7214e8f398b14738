"""mp_tier inside vLLM 0.33, through vLLM's own objects: its shared primary region, its tiering manager,
its factory, its FS tier. Runs where vLLM is installed (``.ci/vllm-compat`` builds that venv)."""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM 0.33 is not installed here: these tests run in the venv .ci/vllm-compat builds")

from helpers import child_processes, wait_exit
from vllm.v1.kv_offload.base import LookupResult, OffloadingKVEventsConfig, OffloadKey, ReqContext, make_offload_key
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.base import ScheduleEndContext, TransferJob
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager as VllmFsTier
from vllm.v1.kv_offload.tiering.manager import CPUPrimaryTierOffloadingManager, TieringOffloadingManager

from mp_tier.config import ConfigError
from mp_tier.errors import TierBroken
from mp_tier.vllm_tier import PLUGIN_NAME, MpFileSystemTierManager, register
from mp_tier.worker_process import TEST_PAUSE

CHUNK = 256 << 10  # bytes per primary chunk (a row of vLLM's view; page-aligned)
CHUNKS = 16
END_OF_STEP = ScheduleEndContext(new_req_ids=[], preempted_req_ids=())


def spec(events: bool = False) -> SimpleNamespace:
    """The three things a secondary tier reads from vLLM's OffloadingSpec, with a real OffloadingConfig."""
    config = OffloadingConfig(
        groups=(),
        worker_kv_bytes_per_block=0,
        enable_kv_cache_events=events,
        extra_config={},
        engine_id="mp-tier-test",
        model=OffloadingModelConfig(name="org/test-model", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
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
        ),
        replicated_layout=False,
    )
    return SimpleNamespace(
        config=config,
        blocks_per_chunk=1,
        kv_events_config=OffloadingKVEventsConfig(enable_kv_cache_events=events, self_describing_kv_events=False),
    )


def key(n: int) -> OffloadKey:
    return make_offload_key(n.to_bytes(32, "big"), 0)


def content(k: OffloadKey) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(int.from_bytes(k, "big") % 2**32).bytes(CHUNK), dtype=np.int8)


@pytest.fixture
def engine_stack(tmp_path: Path) -> Iterator[Callable[..., tuple[TieringOffloadingManager, MpFileSystemTierManager]]]:
    """vLLM's scheduler-side stack, as TieringOffloadingSpec builds it: a SharedOffloadRegion under /dev/shm, the
    CPU primary tier over it, mp_tier (process engine) as the secondary tier, and the tiering manager."""
    made: list[TieringOffloadingManager] = []

    def build(**settings: object) -> tuple[TieringOffloadingManager, MpFileSystemTierManager]:
        region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
        primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
        tier = MpFileSystemTierManager(
            offloading_spec=spec(),
            primary_kv_view=primary.get_kv_memoryview(),
            tier_type="MpFileSystemTierManager",
            root_dir=str(tmp_path / "kv"),
            n_read_threads=1,
            n_write_threads=1,
            **settings,
        )
        manager = TieringOffloadingManager(primary_tier=primary, secondary_tiers=[tier])
        made.append(manager)
        return manager, tier

    yield build
    for manager in made:
        manager.shutdown()


def settle(manager: TieringOffloadingManager, done: Callable[[], bool], seconds: float = 30) -> None:
    """Step the manager as the engine does (end of step, then its own polling) until ``done``."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the manager never settled"
        manager.on_schedule_end(END_OF_STEP)
        time.sleep(0.005)


def test_cascade_lookup_promote_byte_exact_across_worker_kills(engine_stack) -> None:
    """GPU->CPU stores cascade into mp_tier; a second engine with an empty primary finds the chunks in mp_tier,
    promotes them and reads them byte-exact. A worker of each tier is SIGKILLed with transfers in flight."""
    writer, writer_tier = engine_stack()
    keys = [key(n) for n in range(8)]
    ctx = ReqContext(req_id="writer")
    writer.on_new_request(ctx)
    stored = writer.prepare_store(keys, ctx)
    assert stored is not None and stored.keys_to_store == keys
    view = np.frombuffer(writer_tier._primary_kv_view, dtype=np.int8).reshape(CHUNKS, CHUNK)
    for k, chunk in zip(keys, stored.store_spec.chunk_ids):
        view[chunk] = content(k)  # what the GPU->CPU copy would have written
    writer.complete_store(keys, ctx)  # cascades to mp_tier
    victim = writer_tier._tier.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_exit(victim, 5)
    settle(writer, lambda: not writer.has_pending_work())
    assert all(os.path.exists(writer_tier.file_mapper.get_file_name(k)) for k in keys)
    writer.on_request_finished(ctx)

    reader, reader_tier = engine_stack()
    ctx = ReqContext(req_id="reader")
    reader.on_new_request(ctx)
    victim = reader_tier._tier.worker_pids()[-1]
    answers = [reader.lookup(k, ctx) for k in keys]
    assert set(answers) <= {LookupResult.RETRY, LookupResult.HIT_PENDING}
    reader.on_schedule_end(END_OF_STEP)
    os.kill(victim, signal.SIGKILL)
    settle(reader, lambda: all(reader.lookup(k, ctx) is LookupResult.HIT for k in keys))
    loaded = reader.prepare_load(keys, ctx)
    rows = np.frombuffer(reader_tier._primary_kv_view, dtype=np.int8).reshape(CHUNKS, CHUNK)
    for k, chunk in zip(keys, loaded.chunk_ids):
        assert np.array_equal(rows[chunk], content(k)), "a promoted chunk differs from what was stored"
    reader.complete_load(keys, ctx)
    reader.reset_cache()  # drain_jobs, then every result consumed: vLLM asserts no job is left
    assert reader_tier._tier.stats().workers_restarted >= 1


def test_selected_by_module_path_by_plugin_name_and_by_the_installed_entry_point(tmp_path: Path) -> None:
    region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    view = primary.get_kv_memoryview()
    entries = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.value == "mp_tier.vllm_tier:register"]
    assert entries, "mp_tier's vllm.general_plugins entry point is not installed"
    entries[0].load()()
    register()  # idempotent, as vLLM may load plugins more than once
    tiers = []
    try:
        for config in (
            {"type": "MpFileSystemTierManager", "module_path": "mp_tier.vllm_tier"},
            {"type": PLUGIN_NAME},
        ):
            tier = SecondaryTierFactory.create_secondary_tier(
                {**config, "root_dir": str(tmp_path), "n_read_threads": 1, "n_write_threads": 1, "max_bytes": 64 * CHUNK},
                view,
                spec(),
            )
            tiers.append(tier)
            assert isinstance(tier, MpFileSystemTierManager) and tier.tier_type == config["type"]
            assert tier.config_info()["max_bytes"] == 64 * CHUNK
        with pytest.raises(TypeError, match=r"unknown settings .*: bogus"):
            SecondaryTierFactory.create_secondary_tier({"type": PLUGIN_NAME, "root_dir": str(tmp_path), "bogus": 1}, view, spec())
    finally:
        for tier in tiers:
            tier.shutdown()
        primary.shutdown()


def job(job_id: int, keys: list[OffloadKey], chunks: list[int], promotion: bool = False) -> TransferJob:
    return TransferJob(job_id=job_id, keys=keys, chunk_ids=np.array(chunks), is_promotion=promotion, req_context=ReqContext(req_id="r"))


def drain(tier: object) -> list:
    tier.drain_jobs()  # type: ignore[attr-defined]
    return list(tier.get_finished_jobs())  # type: ignore[attr-defined]


@pytest.mark.parametrize("writer_kind", ["vllm", "mp_tier"])
def test_a_root_one_tier_wrote_is_read_by_the_other(tmp_path: Path, writer_kind: str) -> None:
    """Same FileMapper paths, same config.json: vLLM's FS tier (its pure-Python path) and mp_tier read each
    other's blocks byte-exact."""
    region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    view = primary.get_kv_memoryview()
    rows = np.frombuffer(view, dtype=np.int8).reshape(CHUNKS, CHUNK)
    keys = [key(100 + n) for n in range(4)]
    for n, k in enumerate(keys):
        rows[n] = content(k)
    kinds = {
        "vllm": lambda: VllmFsTier(spec(), view, "fs", root_dir=str(tmp_path), n_read_threads=2, n_write_threads=2),
        "mp_tier": lambda: MpFileSystemTierManager(spec(), view, "mp", root_dir=str(tmp_path), n_read_threads=1, n_write_threads=1),
    }
    writer = kinds[writer_kind]()
    reader = kinds["mp_tier" if writer_kind == "vllm" else "vllm"]()
    try:
        writer.submit_store(job(1, keys, [0, 1, 2, 3]))
        assert [r.success for r in drain(writer)] == [True]
        assert writer.file_mapper.get_file_name(keys[0]) == reader.file_mapper.get_file_name(keys[0])
        assert os.path.isfile(writer.file_mapper.get_config_file_path())
        rows[8:12] = 0
        reader.submit_load(job(2, keys, [8, 9, 10, 11], promotion=True))
        assert [r.success for r in drain(reader)] == [True]
        assert np.array_equal(rows[8:12], rows[0:4])
    finally:
        del rows  # an array over the region keeps vLLM's mapping (and its fd) alive past its cleanup
        writer.shutdown()
        reader.shutdown()
        primary.shutdown()


def test_vllms_semantics_for_bad_chunks_failed_prefixes_and_in_flight_stores(engine_stack, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="mp_tier.vllm_tier")
    _, tier = engine_stack()
    a, b, c = key(1), key(2), key(3)
    tier.submit_store(job(1, [a], [CHUNKS]))  # out of range: a failed result, not an exception
    tier.submit_store(job(2, [a, b, c], [0, 1, 2]))
    ctx = ReqContext(req_id="r")  # the request the jobs are for
    assert tier.lookup(a, ctx) is LookupResult.RETRY  # being transferred
    results = {r.job_id: r for r in drain(tier)}
    assert not results[1].success and results[1].transfer_bytes == CHUNK
    assert results[2].success and results[2].successful_keys is None
    assert tier.lookup(a, ctx) is LookupResult.HIT  # from the tier's memory: no step spent on RETRY
    os.unlink(tier.file_mapper.get_file_name(b))
    tier.submit_load(job(3, [a, b, c], [4, 5, 6], promotion=True))
    (result,) = drain(tier)
    assert not result.success and tuple(result.successful_keys) == (a,)  # the loaded prefix, as vLLM's FS tier
    assert "job 3 failed (ENOENT): " in caplog.text  # the code vLLM's JobResult cannot carry reaches its log
    # from the failure on, misses for this request (c's file is fine, but vLLM reads a promotion as a prefix)
    assert [tier.lookup(k, ctx) for k in (a, b, c)] == [LookupResult.HIT, LookupResult.MISS, LookupResult.MISS]
    other = ReqContext(req_id="other")
    assert [tier.lookup(k, other) for k in (a, b, c)] == [LookupResult.HIT, LookupResult.RETRY, LookupResult.HIT]
    assert drain(tier) == []


def test_private_memory_is_refused_naming_the_cause_unless_threads_are_chosen(tmp_path: Path) -> None:
    """Refused, it creates nothing under the root: it used to leave vLLM's directory and its config.json."""
    private = np.zeros((4, CHUNK), dtype=np.int8)
    with pytest.raises(ValueError, match=r"primary_kv_view is not in shared memory .*engine = .threads."):
        MpFileSystemTierManager(spec(), memoryview(private), "mp", root_dir=str(tmp_path / "kv"))
    assert not (tmp_path / "kv").exists()
    tier = MpFileSystemTierManager(spec(), memoryview(private), "mp", root_dir=str(tmp_path), engine="threads")
    try:
        private[0] = 5
        tier.submit_store(job(1, [key(9)], [0]))
        tier.submit_load(job(2, [key(9)], [3], promotion=True))
        assert len(drain(tier)) in (1, 2)
    finally:
        tier.shutdown()


def test_store_events_in_job_order_only_when_events_are_on_globally(tmp_path: Path) -> None:
    region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    view = primary.get_kv_memoryview()
    off = MpFileSystemTierManager(spec(events=False), view, "mp", root_dir=str(tmp_path), enable_kv_events=True)
    on = MpFileSystemTierManager(spec(events=True), view, "mp", root_dir=str(tmp_path / "2"), enable_kv_events=True)
    try:
        assert off.events is None and off.take_events() == ()
        on.submit_store(job(1, [key(2), key(1)], [0, 1]))
        on.submit_store(job(2, [key(3)], [CHUNKS]))  # refused: no event
        drain(on)
        (event,) = on.take_events()
        assert event.keys == [key(2), key(1)] and not event.removed
        assert list(on.take_events()) == []
    finally:
        off.shutdown()
        on.shutdown()
        primary.shutdown()


def test_metrics_through_vllms_hooks(engine_stack) -> None:
    _, tier = engine_stack(max_bytes=2 * CHUNK)
    assert set(MpFileSystemTierManager.build_metric_definitions({})) >= {"mp_tier_workers_restarted", "mp_tier_blocks_evicted"}
    tier.submit_store(job(1, [key(1), key(2), key(3)], [0, 1, 2]))
    assert [r.success for r in drain(tier)] == [False]  # three blocks do not fit a two-block budget
    tier.submit_store(job(2, [key(1), key(2)], [0, 1]))
    assert [r.success for r in drain(tier)] == [True]
    tier.submit_store(job(3, [key(3)], [2]))  # evicts key(1)
    assert [r.success for r in drain(tier)] == [True]
    counters = tier.get_stats().reduce()
    assert counters["mp_tier_blocks_evicted"] == 1 and counters["mp_tier_bytes_counted"] == 2 * CHUNK
    assert "mp_tier_blocks_evicted" not in tier.get_stats().reduce()  # counters report increments once


def test_events_is_a_setting_under_either_name(tmp_path: Path) -> None:
    """``events`` is TierConfig's name for vLLM's ``enable_kv_events``: either turns store events on (where vLLM's
    are on globally); both at once, or a value that is not a bool, is refused naming the key."""
    region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    view = primary.get_kv_memoryview()
    tier = MpFileSystemTierManager(spec(events=True), view, "mp", root_dir=str(tmp_path), n_read_threads=1, n_write_threads=1, events=True)
    try:
        tier.submit_store(job(1, [key(1)], [0]))
        drain(tier)
        (event,) = tier.take_events()
        assert event.keys == [key(1)] and not event.removed
        with pytest.raises(TypeError, match=r"^enable_kv_events and events name one setting: give one$"):
            MpFileSystemTierManager(spec(events=True), view, "mp", root_dir=str(tmp_path / "x"), events=True, enable_kv_events=True)
        with pytest.raises(ConfigError, match=r"^events = 'yes': expected true or false$"):
            MpFileSystemTierManager(spec(events=True), view, "mp", root_dir=str(tmp_path / "x"), events="yes")
        assert not (tmp_path / "x").exists()
    finally:
        tier.shutdown()
        primary.shutdown()


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"n_read_threads": 0}, ConfigError, "n_read_threads = 0: expected an integer >= 1 and <= 256"),
        ({"n_write_threads": "2"}, ConfigError, "n_write_threads = '2': expected an integer >= 1 and <= 256"),
        ({"n_read_workers": 300}, ConfigError, "n_read_workers = 300: expected an integer >= 1 and <= 256"),
        ({"n_read_threads": 2, "n_read_workers": 2}, TypeError, "n_read_threads and n_read_workers name one setting: give one"),
        ({"max_bytes": "10G"}, ConfigError, "max_bytes = '10G': expected an integer >= 0 and <= 9223372036854775807"),
    ],
)
def test_a_bad_setting_is_blamed_on_the_key_the_entry_wrote_and_changes_nothing(
    tmp_path: Path, settings: dict[str, object], error: type[Exception], message: str
) -> None:
    region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    try:
        with pytest.raises(error) as info:
            MpFileSystemTierManager(spec(), primary.get_kv_memoryview(), "mp", root_dir=str(tmp_path / "kv"), **settings)
        assert str(info.value) == message
        assert not (tmp_path / "kv").exists()
    finally:
        primary.shutdown()


def test_engines_with_other_chunk_sizes_share_a_root_each_in_its_own_directory(tmp_path: Path) -> None:
    """vLLM's FileMapper path leaves the chunk's byte size out. The first engine on a root takes that directory (so
    vLLM's FS tier reads it); an engine with another chunk size gets ``<base>_bs<bytes>_r<rank>`` beside it, finds
    its own blocks there after a restart, and never loads a block of the other size."""
    made: list[tuple[CPUPrimaryTierOffloadingManager, MpFileSystemTierManager]] = []
    rows: list[np.ndarray] = []  # views of vLLM's regions, let go of before their cleanup

    def engine(chunk: int) -> MpFileSystemTierManager:
        region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", 4, None, chunk, 4096)
        primary = CPUPrimaryTierOffloadingManager(num_chunks=4, mmap_region=region)
        view = primary.get_kv_memoryview()
        made.append((primary, MpFileSystemTierManager(spec(), view, "mp", root_dir=str(tmp_path), n_read_threads=1, n_write_threads=1)))
        rows.append(np.frombuffer(view, dtype=np.uint8).reshape(4, chunk))
        return made[-1][1]

    k = key(7)
    try:
        small, big = engine(CHUNK), engine(2 * CHUNK)
        small_path = small.file_mapper.get_file_name(k)
        base = small.file_mapper.base_path
        big_path = f"{base}_bs{2 * CHUNK}_r0/{os.path.relpath(small_path, f'{base}_r0')}"
        rows[0][0], rows[1][0] = 1, 2
        small.submit_store(job(1, [k], [0]))
        big.submit_store(job(2, [k], [0]))  # the same key: each engine's own bytes, in its own file
        assert [r.success for r in drain(small) + drain(big)] == [True, True]
        assert (os.path.getsize(small_path), os.path.getsize(big_path)) == (CHUNK, 2 * CHUNK)
        big.shutdown()
        again = engine(2 * CHUNK)  # a restart finds the same directory, and its block
        again.submit_load(job(3, [k], [1], promotion=True))
        small.submit_load(job(4, [k], [1], promotion=True))
        assert [r.success for r in drain(again) + drain(small)] == [True, True]
        assert (rows[2][1] == 2).all() and (rows[0][1] == 1).all()
    finally:
        rows.clear()
        for primary, tier in made:
            tier.shutdown()
            primary.shutdown()


def test_engines_with_other_chunk_sizes_starting_at_once_on_an_empty_root_both_start(tmp_path: Path) -> None:
    """Whichever links vLLM's directory's config.json first keeps that directory; the other moves beside it."""
    primaries = [
        CPUPrimaryTierOffloadingManager(num_chunks=4, mmap_region=SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", 4, None, chunk, 4096))
        for chunk in (CHUNK, 2 * CHUNK)
    ]
    views = [primary.get_kv_memoryview() for primary in primaries]
    start = threading.Barrier(2)
    tiers: list[MpFileSystemTierManager] = []

    def engine(view: memoryview) -> None:
        start.wait(10)
        tiers.append(MpFileSystemTierManager(spec(), view, "mp", root_dir=str(tmp_path), n_read_threads=1, n_write_threads=1))

    threads = [threading.Thread(target=engine, args=(view,)) for view in views]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(tiers) == 2, "an engine failed to start"
        base = os.path.basename(tiers[0].file_mapper.base_path)
        beside = set(os.listdir(tmp_path)) - {base, f"{base}_r0"}  # vLLM's config.json directory, and its rank directory
        assert beside in ({f"{base}_bs{CHUNK}_r0"}, {f"{base}_bs{2 * CHUNK}_r0"})
    finally:
        for tier in tiers:
            tier.shutdown()
        for primary in primaries:
            primary.shutdown()


def test_a_malformed_key_is_a_miss_to_lookup_and_left_out_of_touch(engine_stack, caplog) -> None:
    """vLLM's scheduler step calls these; a key the tier cannot hold names no file, so it is a miss, never an exception."""
    caplog.set_level(logging.WARNING, logger="mp_tier.vllm_tier")
    _, tier = engine_stack()
    ctx = ReqContext(req_id="odd")
    for odd in (b"abc", b"\x01" * 200, "abcdefgh" * 4):
        assert tier.lookup(odd, ctx) is LookupResult.MISS
    assert "which is not bytes of at least 8" in caplog.text
    good = key(7)
    tier.submit_store(job(1, [good], [0]))
    assert [r.success for r in drain(tier)] == [True]
    tier.touch([b"abc", good], ctx)  # the good key is still touched
    assert tier.lookup(good, ctx) is LookupResult.HIT


def test_a_job_refused_by_a_broken_tier_still_gets_its_result(engine_stack, monkeypatch, tmp_path: Path) -> None:
    """The tier broke (its workers never start) and says so from its poll; a job refused afterwards (an
    out-of-range chunk) still gets its one failed result from the next poll, as the tier's own jobs got
    theirs before it raised, and only the poll after that raises again. The refused results were taken
    for the poll's answer before the tier's own poll raised, and lost with that raise."""
    monkeypatch.setenv(TEST_PAUSE, f"boot:30:{tmp_path / 'booting'}")
    _, tier = engine_stack(start_timeout=1)
    deadline = time.monotonic() + 30
    with pytest.raises(TierBroken):
        while time.monotonic() < deadline:
            assert list(tier.get_finished_jobs()) == []
            time.sleep(0.01)  # a poll loop's pace, as the engine's steps
    tier.submit_store(job(1, [key(1)], [CHUNKS]))
    assert [(r.job_id, r.success) for r in tier.get_finished_jobs()] == [(1, False)]
    with pytest.raises(TierBroken):
        tier.get_finished_jobs()


def test_an_adapter_dropped_without_shutdown_stops_its_workers_and_its_lookup_thread(tmp_path: Path) -> None:
    """vLLM's lookup thread (AsyncLookupManager) holds what it looks through, and waits on its queue for ever:
    an adapter dropped without shutdown() (vLLM failing after it built its tiers, say) kept its tier alive,
    worker processes and fds, until the interpreter exited. Now the tier goes with the adapter, as a dropped
    tier does, and so does the thread (the autouse leak check then finds no fd or process left)."""
    region = SharedOffloadRegion(f"mptier-{uuid.uuid4().hex[:8]}", CHUNKS, None, CHUNK, 4096)
    primary = CPUPrimaryTierOffloadingManager(num_chunks=CHUNKS, mmap_region=region)
    try:
        before = child_processes()
        tier = MpFileSystemTierManager(spec(), primary.get_kv_memoryview(), "mp", root_dir=str(tmp_path), n_read_threads=1, n_write_threads=1)
        tier.submit_store(job(1, [key(1)], [0]))
        workers = child_processes() - before
        assert len(workers) == 2
        del tier
        gc.collect()
        assert [pid for pid in workers if not wait_exit(pid, 5)] == [], "a worker outlived its dropped adapter"
        assert [t.name for t in threading.enumerate() if t.name == "vllm_offloading_lookup_mp"] == []
    finally:
        primary.shutdown()
