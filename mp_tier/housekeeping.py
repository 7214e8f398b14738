"""The tier's housekeeping over a whole namespace: the scan of block files at start, and the sweep of temp files dead writers left.

Both walk the namespace directory's fd with ``os.fwalk`` and never follow a
symlink; they enter only the directories the layout makes, so whatever a
stranger plants elsewhere is counted as foreign and never read or removed.
A worker runs them as the SCAN and SWEEP tasks; the host runs the sweep
itself after its workers are stopped; ``mp-tier clean`` applies the same rule.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from .beneath import open_beneath
from .layout import BlockLayout, BlockPath, is_temp, temp_target, temp_writer_pid
from .namespace import Owners

# A store takes milliseconds; a temp file this old is dead on any host.
STALE_TEMP_SECONDS = 3600


def scan_blocks(root: int, owners: Owners) -> tuple[list[bytes], int]:
    """Keys of every block file below ``root``, least recently used (mtime) first, and how many names were not ours.

    A name the layout does not give, or a block name on anything but a
    regular file of an allowed owner, is skipped and counted, never trusted.
    """
    found: list[tuple[int, bytes]] = []
    foreign = 0
    for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=root, follow_symlinks=False):
        parents = dirpath.split("/")[1:]
        layout_dirs = [name for name in dirnames if BlockLayout.is_layout_dir(parents, name)]
        foreign += len(dirnames) - len(layout_dirs)
        dirnames[:] = layout_dirs
        for name in filenames:
            key = BlockLayout.parse_block(parents, name)
            if key is None:
                foreign += not BlockLayout.is_ours(parents, name)
                continue
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ESTALE):
                    continue  # removed meanwhile (on NFS, by another client: ESTALE)
                raise
            if stat.S_ISREG(st.st_mode) and owners.allow(st):
                found.append((st.st_mtime_ns, key))
            else:
                foreign += 1
    found.sort()
    return [key for _, key in found], foreign


def remove_stale_temps(root: int, beside: list[BlockPath] | None = None) -> tuple[int, int]:
    """Delete temp files of dead writers; return how many, and how many temp-like names were not ours.

    Looks beside ``beside`` only when given (after a worker died holding
    them), else under the layout's directories of the whole namespace (at
    start). A writer on this host is dead when its pid is gone; a temp file
    from another host (a shared file system) is only removed once it is
    STALE_TEMP_SECONDS old (its mtime), so a live writer elsewhere never loses
    its file. A place that is not a directory of the layout (a symlink, a
    file, a stranger's tree) is passed over: nothing of ours can be in it.
    """
    removed = foreign = 0
    now = time.time()
    if beside is None:
        for dirpath, dirnames, names, dirfd in os.fwalk(".", dir_fd=root, follow_symlinks=False):
            parents = dirpath.split("/")[1:]
            dirnames[:] = [name for name in dirnames if BlockLayout.is_layout_dir(parents, name)]
            gone, odd = _sweep_dir(dirfd, names, now)
            removed += gone
            foreign += odd
        return removed, foreign
    blocks_by_dir: dict[str, set[str]] = {}
    for path in beside:
        blocks_by_dir.setdefault(path.dir, set()).add(path.name)
    for directory, blocks in blocks_by_dir.items():
        try:
            dirfd = open_beneath(root, directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone, or not a directory of ours
        try:
            gone, _ = _sweep_dir(dirfd, [name for name in os.listdir(dirfd) if temp_target(name) in blocks], now)
        finally:
            os.close(dirfd)
        removed += gone
    return removed, foreign


def _sweep_dir(dirfd: int, names: list[str], now: float) -> tuple[int, int]:
    removed = foreign = 0
    for name in names:
        if not is_temp(name):
            continue
        if temp_target(name) is None:
            foreign += 1
            continue
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and temp_is_stale(name, st.st_mtime, now):
                os.unlink(name, dir_fd=dirfd)
                removed += 1
        except OSError:
            pass  # its writer finished or another sweeper got it, or it is not ours to remove
    return removed, foreign


def temp_is_stale(name: str, mtime: float, now: float) -> bool:
    """The sweep's rule for a temp file: its writer on this host is gone, or it is STALE_TEMP_SECONDS old."""
    return _writer_is_gone(name) or now - mtime > STALE_TEMP_SECONDS


def _writer_is_gone(name: str) -> bool:
    """True if a temp file's writer was a process of this host that no longer runs (a zombie runs no more)."""
    pid = temp_writer_pid(name)
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True
