"""A tier inside a real host: other processes attach its cache, the host forks and runs threads,
workers die mid-claim. Every promise here is provoked with real processes, forks and signals."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import BLOCK, POLLS, fill_random, in_system_call, make_keys, open_fds, run_job, wait_exit, wait_ready

from mp_tier import FileSystemTierManager, JobMetadata, TierClosed, TierConfig
from mp_tier.recovery import CLAIM_SETTLE_SECONDS
from mp_tier.worker_process import TEST_PAUSE

ATTACHER = textwrap.dedent(
    """
    import os, signal, sys
    from mp_tier import PrimaryCache
    cache = PrimaryCache.attach(sys.argv[1], 256, int(sys.argv[2]))
    cache.array[0, 0] = 1
    if sys.argv[3] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[3] == "close":
        cache.close()
    """
)


@pytest.mark.parametrize("engine", ["processes"])
@pytest.mark.parametrize("how", ["close", "exit", "sigkill"])
def test_an_attacher_that_goes_never_unlinks_the_segment(make_tier, cache, how):
    """Closing, exiting or being killed: an attacher never registered the name anywhere, so the segment and
    the tier survive it, and a replacement worker still maps the cache."""
    tier = make_tier()
    done = subprocess.run([sys.executable, "-c", ATTACHER, cache.name, str(BLOCK), how], timeout=30)
    assert done.returncode == (-signal.SIGKILL if how == "sigkill" else 0)
    assert os.path.exists(f"/dev/shm/{cache.name}")
    victim = tier.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_exit(victim, 5)
    fill_random(cache, range(4))
    keys = make_keys(4)
    for j in range(3):  # the death is noticed and the worker replaced within these jobs
        assert run_job(tier, "store", JobMetadata(job_id=j, keys=keys, block_ids=[0, 1, 2, 3])).success
    wait_ready(tier)
    assert tier.stats().workers_restarted == 1 and tier.stats().workers_alive == 4
    assert run_job(tier, "load", JobMetadata(job_id=9, keys=keys, block_ids=[4, 5, 6, 7])).success


def test_a_forked_child_that_closes_the_cache_never_unlinks_it(cache):
    pid = os.fork()
    if pid == 0:
        cache.close()  # the child inherited an object whose creator is its parent
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert os.path.exists(f"/dev/shm/{cache.name}")
    cache.array[0, 0] = 3  # still the parent's, still mapped


LONE_HOST = textwrap.dedent(
    """
    import json, os, select, signal, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    cache = PrimaryCache.create(16, 65536)
    with FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1) as tier:
        while tier.stats().workers_starting or tier.stats().workers_alive < 2:
            tier.wait(0.01)
        workers = tier.worker_pids()
        parents = [int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) for pid in workers]
        others = [int(p) for p in open(f"/proc/self/task/{os.getpid()}/children").read().split() if int(p) not in workers]
        for pid in others:  # the segment janitor: the only other helper
            fd = os.pidfd_open(pid)
            os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [])
        tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
        tier.drain(30)
        result = tier.get_finished()[0]
        print(json.dumps({"me": os.getpid(), "parents": parents, "killed": len(others), "success": result.success,
                          "same": tier.worker_pids() == workers, "restarted": tier.stats().workers_restarted}))
    cache.close()
    """
)


def test_workers_are_the_hosts_own_children_watched_by_pidfd(tmp_path):
    """No forkserver between the host and a worker, and no helper whose death could look like theirs:
    killing every other child of the host (its segment janitor) changes nothing for the tier."""
    done = subprocess.run([sys.executable, "-c", LONE_HOST, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["parents"] == [info["me"]] * 2
    assert info["killed"] == 1
    assert info["success"] and info["same"] and info["restarted"] == 0
    assert [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"mp_tier_{info['me']}_")] == []


SHADOWED_HOST = textwrap.dedent(
    """
    import json, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    with PrimaryCache.create(4, 65536) as cache:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
        tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
        tier.drain(30)
        result = tier.get_finished()[0]
        print(json.dumps({"success": result.success, "restarted": tier.stats().workers_restarted}))
        tier.shutdown()
    """
)


def test_the_hosts_working_directory_never_shadows_what_workers_import(tmp_path):
    """A host started from a directory holding a stray ``msgspec`` and ``mp_tier`` (a checkout, a build
    tree): the host imports the real ones, and so do its workers and its janitor, which would otherwise
    die at import, over and over."""
    stray = tmp_path / "cwd"
    for package in ("msgspec", "mp_tier"):
        (stray / package).mkdir(parents=True)
        (stray / package / "__init__.py").write_text(f"raise ImportError('the stray {package} was imported')\n")
    host = tmp_path / "host.py"
    host.write_text(SHADOWED_HOST)
    done = subprocess.run([sys.executable, str(host), str(tmp_path / "blocks")], cwd=stray, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"success": True, "restarted": 0}
    assert "stray" not in done.stderr


def _paused_load(tier, tmp_path: Path, cache, job_id: int) -> int:
    """Submit a load that one worker reads and then holds, unnamed, in the claim window; return that worker's pid."""
    marker = tmp_path / "claiming"
    marker.unlink(missing_ok=True)
    cache.array[5] = 0
    tier.submit_load(JobMetadata(job_id=job_id, keys=make_keys(1), block_ids=[5]))
    deadline = time.monotonic() + 10
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "no worker read the load"
        tier.wait(0.001)
    return int(marker.read_text())


@pytest.mark.parametrize("engine", ["processes"])
@pytest.mark.parametrize("pause", [CLAIM_SETTLE_SECONDS / 4, CLAIM_SETTLE_SECONDS * 5], ids=["short", "stuck"])
def test_a_death_inside_another_workers_claim_window_never_runs_its_task_twice(make_tier, cache, tmp_path, monkeypatch, pause):
    """A worker has read a load but not named it yet when another worker is SIGKILLed. Short pause: the host
    waits for the claim to end and leaves the task with its reader. Stuck: the host kills the reader, and
    sends the task again only once that worker is gone. Either way one result, and the cache block is never
    written after it is delivered."""
    monkeypatch.setenv(TEST_PAUSE, f"claim:{pause}:{tmp_path / 'claiming'}")
    tier = make_tier(n_read_workers=2, n_write_workers=1)
    wait_ready(tier)
    cache.array[0] = 7
    assert run_job(tier, "store", JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0])).success
    reader = _paused_load(tier, tmp_path, cache, job_id=2)
    victim = next(pid for pid in tier.worker_pids() if pid != reader)
    os.kill(victim, signal.SIGKILL)
    results = []
    while not results:
        tier.wait(10)
        results = tier.get_finished()
    assert [(r.job_id, r.success) for r in results] == [(2, True)]
    assert (cache.array[5] == 7).all()
    if pause > CLAIM_SETTLE_SECONDS:
        assert wait_exit(reader, 0), "the stuck reader was still alive when its task was sent again"
    cache.array[5] = 0xEE  # the engine reuses the block at once
    tier.shutdown()  # waits for every worker to finish what it holds: a second run would land now
    assert (cache.array[5] == 0xEE).all(), "a task ran after its result was delivered"
    assert tier.get_finished() == []


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_threads_submitting_and_polling_lose_nothing_and_run_nothing_twice(make_tier, cache):
    """Four threads submit stores and look up keys while a fifth polls; thread switches every microsecond."""
    tier = make_tier(config=TierConfig(o_direct="off"))
    fill_random(cache, range(256))
    per_thread, threads = 150, 4
    results: collections.Counter[int] = collections.Counter()
    errors: list[BaseException] = []
    submitting = threading.Event()
    submitting.set()

    def submit(t: int) -> None:
        try:
            for j in range(per_thread):
                job = t * 1000 + j
                tier.submit_store(JobMetadata(job_id=job, keys=make_keys(2, seed=job), block_ids=[j % 256, (j + 1) % 256]))
                tier.lookup_many(make_keys(3, seed=job + 7))
        except BaseException as e:
            errors.append(e)

    def poll() -> None:
        try:
            while submitting.is_set():
                results.update(r.job_id for r in tier.get_finished())
        except BaseException as e:
            errors.append(e)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        submitters = [threading.Thread(target=submit, args=(t,)) for t in range(threads)]
        poller = threading.Thread(target=poll)
        poller.start()
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join()
        submitting.clear()
        poller.join()
    finally:
        sys.setswitchinterval(switch)
    tier.drain(60)
    results.update(r.job_id for r in tier.get_finished())
    assert errors == []
    assert sorted(results) == sorted(t * 1000 + j for t in range(threads) for j in range(per_thread))
    assert set(results.values()) == {1}
    assert tier.stats().jobs_stored == threads * per_thread


@pytest.mark.parametrize("engine", ["processes"])
def test_a_waiting_thread_wakes_for_a_result_made_at_submit(make_tier):
    """A job with no blocks gets its result inside submit, from no worker: a thread asleep in wait() wakes for it
    at once. The tier also wakes a sleeper every second or less for its deadline checks, so each of 5 rounds
    must wake within 0.3 s of the submit (with no wake-up for the result, the rounds took 0.7-1.0 s)."""
    tier = make_tier()
    wait_ready(tier)
    pids = tier.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # so the first job stays in flight and each waiter sleeps
    took, results = [], []
    try:
        tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
        for job_id in range(2, 7):
            woke = threading.Event()
            waiter = threading.Thread(target=lambda woke=woke: tier.wait(30) and woke.set())
            waiter.start()
            deadline = time.monotonic() + 10
            while not in_system_call(f"self/task/{waiter.native_id}", POLLS):  # asleep in wait(), not on its way
                assert waiter.is_alive() and time.monotonic() < deadline, "the waiter never went to sleep"
            submitted = time.monotonic()
            tier.submit_store(JobMetadata(job_id=job_id, keys=[], block_ids=[]))
            assert woke.wait(10), "the waiter slept through a result"
            took.append(time.monotonic() - submitted)
            waiter.join(10)
            results += tier.get_finished()  # so the next waiter has none waiting and sleeps
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert max(took) < 0.3, f"the waiter woke {max(took):.2f} s after the result was made (rounds: {took})"
    tier.drain(30)
    assert sorted(r.job_id for r in results + tier.get_finished()) == [1, 2, 3, 4, 5, 6]


FORKING_HOST = textwrap.dedent(
    """
    import json, os, sys, time
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache
    cache = PrimaryCache.create(16, 65536)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
    tier.drain(30)
    child = os.fork()
    if child == 0:  # a data-loader or tokenizer process, forked without exec: it just lives on
        sys.stdin.read()
        os._exit(0)
    for j in range(100):
        tier.submit_store(JobMetadata(job_id=j, keys=[j.to_bytes(32, "big") + bytes(4)], block_ids=[j % 16]))
    print(json.dumps({"workers": tier.worker_pids(), "shm": cache.name, "child": child}), flush=True)
    sys.stdin.read()
    """
)


def test_a_killed_host_with_a_live_forked_child_leaves_no_worker_and_no_segment(tmp_path):
    """The child holds none of the task pipes' write ends nor the janitor's pipe, so the host's death
    still reaches its workers and its janitor."""
    host = subprocess.Popen(
        [sys.executable, "-c", FORKING_HOST, str(tmp_path / "blocks")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        info = json.loads(host.stdout.readline())
        host.kill()
        host.wait()
        for pid in info["workers"]:
            assert wait_exit(pid, 2.0), f"worker {pid} outlived its host by 2 s while a forked child lived"
        deadline = time.monotonic() + 10
        while os.path.exists(f"/dev/shm/{info['shm']}"):
            assert time.monotonic() < deadline, "the segment outlived its creator"
            time.sleep(0.01)
        assert not wait_exit(info["child"], 0), "the child should still be alive"
    finally:
        host.stdin.close()  # the child reads the same stdin: it ends now
        host.stdout.close()
    assert wait_exit(info["child"], 10)


FORK_AND_EXIT = textwrap.dedent(
    """
    import json, os, sys
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierClosed
    what = sys.argv[2]
    cache = PrimaryCache.create(16, 65536)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=sys.argv[1], n_read_workers=1, n_write_workers=1)
    while tier.stats().workers_starting or tier.stats().workers_alive < 2:
        tier.wait(0.01)
    workers = tier.worker_pids()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        outcome = "ok"
        try:
            if what == "shutdown":
                tier.shutdown()
            elif what == "submit":
                tier.submit_store(JobMetadata(job_id=1, keys=[bytes(36)], block_ids=[0]))
            elif what == "get_finished":
                tier.get_finished()
            elif what == "close-cache":
                cache.close()
        except TierClosed as e:
            outcome = f"TierClosed: {e}"
        os.write(write, outcome.encode())
        sys.exit(0)  # a normal exit: atexit handlers and the tier's finalizer run in the child
    os.close(write)
    outcome = os.read(read, 1000).decode()
    status = os.waitpid(child, 0)[1]
    alive = [os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z" for pid in workers]
    tier.submit_store(JobMetadata(job_id=5, keys=[bytes(36)], block_ids=[0]))
    tier.drain(30)
    print(json.dumps({"outcome": outcome, "status": status, "alive": alive, "success": tier.get_finished()[0].success,
                      "same": tier.worker_pids() == workers, "segment": os.path.exists(f"/dev/shm/{cache.name}")}))
    tier.shutdown()
    cache.close()
    """
)


@pytest.mark.parametrize("what", ["exit", "shutdown", "submit", "get_finished", "close-cache"])
def test_a_forked_child_never_affects_the_parents_tier(tmp_path, what):
    """Whatever a plain fork()ed child of the host does with its copy of the tier or the cache, and at its
    normal exit (atexit, finalizers), the parent's workers live on and its jobs complete."""
    done = subprocess.run([sys.executable, "-c", FORK_AND_EXIT, str(tmp_path), what], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    if what in ("submit", "get_finished"):
        assert info["outcome"].startswith("TierClosed: this tier belongs to process")
    else:
        assert info["outcome"] == "ok"
    assert info["status"] == 0
    assert info["alive"] == [True, True], "a worker of the parent died"
    assert info["success"] and info["same"] and info["segment"]


@pytest.mark.parametrize("engine", ["processes"])
def test_shutdown_from_a_signal_handler_that_interrupts_a_call_loses_nothing(make_tier, cache, caplog):
    """Handlers run every 2 ms of a submit / poll loop, often inside a call of the tier: they read stats(),
    and at a random instant one calls shutdown() (a SIGTERM handler). That call completes, and the tier's
    next call shuts it down. Every submit that returned gets exactly one result, and a call never fails
    with anything but TierClosed."""
    caplog.set_level(logging.DEBUG, logger="mp_tier.tier")
    previous = signal.getsignal(signal.SIGALRM)
    rng = random.Random(7)
    keys = make_keys(64)
    try:
        for run in range(12):
            tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(o_direct="off"))
            stop_at = time.monotonic() + rng.uniform(0.02, 0.1)

            def handler(*_: object, tier=tier, stop_at=stop_at) -> None:
                assert tier.stats().jobs_active >= 0
                if time.monotonic() >= stop_at:
                    tier.shutdown()

            signal.signal(signal.SIGALRM, handler)
            submitted, results = [], collections.Counter()
            signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
            try:
                for job in itertools.count():
                    tier.submit_store(JobMetadata(job_id=job, keys=keys, block_ids=list(range(64))))
                    submitted.append(job)
                    results.update(r.job_id for r in tier.get_finished())
            except TierClosed:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            results.update(r.job_id for r in tier.get_finished())
            lost = sorted(set(submitted) - set(results))
            extra = sorted(j for j, n in results.items() if n != 1 or j not in submitted)
            assert not lost and not extra, f"run {run}: no result for jobs {lost}; unexpected results for {extra}"
    finally:
        signal.signal(signal.SIGALRM, previous)
    deferred = [r for r in caplog.records if "shutdown() interrupted a call" in r.getMessage()]
    assert deferred, "no signal landed inside a call of the tier: the test proved nothing"



class Interrupt(Exception):
    """What the test's signal handler raises."""


@pytest.mark.parametrize("engine", ["processes"])
def test_an_exception_a_signal_handler_raises_never_leaves_the_tier_locked(make_tier):
    """A handler raises every 0.5 ms of a submit / poll loop (as Ctrl-C's KeyboardInterrupt does): calls are
    cut short, but the lock is never left held: another thread still gets through, and so does this one."""
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(o_direct="off"))
    keys = make_keys(16)
    previous = signal.getsignal(signal.SIGALRM)
    interrupts = 0
    armed = False  # raise only inside the loop's try, never in its except clauses

    def handler(*_: object) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise Interrupt

    signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        for job in range(3000):
            try:
                armed = True
                tier.submit_store(JobMetadata(job_id=job, keys=keys, block_ids=list(range(16))))
                tier.get_finished()
                armed = False
            except Interrupt:
                interrupts += 1
            except ValueError:
                pass  # a job id still active: its submit was cut short after it was recorded
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert interrupts > 0
    other = threading.Thread(target=tier.get_finished)
    other.start()
    other.join(10)
    assert not other.is_alive(), "the lock was left held: another thread cannot get in"
    assert tier.lookup_many(keys[:1]) in ([True], [False], [None])  # this thread is not refused as if inside a call
    tier.shutdown()
    assert tier.worker_pids() == []



@pytest.mark.parametrize("engine", ["processes"])
def test_a_wait_whose_sleep_a_handler_interrupts_with_shutdown_ends_cleanly(make_tier):
    """The host sleeps in wait() with a job in flight (its workers stopped); a SIGALRM handler, not inside
    a call, shuts the tier down for real, closing the fds the sleep polls. wait() must end with the
    job's one result, never read a closed fd."""
    tier = make_tier(n_read_workers=1, n_write_workers=1)
    wait_ready(tier)
    stopped = tier.worker_pids()
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
    previous = signal.getsignal(signal.SIGALRM)

    def handler(*_: object) -> None:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        tier.shutdown()

    signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert tier.wait(10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert [r.job_id for r in tier.get_finished()] == [1]


@pytest.mark.parametrize("engine", ["processes"])
def test_a_handlers_shutdown_never_waits_on_a_thread_that_waits_for_the_interrupted_one(make_tier):
    """Another thread is inside a call of the tier, logging a worker's death under the tier's lock, and its
    log handler waits for what the main thread holds (the lock of a log write that a SIGTERM interrupted, a
    queue the main thread drains). The main thread's handler calls shutdown(): it waited for the tier's lock
    while the lock's holder waited for it, for ever. It asks after stop_timeout instead, and the other
    thread's next call carries the shutdown out; every job still gets its one result."""
    tier = make_tier(n_read_workers=1, n_write_workers=1, config=TierConfig(stop_timeout=0.5))
    wait_ready(tier)
    in_emit, let_go = threading.Event(), threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            in_emit.set()
            let_go.wait(5)  # for ever, in a real host: what it waits for is held by the interrupted thread

    waiting = Waiting(logging.WARNING)
    logging.getLogger("mp_tier").addHandler(waiting)
    previous = signal.signal(signal.SIGALRM, lambda *_: tier.shutdown())
    try:
        tier.submit_store(JobMetadata(job_id=1, keys=make_keys(1), block_ids=[0]))
        os.kill(tier.worker_pids()[0], signal.SIGKILL)  # the next call logs its death, holding the tier's lock
        got: list = []  # what the poller's calls hand out: the one that carries the shutdown out may end job 1
        poller = threading.Thread(target=lambda: [got.extend(tier.get_finished()) for _ in iter(in_emit.is_set, True)])
        poller.start()
        assert in_emit.wait(10)
        started = time.monotonic()
        signal.raise_signal(signal.SIGALRM)
        took = time.monotonic() - started
        let_go.set()
        poller.join(10)
    finally:
        let_go.set()
        signal.signal(signal.SIGALRM, previous)
        logging.getLogger("mp_tier").removeHandler(waiting)
    assert took < 3, f"the handler's shutdown() waited {took:.1f} s for a thread that waited for it"
    results = got + tier.get_finished()  # this call carries the shutdown out, if the poller's last did not
    assert [r.job_id for r in results] == [1] and tier.worker_pids() == []


def test_a_child_forked_while_tiers_shut_down_closes_its_copies_without_an_error(cache, tmp_path):
    """A fork from another thread lands while ``shutdown`` closes fds (each close lets the GIL go): the child's fork
    handler closes its copies of every tier's fds. An fd the parent closed but had not yet marked closed made
    the child's close fail (EBADF), which ended its handler early: that child kept the rest, the task pipes'
    write ends among them, which keep workers waiting on a host that may have died."""
    failed = []  # in a child: the handler's errors (unraisable: a fork handler cannot raise)
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: failed.append(unraisable.exc_value)
    stop = threading.Event()
    children = []  # exit codes: 1 = the fork handler failed there

    def forker() -> None:
        while not stop.is_set():
            before = len(failed)
            if (pid := os.fork()) == 0:
                os._exit(1 if len(failed) > before else 0)
            children.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

    thread = threading.Thread(target=forker, name="forker")
    try:
        thread.start()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for engine in ("threads", "processes"):
                config = TierConfig(engine=engine, n_read_workers=1, n_write_workers=1, io_depth=1)
                FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path), config=config).shutdown()
        stop.set()
        thread.join(10)
    finally:
        stop.set()
        sys.unraisablehook = hook
    assert children and children.count(1) == 0, f"{children.count(1)} of {len(children)} children's fork handlers failed"


@pytest.mark.parametrize("phase", ["built", "shut down"])
@pytest.mark.parametrize("engine", ["threads", "processes"])
def test_a_child_forked_while_a_tier_is_built_or_shut_down_holds_none_of_its_fds(cache, tmp_path, engine, phase):
    """Forks from another thread land only while a tier is built (its workers started) or shut down (its
    closes, its reaps): the child holds none of the tier's pipes, slots, pidfds or cache file after its fork
    handlers, beyond a part in its making or its closing at the fork (a pipe's two ends). Before, the tier's
    fds were listed for a child only once built, the pool's once all made, and the pool left the list before
    closing them, and a worker before it was reaped: most children forked in a build kept the cache's file
    and the wake pipe, and about 1 in 7 forked in a shutdown kept pipes, the slots or pidfds."""
    before = open_fds()
    inside = threading.Event()
    stop = threading.Event()
    # per child: the tier's fds it held (not its own report pipe); a worker thread's own fds (its epoll, a block
    # file, a scan's copies of the namespace directory) are those of a thread the child does not have
    held: list[list[str]] = []
    kinds = ("pipe:", "/memfd:", "anon_inode:[pidfd]", "/dev/shm/")

    def forker() -> None:
        while not stop.is_set():
            if not inside.wait(0.01):
                continue
            r, w = os.pipe()
            if (pid := os.fork()) == 0:
                mine = [what for fd, what in open_fds().items() if before.get(fd) != what and fd not in (r, w)]
                os.write(w, json.dumps([what for what in mine if what.startswith(kinds)]).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as told:
                held.append(json.loads(told.read()))
            assert os.waitpid(pid, 0)[1] == 0

    thread = threading.Thread(target=forker, name="forker")
    thread.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or len(held) < 100:
            assert time.monotonic() < deadline + 20, f"only {len(held)} forks landed while a tier was {phase}"
            config = TierConfig(engine=engine, n_read_workers=1, n_write_workers=1, io_depth=1)
            if phase == "built":
                inside.set()
            tier = FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path), config=config)
            if phase == "built":
                inside.clear()
            else:
                inside.set()
            tier.shutdown()
            inside.clear()
    finally:
        stop.set()
        thread.join(10)
    kept = [fds for fds in held if len(fds) > 2]
    assert not kept, f"{len(kept)} of {len(held)} children kept more of the tier's fds than a pipe's two ends, e.g. {kept[:3]}"


def test_a_grandchild_forked_from_a_forked_child_closes_none_of_the_childs_fds(make_tier, tmp_path):
    """A child of the host lets go of the tier's fds, then opens files of its own, which take the lowest free
    numbers, the tier's among them; its own child (a fork of the fork) must close none of them. The tier's
    fork handler closed its list again in every later fork, so the grandchild lost the child's files."""
    tier = make_tier()
    r, w = os.pipe()
    if (pid := os.fork()) == 0:
        mine = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY) for _ in range(8)]  # the tier's numbers are free
        if (grandchild := os.fork()) == 0:
            os.write(w, json.dumps([fd for fd in mine if not os.path.exists(f"/proc/self/fd/{fd}")]).encode())
            os._exit(0)
        os._exit(os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1]))
    os.close(w)
    with os.fdopen(r, "rb") as told:
        lost = json.loads(told.read() or b"null")
    assert os.waitpid(pid, 0)[1] == 0
    assert lost == [], f"the grandchild's fork handlers closed the child's fds {lost}"
    tier.shutdown()
