"""Every name the tier gives a file, and how to tell its names from anyone else's.

    <root_dir>/<namespace>_r<rank>/config.json                              the run it holds, and the layout version
    <namespace dir>/<hhh>/<hh>_g<group>/<hash_hex>.bin                      a block
    <namespace dir>/<hhh>/<hh>_g<group>/<hash_hex>.bin.<host>.<pid>.<n>.tmp  a store in progress
    <namespace dir>/.xattr-probe.<host>.<pid>.<n>.tmp, .direct-probe...     start-up probes, removed at once

A key is the block hash followed by a 4-byte big-endian KV-group index
(vLLM's ``make_offload_key``). ``<host>`` is a fixed-width tag of the writer's
host name, so the longest key the file system takes does not depend on how
long a host name is; a sweep uses it and the pid to tell a dead writer's temp
file from a live one's. Parsing is strict: a name that is not exactly one of
these is someone else's and is skipped, never trusted. ``LAYOUT_VERSION``
changes whenever any of these names does; ``config.json`` records it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from typing import Any, NamedTuple

import msgspec

from . import _block_calls

GROUP_BYTES = 4
MIN_KEY_BYTES = GROUP_BYTES + 4
NAME_MAX = 255  # bytes in one file name on Linux file systems
BLOCK_SUFFIX = ".bin"
TEMP_SUFFIX = ".tmp"
# The layout of everything below a namespace directory; a config.json without one predates versions (1).
LAYOUT_VERSION = 1
VERSION_KEY = "layout_version"
CONFIG_FILE = "config.json"  # in the namespace directory: the run it holds (see namespace)
XATTR_PROBE = ".xattr-probe"  # temp-named at start, to learn whether user xattrs (checksums) work
DIRECT_PROBE = ".direct-probe"  # ... and whether O_DIRECT does


def host_tag(hostname: str) -> str:
    """The fixed-width stand-in for a host name in temp file names."""
    return hashlib.blake2s(hostname.encode(), digest_size=4).hexdigest()


HOST_TAG = host_tag(socket.gethostname())
_PID_DIGITS = 10
_COUNTER_WRAP = 10**9  # a temp name's counter; O_EXCL would refuse the one-in-a-billion reuse
# The most a temp name adds to its block's name: ".<host tag>.<pid>.<counter>.tmp".
TEMP_NAME_EXTRA = 1 + len(HOST_TAG) + 1 + _PID_DIGITS + 1 + len(str(_COUNTER_WRAP - 1)) + len(TEMP_SUFFIX)
# A hash is written in hex: two characters a byte.
MAX_KEY_BYTES = GROUP_BYTES + (NAME_MAX - len(BLOCK_SUFFIX) - TEMP_NAME_EXTRA) // 2
_MAX_GROUP = 1 << (8 * GROUP_BYTES)
_HEX = frozenset("0123456789abcdef")
_temp_counter = itertools.count()
_writer = ""  # ".<host tag>.<pid>." of temp names: made once per process, as getpid() costs a third of a name


def _name_writer() -> None:
    global _writer
    _writer = f".{HOST_TAG}.{os.getpid()}."


_name_writer()
os.register_at_fork(after_in_child=_name_writer)


class BlockPath(NamedTuple):
    """A block file's directory (relative to the namespace directory) and name."""

    dir: str
    name: str

    @property
    def rel(self) -> str:
        return f"{self.dir}/{self.name}"


class BlockLayout(msgspec.Struct, frozen=True):
    """Maps a key to its file under ``base``, the namespace directory.

    ``base`` is for people (messages, ``block_path``); file operations go
    through the namespace directory's fd, never through this string.
    """

    base: str

    def locate(self, key: bytes) -> BlockPath:
        """Made in C, the one author of a block's name: a worker's loads name their blocks there too."""
        return BlockPath(*_block_calls.locate(key))

    def path(self, key: bytes) -> str:
        return f"{self.base}/{self.locate(key).rel}"

    @staticmethod
    def is_layout_dir(parents: list[str], name: str) -> bool:
        """True for the directories the layout makes: ``hhh`` at the top, ``hh_g<group>`` below it."""
        if not parents:
            return len(name) == 3 and _HEX.issuperset(name)
        if len(parents) != 1:
            return False
        prefix, _, group = name.partition("_g")
        return (
            len(prefix) == 2
            and _HEX.issuperset(prefix)
            and _is_decimal(group)
            and len(group) <= 10
            and (len(group) == 1 or group[0] != "0")
            and int(group) < _MAX_GROUP
        )

    @staticmethod
    def parse_block(parents: list[str], name: str) -> bytes | None:
        """The key whose block file is ``<parents>/<name>``, or None if that is not a path this layout gives."""
        if len(parents) != 2 or not name.endswith(BLOCK_SUFFIX) or not BlockLayout.is_layout_dir(parents[:1], parents[1]):
            return None
        digest = name[: -len(BLOCK_SUFFIX)]
        top, leaf = parents
        if (
            not MIN_KEY_BYTES - GROUP_BYTES <= len(digest) // 2 <= MAX_KEY_BYTES - GROUP_BYTES
            or len(digest) % 2
            or not _HEX.issuperset(digest)
            or digest[:3] != top
            or digest[3:5] != leaf[:2]
        ):
            return None
        return bytes.fromhex(digest) + int(leaf[4:]).to_bytes(GROUP_BYTES, "big")

    @staticmethod
    def is_ours(parents: list[str], name: str) -> bool:
        """A file the tier made that is not a block: a temp file, or the namespace's ``config.json``."""
        return temp_target(name) is not None or (not parents and name == CONFIG_FILE)


def _is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes "²" (which ``int`` refuses) and "٣" (which it reads as 3)."""
    return text.isascii() and text.isdigit()


def temp_name(name: str) -> str:
    """A unique sibling name for a file being written in place of ``name``; it names its writer."""
    return f"{name}{_writer}{next(_temp_counter) % _COUNTER_WRAP}{TEMP_SUFFIX}"


def is_temp(name: str) -> bool:
    """Named like a temp file (perhaps someone else's: ``temp_target`` says whether it is the tier's)."""
    return name.endswith(TEMP_SUFFIX)


def temp_target(name: str) -> str | None:
    """The name a temp file ``name`` stands in for, or None if ``name`` is not a temp name."""
    if not name.endswith(TEMP_SUFFIX):
        return None
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
    return parts[0] if len(parts) == 4 and parts[0] else None


def temp_writer_pid(name: str) -> int | None:
    """The pid that wrote temp file ``name`` if it was a process of this host, else None."""
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
    if len(parts) != 4 or parts[1] != HOST_TAG or not _is_decimal(parts[2]) or len(parts[2]) > _PID_DIGITS:
        return None
    pid = int(parts[2])
    return pid if 0 < pid < 1 << 31 else None


def rank_dir(base: str, rank: int) -> str:
    """A namespace directory's name: what the blocks' bytes depend on, and the rank (as vLLM's FileMapper names it)."""
    return f"{base}_r{rank}"


def rank_of_dir(name: str) -> int | None:
    """The rank ``rank_dir`` wrote into a namespace directory's name, or None if it is not such a name."""
    base, sep, rank = name.rpartition("_r")
    return int(rank) if sep and base and _is_decimal(rank) and len(rank) <= 9 else None


def namespace_name(run: dict[str, Any], rank: int) -> str:
    """The namespace directory of a run described by ``namespace.describe_run``."""
    parts = [run[k] if k in ("model", "dtype") else f"{k}{run[k]}" for k in ("model", "dtype", "tp", "pp") if k in run]
    return rank_dir("_".join([*parts, f"bs{run['block_bytes']}"]), rank)
