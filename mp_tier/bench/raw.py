"""The same I/O with no tier: plain ``os.pwrite``/``os.preadv`` loops in as many processes as the tier has workers.

Their throughput is the disk's reachable ceiling for the tier, and their
busy/idle the cost a host feels from the I/O alone.
"""

from __future__ import annotations

import mmap
import multiprocessing
import multiprocessing.connection
import os
import time
from multiprocessing.connection import Connection
from typing import Any

from .case import Case
from .driver import Spinner
from .progress import make_bar
from .records import GB, RunRecord
from .units import size_label


def raw_store(path: str, block: memoryview, direct_flag: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | direct_flag
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, flags, 0o600)
    try:
        done = 0
        while done < len(block):
            done += os.pwrite(fd, block[done:], done)
    finally:
        os.close(fd)


def raw_load(path: str, block: memoryview, direct_flag: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | direct_flag)
    try:
        done = 0
        while done < len(block):
            got = os.preadv(fd, [block[done:]], done)
            if not got:
                raise EOFError(f"{path} ended after {done} bytes")
            done += got
    finally:
        os.close(fd)


def raw_worker(op: str, paths: list[str], block_bytes: int, direct: bool, batch: int, conn: Connection) -> None:
    """One raw process: open, pwrite or preadv the whole block, close, for each of its files.

    It reports ("ready"), waits for "go", reports ("blocks", n) every ``batch``
    files, and ends with ("done", CPU seconds of the loop) or ("error", message).
    """
    buffer = mmap.mmap(-1, block_bytes)  # page aligned, as O_DIRECT needs
    buffer.write(os.urandom(block_bytes))
    block = memoryview(buffer)
    move = raw_store if op == "store" else raw_load
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    conn.send(("ready", 0))
    conn.recv()
    t0 = time.process_time()  # nanoseconds, where os.times() counts 10 ms ticks
    try:
        for i, path in enumerate(paths, 1):
            move(path, block, flag)
            if i % batch == 0 or i == len(paths):
                conn.send(("blocks", (i - 1) % batch + 1))
    except (OSError, EOFError) as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("done", time.process_time() - t0))


def raw_run(case: Case, op: str, phase: str, paths: list[str]) -> RunRecord:
    """``paths`` split over as many processes as the tier has workers, the host spinning as with a tier."""
    os.sync()
    read, write = case.settings.workers
    n = read + write
    block = case.settings.block_size
    ctx = multiprocessing.get_context("forkserver")
    conns, procs = [], []
    try:
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=raw_worker, args=(op, paths[i::n], block, bool(case.direct), case.settings.blocks_per_job, child), daemon=True
            )
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        for conn in conns:
            conn.recv()  # ready: process start-up is not the disk's time
        return _raw_measure(case, op, phase, conns, len(paths))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _raw_measure(case: Case, op: str, phase: str, conns: list[Connection], n_paths: int) -> RunRecord:
    block = case.settings.block_size
    spinner = Spinner(case.spin_chunk)
    running = set(conns)

    def poll() -> list[Any]:
        return multiprocessing.connection.wait(running, 0 if spinner.chunk else 0.05)

    spinner.measure_idle(poll, case.args.idle_seconds)
    bar = make_bar(case.args.progress, f"{op} {phase} {size_label(block)} raw", n_paths * block)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for conn in conns:
        conn.send("go")
    blocks, worker_cpu = 0, 0.0
    errors: list[str] = []
    while running:
        for conn in poll():
            kind, value = conn.recv()
            if kind == "blocks":
                blocks += value
                bar.update(value * block)
            else:
                running.discard(conn)
                worker_cpu += value if kind == "done" else 0.0
                errors += [value] if kind == "error" else []
        if spinner.chunk:
            spinner.slice()
    wall = time.perf_counter() - t0
    host_cpu = time.process_time() - cpu0 - spinner.busy_cpu
    bar.close()
    spinner.measure_idle(poll, case.args.idle_seconds)
    gb = blocks * block / GB
    read, write = case.settings.workers
    return RunRecord(
        workload="store" if op == "store" else "load",
        phase=phase,
        engine="raw",
        sweep=case.sweep,
        block_bytes=block,
        blocks_per_job=case.settings.blocks_per_job,
        read_workers=read,
        write_workers=write,
        inflight=case.settings.inflight,
        direct=bool(case.direct),
        wall_s=wall,
        bytes=blocks * block,
        blocks=blocks,
        gbps=gb / wall,
        blocks_per_s=blocks / wall,
        job_ms=None,
        submit_us=None,
        poll_us=None,
        host_cpu_s_per_gb=host_cpu / gb if gb else None,
        worker_cpu_s_per_gb=worker_cpu / gb if gb else None,
        busy_idle=spinner.busy_idle(),
        idle_loop_rate=spinner.rate("idle"),
        errors=errors,
    )
