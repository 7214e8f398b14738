"""``mp-tier clean ROOT [--dry-run] [--max-bytes N]``: what the tier's own sweep removes, from outside a tier.

Safe beside running tiers, on this node and on others sharing the root:
- a temp file goes only by the sweep's rule (``temp_is_stale``: its writer
  on this host is gone, or it is STALE_TEMP_SECONDS old), so a live
  writer's file, here or on another host, stays;
- an empty directory of the layout goes only if nothing was created or
  removed in it for STALE_TEMP_SECONDS (its mtime, read before this run
  touched it), and ``rmdir`` itself refuses one that a store filled
  meanwhile. A store that opened such a directory in the microseconds
  before it went fails that one block (ENOENT), as a store racing another
  node's eviction does; the next store makes the directory again;
- ``--max-bytes`` evicts least recently used blocks (mtime, the order the
  tier's start-up scan rebuilds) across ROOT, and passes over one whose
  mtime changed since it was listed: a tier used it meanwhile.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from ..beneath import open_dir
from ..block_io import remove_block
from ..housekeeping import STALE_TEMP_SECONDS
from .tree import BLOCK, STALE_TEMP, Namespace, Walk, namespaces, open_root, shown, walk


@dataclass
class Cleaned:
    """What was removed (or, with ``--dry-run``, would be), as ``--json`` prints it."""

    dry_run: bool
    stale_temps: int = 0
    temp_bytes: int = 0
    dirs: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    block_bytes_left: int = 0
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _lru_victims(root_fd: int, root: str, max_bytes: int) -> set[tuple[str, str, int]]:
    """(namespace, block path, mtime_ns) of the least recently used blocks to evict to fit ``max_bytes``."""
    found: list[tuple[int, int, str, str]] = []
    for ns in namespaces(root_fd, root):
        if ns.fd >= 0:
            found += [(e.st.st_mtime_ns, e.st.st_size, ns.name, e.path.rel) for e in walk(ns, Walk()) if e.kind == BLOCK and e.st]
    found.sort()
    excess = sum(size for _, size, _, _ in found) - max_bytes
    victims = set()
    for mtime_ns, size, name, rel in found:
        if excess <= 0:
            break
        victims.add((name, rel, mtime_ns))
        excess -= size
    return victims


def _clean_namespace(ns: Namespace, victims: set[tuple[str, str, int]], done: Cleaned, now: float) -> None:
    seen = Walk()
    gone: dict[str, int] = {}  # directory -> entries removed from it
    for entry in walk(ns, seen, now):
        st, where = entry.st, f"{shown(ns.name)}/{shown(entry.path.rel)}"
        if entry.kind == STALE_TEMP and st is not None:
            if not done.dry_run:
                try:
                    os.unlink(entry.path.name, dir_fd=entry.dirfd)
                except FileNotFoundError:
                    continue  # its writer finished it, or another sweeper got it
            done.stale_temps += 1
            done.temp_bytes += st.st_size
            done.removed.append(f"stale temp {where}")
        elif entry.kind == BLOCK and st is not None:
            if (ns.name, entry.path.rel, st.st_mtime_ns) in victims:
                if done.dry_run or remove_block(ns.fd, entry.path):
                    done.evicted += 1
                    done.evicted_bytes += st.st_size
                    done.removed.append(f"least recently used block {where}")
                    gone[entry.path.dir] = gone.get(entry.path.dir, 0) + 1
                continue
            done.block_bytes_left += st.st_size
            continue
        else:
            continue
        gone[entry.path.dir] = gone.get(entry.path.dir, 0) + 1
    for d in reversed(seen.layout_dirs):  # so each directory comes after the ones inside it
        if d.entries > gone.get(d.path, 0) or now - d.mtime <= STALE_TEMP_SECONDS:
            continue
        parent, _, name = d.path.rpartition("/")
        if not done.dry_run and not _rmdir(ns.fd, parent, name):
            continue
        done.dirs += 1
        done.removed.append(f"empty directory {shown(ns.name)}/{shown(d.path)}")
        gone[parent] = gone.get(parent, 0) + 1


def _rmdir(ns_fd: int, parent: str, name: str) -> bool:
    """Remove an empty directory below the namespace; False if it is gone or no longer empty."""
    try:
        fd = open_dir(ns_fd, parent) if parent else ns_fd
        try:
            os.rmdir(name, dir_fd=fd)
        finally:
            if fd != ns_fd:
                os.close(fd)
    except OSError:
        return False  # filled by a store meanwhile (ENOTEMPTY), or removed by someone else
    return True


def run(root: str, dry_run: bool, max_bytes: int | None, as_json: bool) -> int:
    root_fd = open_root(root)
    done = Cleaned(dry_run)
    try:
        victims = _lru_victims(root_fd, root, max_bytes) if max_bytes is not None else set()
        now = time.time()
        for ns in namespaces(root_fd, root):
            if ns.problem:
                done.skipped.append(f"namespace {shown(ns.name)}: skipped: {ns.problem}")
            else:
                _clean_namespace(ns, victims, done, now)
    finally:
        os.close(root_fd)
    if as_json:
        print(json.dumps(asdict(done), indent=1))
        return 0
    verb = "would remove" if dry_run else "removed"
    for line in done.skipped + [f"{verb} {item}" for item in done.removed]:
        print(line)
    print(
        f"{verb}: {done.stale_temps:,} stale temp files ({done.temp_bytes:,} bytes), {done.dirs:,} empty directories, "
        f"{done.evicted:,} blocks evicted ({done.evicted_bytes:,} bytes); {done.block_bytes_left:,} bytes of blocks left"
    )
    return 0
