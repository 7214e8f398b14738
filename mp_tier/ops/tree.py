"""Walking a cache root the way the tier does: by fds, never through a symlink, only into the layout's directories.

Every command opens ROOT once and reaches each namespace, directory and file
through the fd of its parent (``dir_fd``), so a directory swapped for a
symlink meanwhile leads nowhere outside ROOT. Names are judged by the
tier's own layout, namespace and block I/O code: a name the layout does not
give is counted as foreign and never descended into, which also bounds the
walk (a namespace is three levels deep, whatever a stranger nests below).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..block_io import refusal
from ..housekeeping import temp_is_stale
from ..layout import CONFIG_FILE, GROUP_BYTES, LAYOUT_VERSION, VERSION_KEY, BlockLayout, BlockPath, temp_target
from ..namespace import Owners, check_namespace, owners_for

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
BLOCK, REFUSED, LIVE_TEMP, STALE_TEMP, CONFIG, FOREIGN = "block", "refused", "live temp", "stale temp", "config", "foreign"


class UsageError(Exception):
    """A bad ROOT or option: one line on stderr and exit status 2."""


def shown(name: str) -> str:
    """A name as it can be printed: bytes that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def open_root(path: str) -> int:
    """ROOT's fd; UsageError naming it if it is missing, not a directory, a symlink or unreadable."""
    try:
        return os.open(path, _DIR)
    except OSError as e:
        if os.path.islink(path):
            reason = f"is a symlink, which is never followed (give {shown(os.path.realpath(path))!r})"
        elif e.errno == errno.ENOTDIR:
            reason = "is not a directory"
        else:
            reason = f"cannot be opened: {errno.errorcode.get(e.errno or 0, '?')}: {e.strerror}"
        raise UsageError(f"ROOT {shown(path)!r} {reason}") from None


@dataclass
class Namespace:
    """One namespace directory below ROOT: its recorded run, or why the tier would not use it."""

    name: str
    fd: int = -1
    run: dict[str, Any] | None = None
    problem: str | None = None
    owners: Owners = field(default_factory=lambda: owners_for(False))

    @property
    def block_bytes(self) -> int | None:
        value = (self.run or {}).get("block_bytes")
        return value if isinstance(value, int) and value > 0 else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def namespaces(root_fd: int, root: str) -> Iterator[Namespace]:
    """The namespaces under ROOT (ROOT itself if it holds a ``config.json``), each closed after use.

    One the tier would refuse (another owner, writable by others, no or a bad
    ``config.json``) comes with ``problem`` set and no fd: it is reported, never entered.
    """
    try:
        os.stat(CONFIG_FILE, dir_fd=root_fd, follow_symlinks=False)
        names = ["."]
    except FileNotFoundError:
        with os.scandir(root_fd) as entries:
            names = sorted(e.name for e in entries)
    for name in names:
        ns = Namespace(name)
        try:
            fd = os.open(name, _DIR, dir_fd=root_fd)
        except OSError as e:
            if e.errno == errno.ENOTDIR and not os.path.islink(f"{root}/{name}"):
                continue  # a file beside the namespaces (a README): not the tier's
            ns.problem = "a symlink, never followed" if e.errno in (errno.ENOTDIR, errno.ELOOP) else f"cannot be opened: {e.strerror}"
            yield ns
            continue
        # Group mode makes directories readable by the group: then the group's files are the tier's too.
        ns.owners = owners_for(bool(os.fstat(fd).st_mode & stat.S_IRGRP))
        try:
            recorded = check_namespace(fd, f"{root}/{name}", ns.owners)
            if not isinstance(recorded, dict):
                raise ValueError("config.json is not a JSON object")
            if (version := recorded.get(VERSION_KEY, 1)) != LAYOUT_VERSION:  # its names may mean something else
                raise ValueError(f"layout version {version!r}: this mp_tier reads layout version {LAYOUT_VERSION} only")
            ns.run, ns.fd = recorded, fd
        except FileNotFoundError:
            ns.problem = "no config.json: not a namespace of the tier"
        except (OSError, ValueError) as e:
            ns.problem = str(e.strerror if isinstance(e, OSError) and e.strerror else e).split("\n")[0]
        if ns.fd < 0:
            os.close(fd)
        try:
            yield ns
        finally:
            ns.close()


class Entry(NamedTuple):
    """One file of a namespace, judged as the tier judges it."""

    kind: str
    path: BlockPath  # relative to the namespace directory (dir "" for its own top level)
    dirfd: int  # its directory, open while the entry is being handled
    st: os.stat_result | None  # for blocks, refused blocks and temp files
    why: str = ""
    key: bytes = b""  # for blocks and refused blocks

    @property
    def group(self) -> int:
        return int.from_bytes(self.key[-GROUP_BYTES:], "big")


class LayoutDir(NamedTuple):
    """A directory of the layout: its path in the namespace, its mtime before anything in it was handled, its entries."""

    path: str
    mtime: float
    entries: int


@dataclass
class Walk:
    """The directories a walk passed over (foreign, unreadable) and the layout's directories it entered."""

    foreign_dirs: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    layout_dirs: list[LayoutDir] = field(default_factory=list)  # each before the directories inside it


def walk(ns: Namespace, seen: Walk, now: float | None = None, on_top: Any = None) -> Iterator[Entry]:
    """Every file in the layout's directories of ``ns``, one ``scandir`` per directory and one ``lstat``
    per file that needs it (no file is opened). ``on_top`` is called after each top-level directory."""
    now = time.time() if now is None else now
    yield from _walk_dir(ns.fd, [], ns, seen, now, on_top)


def _walk_dir(dirfd: int, parents: list[str], ns: Namespace, seen: Walk, now: float, on_top: Any) -> Iterator[Entry]:
    where = "/".join(parents)
    try:
        mtime = os.fstat(dirfd).st_mtime
        with os.scandir(dirfd) as it:
            entries = list(it)
    except OSError as e:
        seen.unreadable.append(f"{shown(where)}: {errno.errorcode.get(e.errno or 0, '?')}")
        return
    if parents:
        seen.layout_dirs.append(LayoutDir(where, mtime, len(entries)))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not BlockLayout.is_layout_dir(parents, entry.name):
                seen.foreign_dirs.append(shown(f"{where}/{entry.name}".lstrip("/")))
                continue
            try:
                child = os.open(entry.name, _DIR, dir_fd=dirfd)
            except OSError as e:
                seen.unreadable.append(f"{shown(where)}/{shown(entry.name)}: {errno.errorcode.get(e.errno or 0, '?')}")
                continue
            try:
                yield from _walk_dir(child, [*parents, entry.name], ns, seen, now, on_top)
            finally:
                os.close(child)
            if not parents and on_top is not None:
                on_top()
            continue
        found = _judge(entry, parents, dirfd, ns.owners, now)
        if found is not None:
            yield found


def _judge(entry: os.DirEntry[str], parents: list[str], dirfd: int, owners: Owners, now: float) -> Entry | None:
    """The kind of one file, by the layout's names, the block I/O code's refusals and the sweep's rule."""
    name = entry.name
    path = BlockPath("/".join(parents), name)
    key = BlockLayout.parse_block(parents, name)
    if key is None and temp_target(name) is None:
        return Entry(CONFIG if not parents and name == CONFIG_FILE else FOREIGN, path, dirfd, None)
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # renamed or removed meanwhile
    if key is not None:
        why = refusal(st, owners)
        return Entry(REFUSED if why else BLOCK, path, dirfd, st, why or "", key)
    if not stat.S_ISREG(st.st_mode):
        return Entry(FOREIGN, path, dirfd, st)
    return Entry(STALE_TEMP if temp_is_stale(name, st.st_mtime, now) else LIVE_TEMP, path, dirfd, st)

