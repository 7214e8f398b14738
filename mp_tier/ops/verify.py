"""``mp-tier verify ROOT [--fix]``: read every block and report what a load would find wrong.

The check is the block I/O code's own (``block_problem``: size, end of
file, recorded CRC32, owner and mode). ``--fix`` then hands each corrupt
block to ``load_block`` itself, which re-reads it and removes it only if it
is still corrupt: exactly what a load would remove, and never a block
rewritten meanwhile or one that could not be read.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..bench.progress import make_bar
from ..block_io import CorruptBlock, block_problem, describe, load_block
from .tree import BLOCK, REFUSED, Entry, Namespace, Walk, namespaces, open_root, shown, walk

GB = 1e9


@dataclass
class Problem:
    namespace: str
    path: str
    problem: str
    removed: bool = False


def _blocks(ns: Namespace, problems: list[Problem]) -> list[Entry]:
    """The namespace's files at block names, listed before any is read; refused ones too, which a load
    reports as it opens them (ELOOP, EACCES, EPERM)."""
    seen = Walk()
    found = [entry._replace(dirfd=-1) for entry in walk(ns, seen) if entry.kind in (BLOCK, REFUSED)]  # the walk closes its dirs
    problems += [Problem(shown(ns.name), where, "unreadable directory") for where in seen.unreadable]
    return found


def _check(ns: Namespace, blocks: list[Entry], fix: bool, problems: list[Problem], bar_update: Callable[[int], object]) -> int:
    """Read each block; return the bytes read."""
    nbytes = ns.block_bytes
    assert nbytes is not None
    buffer = mmap.mmap(-1, nbytes)
    view = memoryview(buffer)
    done = 0
    try:
        for entry in blocks:
            try:
                problem = block_problem(ns.fd, entry.path, view, ns.owners, checksum=True)
            except FileNotFoundError:
                continue  # evicted or replaced meanwhile: not a problem of this block
            except OSError as e:
                problem = f"{describe(e)[0]}: {e.strerror}"
            done += nbytes
            bar_update(nbytes)
            if problem is None:
                continue
            found = Problem(shown(ns.name), shown(entry.path.rel), problem)
            if fix and problem.startswith("EBADMSG"):
                found.removed = _remove_as_a_load_would(ns, entry, view)
            problems.append(found)
    finally:
        view.release()
        buffer.close()
    return done


def _remove_as_a_load_would(ns: Namespace, entry: Entry, view: memoryview) -> bool:
    try:
        load_block(ns.fd, entry.path, view, 0, len(view), direct=False, checksum=True, owners=ns.owners)
    except CorruptBlock:
        return True
    except OSError:
        pass  # unreadable now, or gone: nothing proves it bad
    return False


def run(root: str, fix: bool, as_json: bool) -> int:
    """0 if every block would load, 1 if any would not."""
    root_fd = open_root(root)
    problems: list[Problem] = []
    skipped: list[str] = []
    blocks = total = 0
    t0 = time.perf_counter()
    try:
        for ns in namespaces(root_fd, root):
            if ns.problem or ns.block_bytes is None:
                skipped.append(f"namespace {shown(ns.name)}: skipped: {ns.problem or 'config.json records no block_bytes'}")
                continue
            found = _blocks(ns, problems)
            bar = make_bar(sys.stderr.isatty(), f"verify {shown(ns.name)}", len(found) * ns.block_bytes)
            try:
                total += _check(ns, found, fix, problems, bar.update)
            finally:
                bar.close()
            blocks += len(found)
    finally:
        os.close(root_fd)
    seconds = time.perf_counter() - t0
    rate = total / GB / seconds if seconds else 0.0
    if as_json:
        summary = {"blocks": blocks, "bytes": total, "seconds": round(seconds, 3), "gb_per_s": round(rate, 3)}
        print(json.dumps({"root": shown(root), "skipped": skipped, "problems": [asdict(p) for p in problems], **summary}, indent=1))
    else:
        for line in skipped:
            print(line)
        for p in problems:
            print(f"{p.namespace}/{p.path}: {p.problem}{', removed' if p.removed else ''}")
        removed = sum(p.removed for p in problems)
        print(
            f"verified {blocks:,} blocks ({total / GB:.3f} GB) in {seconds:.2f} s, {rate:.2f} GB/s: "
            f"{len(problems):,} problems" + (f", {removed:,} corrupt blocks removed" if fix else "")
        )
    return 1 if problems else 0
