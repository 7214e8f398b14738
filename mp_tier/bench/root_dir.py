"""Where a run writes: its own directory under ``--root``, guarded so that no one else's files are touched."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import UsageError

MARKER = ".mp_tier_loadgen"  # marks a directory this tool created under --root
_OCTAL = re.compile(r"\\([0-7]{3})")  # how /proc/self/mountinfo writes a space, tab, newline or backslash in a path


def _is_ours(path: str) -> bool:
    return os.path.basename(path).startswith("loadgen-") and os.path.isfile(os.path.join(path, MARKER))


def prepare_root(root: str | None) -> tuple[str, str | None]:
    """This invocation's own directory, and the directory to remove at the end if the tool created it.

    An existing ``--root`` may hold only directories an earlier run of this
    tool left (``--keep``): anything else is someone's data and is refused.
    """
    if root is None:
        run_dir = tempfile.mkdtemp(prefix="loadgen-")
        Path(run_dir, MARKER).touch()
        return run_dir, run_dir
    root = os.path.abspath(root)
    created = None
    if os.path.lexists(root):
        if not os.path.isdir(root):
            raise UsageError(f"--root {root} is not a directory")
        foreign = sorted(e for e in os.listdir(root) if not _is_ours(os.path.join(root, e)))
        if foreign:
            raise UsageError(
                f"refusing --root {root}: it holds {foreign[0]!r}, which loadgen did not create (give a new or empty directory)"
            )
    else:
        os.makedirs(root)
        created = root
    run_dir = tempfile.mkdtemp(prefix="loadgen-", dir=root)
    Path(run_dir, MARKER).touch()
    return run_dir, created


def cleanup(run_dir: str, created: str | None, keep: bool) -> None:
    """Remove what this run wrote, unless ``--keep``; a ``--root`` the run created goes too if it is empty."""
    if keep:
        print(f"kept the files under {run_dir}", file=sys.stderr)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if created and created != run_dir:
        with contextlib.suppress(OSError):
            os.rmdir(created)  # only if nothing else appeared in it meanwhile


def _mount_of(path: str) -> tuple[str, str]:
    """The type and source device of the file system that holds ``path`` (the longest mount point prefix)."""
    path = os.path.realpath(path)
    best, found = "", ("?", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount, rest = _OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4]), fields[fields.index("-") + 1 :]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, found = mount, (rest[0], rest[1] if len(rest) > 1 else "")
    return found


def fs_type(path: str) -> str:
    """The type of the file system that holds ``path``."""
    return _mount_of(path)[0]


def fs_label(path: str) -> str:
    """``fs_type``, and for ext4 whether it has a journal: without one, creating a file right after many
    were deleted costs up to ten times the CPU (the inode allocator skips recently freed inodes one by
    one), which decides a small-block store's figures (docs/bench.md)."""
    kind, source = _mount_of(path)
    if kind != "ext4":
        return kind
    try:
        with open(f"/sys/fs/ext4/{os.path.basename(os.path.realpath(source))}/journal_task") as f:
            journal = f.read().strip()
    except OSError:
        return kind
    return f"{kind}, no journal" if journal == "<none>" else kind
