"""The host's own fd of the namespace directory, and the little file work the host does through it.

Block I/O runs in the workers. The host looks on disk only for ``lookup``
(outside the tier's lock, through a copy of this fd, so a slow or hung mount
holds up that call alone) and, once the workers have stopped, to sweep the
temp files of the stores they cut short. When a worker made the namespace
directory again (it was removed or replaced), the host follows it to the
same directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

from . import block_io, housekeeping
from .layout import BlockLayout, BlockPath
from .namespace import Owners, identity, reopen, replaced

log = logging.getLogger(__name__)


class Look(NamedTuple):
    """What a lookup needs to look on disk outside the lock."""

    fd: int  # a copy of the namespace directory's fd, the lookup's own: a shutdown meanwhile closes the tier's
    namespace: tuple[int, int]  # the directory the workers use now


class HostRoot:
    """The namespace directory as the host holds it: its fd, which directory that is, and which files in it are blocks."""

    def __init__(self, fd: int, layout: BlockLayout, owners: Owners, block_bytes: int):
        self.fd = fd  # the tier's: closed at its end
        self.holds = identity(fd)  # the directory ``fd`` holds; the workers' may be newer
        self.layout = layout
        self.owners = owners
        self.block_bytes = block_bytes  # a file of another size at a block's name is no block

    def look(self, namespace: tuple[int, int]) -> Look:
        """Under the lock: what ``has_block`` needs, given the directory the workers use now."""
        return Look(os.dup(self.fd), namespace)

    def has_block(self, look: Look, key: bytes, lock: AbstractContextManager[Any], stopped: Callable[[], bool]) -> bool:
        """Outside the tier's lock: whether the block of ``key`` is on disk; closes ``look.fd``. False while the
        namespace directory is removed or replaced and no worker has made it again yet.

        The workers made the directory again: the host takes the same one for its own fd (opened outside
        ``lock``, and only if it is the directory they checked), taking ``lock`` only to swap it in.
        """
        root = look.fd
        try:
            if look.namespace != self.holds and (fresh := reopen(self.layout.base, look.namespace)) is not None:
                with lock:
                    if not stopped():  # the tier's fds are open until it stops
                        os.dup2(fresh, self.fd, inheritable=False)
                        self.holds = look.namespace
                os.close(root)
                root = fresh
            return not replaced(root, self.layout.base) and block_io.has_block(root, self.layout.locate(key), self.owners, self.block_bytes)
        finally:
            os.close(root)

    def sweep(self, beside: list[BlockPath]) -> int:
        """After the workers stopped, outside the lock: remove the temp files beside these blocks; how many were."""
        try:
            return housekeeping.remove_stale_temps(self.fd, beside)[0]
        except OSError as e:
            log.warning("sweeping temp files at stop failed: %s", block_io.describe(e)[1])
            return 0
