"""Hosts the tier does not control: ones that reap every child themselves, and ones that run out of fds or
processes for a while. Each runs as a real host process (its SIGCHLD disposition and rlimits are its own),
with real SIGKILLs of its workers; it prints a JSON report the test checks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

HOST_SETUP = textwrap.dedent(
    """
    import json, os, resource, signal, sys, time
    from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
    root, mode = sys.argv[1], sys.argv[2]
    report = {}

    def until(what, seconds=20):
        deadline = time.monotonic() + seconds
        while not what():
            assert time.monotonic() < deadline, "timed out waiting"
            tier.wait(0.01)

    def results(n):
        got, deadline = [], time.monotonic() + 20
        while len(got) < n:
            assert time.monotonic() < deadline, "timed out waiting for results"
            tier.wait(0.05)
            got += tier.get_finished()
        return got

    def ready(n):
        until(lambda: (s := tier.stats()).workers_alive == n and not s.workers_starting)

    def store(job_id):
        return JobMetadata(job_id=job_id, keys=[job_id.to_bytes(36, "big")], block_ids=[job_id % 16])
    """
)

REAPING_HOST = HOST_SETUP + textwrap.dedent(
    """
    if mode == "ignore":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps every child at once
    else:
        def reap_all(signum, frame):
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
        signal.signal(signal.SIGCHLD, reap_all)
    cache = PrimaryCache.create(16, 1 << 20)
    fds = len(os.listdir("/proc/self/fd"))
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=1, n_write_workers=1,
                                 config=TierConfig(o_direct="off"))
    ready(2)
    jobs = [JobMetadata(job_id=j, keys=[bytes([j, i]) * 18 for i in range(8)], block_ids=list(range(8))) for j in range(20)]
    for job in jobs:
        tier.submit_store(job)
    victim = tier.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    got = results(len(jobs))
    report["results"] = sorted(r.job_id for r in got)
    report["failed"] = [r.error for r in got if not r.success]
    until(lambda: tier.stats().workers_restarted == 1)
    ready(2)
    tier.submit_store(store(100))
    report["after"] = [(r.job_id, r.success) for r in results(1)]
    pids = tier.worker_pids()
    tier.shutdown()
    tier.shutdown()
    report["fds_left"] = len(os.listdir("/proc/self/fd")) - fds
    report["workers_left"] = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    cache.close()
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("mode", ["ignore", "handler"])
def test_a_host_that_reaps_its_children_gets_every_result_and_a_clean_shutdown(tmp_path, mode):
    """SIGCHLD set to SIG_IGN, or a handler that waits for every child: a killed worker is replaced, each job
    gets one result, and shutdown() (twice) leaves no worker and no fd."""
    host = subprocess.run([sys.executable, "-c", REAPING_HOST, str(tmp_path), mode], capture_output=True, text=True, timeout=60)
    assert host.returncode == 0, host.stderr
    report = json.loads(host.stdout)
    assert report["results"] == list(range(20)), "every job gets exactly one result"
    assert all("died" in error for error in report["failed"]), report["failed"]
    assert report["after"] == [[100, True]]
    assert report["fds_left"] == 0 and report["workers_left"] == []
    assert "ChildProcessError" not in host.stderr
    if mode == "ignore":  # the kernel reaped the worker: its status is gone, and the tier says so
        assert "died: exit status unknown (the host reaped it" in host.stderr


CLOSED_STDIO_HOST = HOST_SETUP + textwrap.dedent(
    """
    cache = PrimaryCache.create(16, 1 << 20)
    cache.array[0] = 7
    for fd in (0, 1, 2):
        os.close(fd)  # a daemon's: the lowest free numbers, which the tier's next fds take
    fds = sorted(os.listdir("/proc/self/fd"))
    try:
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=1, n_write_workers=1,
                                     config=TierConfig(o_direct="off", engine=sys.argv[3]))
        ready(2)
        report["stdin"] = [os.readlink(f"/proc/{pid}/fd/0") for pid in tier.worker_pids()]
        for out in (sys.stdout, sys.stderr):  # it still prints
            try:
                out.write("stray\\n")
                out.flush()
            except OSError:
                pass  # EBADF: the number is free, as the host left it
        keys = [bytes([i]) * 36 for i in range(4)]
        tier.submit_store(JobMetadata(job_id=1, keys=keys, block_ids=[0] * 4))
        report["results"] = [(r.job_id, r.success, r.error) for r in results(1)]
        tier.submit_load(JobMetadata(job_id=2, keys=keys, block_ids=[1, 2, 3, 4]))
        report["results"] += [(r.job_id, r.success, r.error) for r in results(1)]
        report["loaded"] = bool((cache.array[1:5] == 7).all())
        tier.shutdown()
        report["fds_left"] = sorted(set(os.listdir("/proc/self/fd")) ^ set(fds))
    except BaseException as e:
        report["error"] = repr(e)
    with open(mode, "w") as f:  # no stdout here
        json.dump(report, f)
    cache.close()
    """
)


STRAY_WRITES_HOST = textwrap.dedent(
    """
    import json, os, signal, sys
    for fd in (0, 1, 2):
        os.close(fd)  # a daemon's, which still prints: sys.stdout and sys.stderr still write to fds 1 and 2
    from mp_tier import PrimaryCache
    first = PrimaryCache.create(4, 4096)
    for out in (sys.stdout, sys.stderr):
        try:
            out.write("stray")  # no newline: it would run into the janitor's next word
            out.flush()
        except OSError:
            pass  # EBADF: the number is free, as the host left it
    second = PrimaryCache.create(4, 4096)
    with open(sys.argv[1], "w") as f:
        json.dump({"segments": [first.name, second.name], "block0": bytes(first.array[0, :8]).hex()}, f)
    os.kill(os.getpid(), signal.SIGKILL)  # the janitor unlinks both
    """
)


def test_a_hosts_stray_writes_to_its_closed_stdio_never_reach_the_cache_or_the_janitor(tmp_path):
    """A daemon closed fds 0-2 but still prints. The cache's file took fd 2 and the janitor's pipe fd 1: what
    the host wrote to stderr landed in block 0 of the KV cache, and what it wrote to stdout ran into the
    janitor's next word ("stray+<name>"), so that segment outlived the host's SIGKILL. They keep off 0-2 now."""
    report_path = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", STRAY_WRITES_HOST, str(report_path)], timeout=60)
    report = json.loads(report_path.read_text())
    assert report["block0"] == "00" * 8, f"block 0 of the cache holds {bytes.fromhex(report['block0'])!r}"
    deadline = time.monotonic() + 10
    while left := [name for name in report["segments"] if os.path.exists(f"/dev/shm/{name}")]:
        assert time.monotonic() < deadline, f"segments {left} outlived the killed host"
        time.sleep(0.01)


@pytest.mark.parametrize("engine", ["processes", "threads"])
def test_a_host_with_its_stdio_closed_gets_working_workers_and_its_numbers_back(tmp_path, engine):
    """A daemon closed fds 0-2, so the tier's fds took those numbers: a worker passed its cache at fd 0 got
    /dev/null there instead (its stdin), and every worker died at start, breaking the tier; one passed a pipe
    at fd 2 would write its traceback into it; a worker thread's death pipe took fd 1, and the host's next
    print to stdout read as that thread's end: its join hung the host's next call. The tier's fds stay above
    stdio, and leave 0-2 free."""
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-c", CLOSED_STDIO_HOST, str(tmp_path / "root"), str(report_path), engine]
    host = subprocess.run(command, timeout=30)
    assert host.returncode == 0
    report = json.loads(report_path.read_text())
    assert "error" not in report, report["error"]
    assert report["results"] == [[1, True, None], [2, True, None]] and report["loaded"]
    assert report["stdin"] == (["/dev/null", "/dev/null"] if engine == "processes" else [])
    assert report["fds_left"] == [], "the tier left an fd, or took one of 0-2 for good"


STARVE = textwrap.dedent(
    """
    cache = PrimaryCache.create(16, 65536)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    highest = max(map(int, os.listdir("/proc/self/fd")))
    sockets = [os.open("/dev/null", os.O_RDONLY)]  # the host's own fds (sockets, say), every number below the tier's
    while sockets[-1] <= max(highest, 12):  # a new fd takes the lowest free number: the holes fill first
        sockets.append(os.open("/dev/null", os.O_RDONLY))
    floor = sockets[-1] + 1  # every fd below is open, and the tier's fds will all be above

    def starve():  # no new fd (every number below the limit is the host's), or no new process, for this host
        if mode == "fds":
            resource.setrlimit(resource.RLIMIT_NOFILE, (floor, nofile[1]))
        else:
            resource.setrlimit(resource.RLIMIT_NPROC, (1, nproc[1]))  # this uid runs more than one process already

    def plenty():
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        resource.setrlimit(resource.RLIMIT_NPROC, nproc)
    """
)

# How a short host ends once no worker is left: a job waits up to start_timeout and fails naming the shortage;
# once the limit is lifted, the tier recovers.
SHORTAGE_END = textwrap.dedent(
    """
    tier.submit_store(store(2))  # no worker at all: it waits, up to start_timeout, then fails naming the shortage
    report["no_worker"] = [(r.job_id, r.error_code, r.error) for r in results(1)]
    report["no_worker_counted"] = tier.lookup_many(store(2).keys, probe=False)  # it never ran: nothing of it is on disk
    report["alive_while_short"] = tier.stats().workers_alive
    plenty()
    ready(3)
    tier.submit_store(store(3))
    report["after"] = [(r.job_id, r.success) for r in results(1)]
    report["stats"] = {k: getattr(tier.stats(), k) for k in ("workers_restarted", "spawns_failed")}
    tier.shutdown()
    cache.close()
    print(json.dumps(report))
    """
)

STARVED_HOST = HOST_SETUP + STARVE + textwrap.dedent(
    """
    if mode == "nproc":  # at construction: the error names the limit, and nothing is left open
        fds = len(os.listdir("/proc/self/fd"))
        starve()
        try:
            FileSystemTierManager(primary_kv_view=cache, root_dir=root)
        except OSError as e:
            report["ctor"] = str(e)
        plenty()
        report["ctor_fds_left"] = len(os.listdir("/proc/self/fd")) - fds
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=1, n_write_workers=2,
                                 config=TierConfig(start_timeout=3))  # boots on a loaded machine take over 1 s
    ready(3)
    starve()
    os.kill(tier.worker_pids()[0], signal.SIGKILL)
    until(lambda: tier.stats().spawns_failed >= 7)  # the old rule broke the tier after 5 over 2 s
    tier.submit_store(store(1))  # the two workers left serve it
    report["served_while_short"] = [(r.job_id, r.success) for r in results(1)]
    for pid in tier.worker_pids():
        os.kill(pid, signal.SIGKILL)
    until(lambda: not tier.worker_pids())
    """
) + SHORTAGE_END


def _check_survived(host: subprocess.CompletedProcess[str], code: str, served: bool = True) -> dict:
    """``served``: whether the workers left serve a store in the shortage (worker threads share the host's fds)."""
    assert host.returncode == 0, host.stderr
    report = json.loads(host.stdout)
    assert report["served_while_short"] == [[1, served]]
    [(job_id, error_code, error)] = report["no_worker"]
    assert (job_id, error_code) == (2, code), error
    assert error.startswith("no worker could be started for 3 s (start_timeout)")
    assert report["no_worker_counted"] == [False]
    assert report["alive_while_short"] == 0
    assert report["after"] == [[3, True]]
    assert report["stats"]["workers_restarted"] >= 3 and report["stats"]["spawns_failed"] >= 7
    assert "TierBroken" not in host.stderr
    return report


def test_a_host_out_of_fds_for_a_while_keeps_serving_and_recovers(tmp_path):
    """Every fd taken while workers die: replacements are retried, never counted as deaths at start, the
    live workers serve, a job with no worker left fails with EMFILE at start_timeout, and the tier recovers."""
    host = subprocess.run([sys.executable, "-c", STARVED_HOST, str(tmp_path), "fds"], capture_output=True, text=True, timeout=60)
    _check_survived(host, "EMFILE")
    assert "ulimit -n" in host.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="a second real uid needs root and setpriv")
def test_a_host_out_of_processes_names_rlimit_nproc_and_survives_a_shortage(tmp_path):
    """RLIMIT_NPROC binds a process whose real uid is not root and that lacks CAP_SYS_RESOURCE: the host runs
    under a real uid of its own (no other process has it, so the count is exactly its own) with those
    capabilities dropped; its effective uid stays root so it can still run this interpreter under /root."""
    uid = 200_000 + os.getpid() % 100_000
    drop = ["setpriv", f"--ruid={uid}", "--bounding-set=-sys_resource,-sys_admin"]
    host = subprocess.run([*drop, sys.executable, "-c", STARVED_HOST, str(tmp_path), "nproc"], capture_output=True, text=True, timeout=60)
    report = _check_survived(host, "EAGAIN")
    assert "RLIMIT_NPROC is 1 (raise it: ulimit -u)" in report["ctor"] and report["ctor_fds_left"] == 0


THREADLESS_HOST = HOST_SETUP + textwrap.dedent(
    """
    import threading
    cache = PrimaryCache.create(16, 65536)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    fds = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NPROC, (1, nproc[1]))  # no new thread either: each is a task of this uid
    try:
        FileSystemTierManager(primary_kv_view=cache, root_dir=root, config=TierConfig(engine="threads"))
    except Exception as e:
        report["ctor"] = [isinstance(e, OSError), getattr(e, "errno", None), f"{type(e).__name__}: {e}"]
    resource.setrlimit(resource.RLIMIT_NPROC, nproc)
    report["fds_left"] = len(os.listdir("/proc/self/fd")) - fds
    report["threads_left"] = [t.name for t in threading.enumerate() if t.name.startswith("mp_tier-")]
    cache.close()
    print(json.dumps(report))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="a second real uid needs root and setpriv")
def test_a_threads_engine_host_out_of_processes_gets_the_oserror_the_processes_engine_gives(tmp_path):
    """A worker thread that cannot start fails as a worker process does: an OSError (EAGAIN) naming the limit,
    and nothing left open. The tier's restarts retry OSErrors only: a RuntimeError would get past them."""
    uid = 200_000 + os.getpid() % 100_000
    drop = ["setpriv", f"--ruid={uid}", "--bounding-set=-sys_resource,-sys_admin"]
    host = subprocess.run([*drop, sys.executable, "-c", THREADLESS_HOST, str(tmp_path), "nproc"], capture_output=True, text=True, timeout=60)
    assert host.returncode == 0, host.stderr
    report = json.loads(host.stdout)
    is_oserror, code, message = report["ctor"]
    assert (is_oserror, code) == (True, errno.EAGAIN), message
    assert "cannot start another thread: this user's RLIMIT_NPROC is 1 (raise it: ulimit -u)" in message
    assert report["fds_left"] == 0 and report["threads_left"] == []


THREADS_STARVED_HOST = HOST_SETUP + STARVE + textwrap.dedent(
    """
    import ctypes, threading
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=root, n_read_workers=1, n_write_workers=2,
                                 config=TierConfig(engine="threads", start_timeout=3))
    ready(3)
    wakers = iter(range(1000, 2000))

    def kill(names):  # a thread cannot be SIGKILLed: it ends at its next bytecode, once a task wakes it
        threads = [t for t in threading.enumerate() if t.name in names]
        for t in threads:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(SystemExit))
        sent = 0
        while alive := sum(t.is_alive() for t in threads):  # one store at a time, until it ends one or is done
            tier.submit_store(store(next(wakers)))
            sent += 1
            until(lambda: sum(t.is_alive() for t in threads) < alive or not tier.stats().jobs_active, 5)
        return sent

    names = sorted(t.name for t in threading.enumerate() if t.name.startswith("mp_tier-"))
    starve()
    results(kill(names[:1]))  # the two workers left serve them (one lost with the dead worker is sent again)
    until(lambda: tier.stats().spawns_failed >= 7)  # a RuntimeError of the thread start escaped the tier's pump
    tier.submit_store(store(1))
    report["served_while_short"] = [(r.job_id, r.success) for r in results(1)]
    woken = kill([t.name for t in threading.enumerate() if t.name.startswith("mp_tier-")])
    until(lambda: not tier.stats().workers_alive)
    results(woken)  # the last ones wait for start_timeout with no worker, as store 2 does
    """
) + SHORTAGE_END


@pytest.mark.parametrize("mode", ["nproc", "fds"])
def test_a_threads_engine_tier_whose_worker_threads_die_in_a_shortage_waits_and_recovers(tmp_path, mode):
    """Worker threads die while no thread (RLIMIT_NPROC, as a second real uid) or no fd can be had: the tier
    retries their starts as it retries a worker process's spawn, the live ones serve (short of fds, which they
    share with the host, their stores fail), a job with no worker fails at start_timeout naming the limit, and
    the tier recovers once it is lifted. The thread start's RuntimeError escaped the tier's pump before."""
    if mode == "nproc" and (os.geteuid() != 0 or not shutil.which("setpriv")):
        pytest.skip("a second real uid needs root and setpriv")
    uid = 200_000 + os.getpid() % 100_000
    drop = ["setpriv", f"--ruid={uid}", "--bounding-set=-sys_resource,-sys_admin"] if mode == "nproc" else []
    host = subprocess.run([*drop, sys.executable, "-c", THREADS_STARVED_HOST, str(tmp_path), mode], capture_output=True, text=True, timeout=60)
    report = _check_survived(host, "EAGAIN" if mode == "nproc" else "EMFILE", served=mode == "nproc")
    assert ("RLIMIT_NPROC is 1 (raise it: ulimit -u)" if mode == "nproc" else "ulimit -n") in report["no_worker"][0][2]
