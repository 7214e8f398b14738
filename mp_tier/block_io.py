"""Moving one block between a buffer and its file.

Plain functions of (path, buffer, offset, nbytes): they run unchanged in a
worker process or a worker thread. ``buffer`` is the whole primary cache and
``offset`` the block's byte offset in it, so bytes go straight between the
shared segment and the kernel with no copy in Python.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import socket
import tempfile
import time
import zlib

O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096
# A store takes milliseconds; a temp file this old is dead on any host.
STALE_TEMP_SECONDS = 3600
_HOST = socket.gethostname().replace(".", "_")
_tmp_counter = itertools.count()
# The block's CRC32 (4 bytes, big-endian), set on the temp file before the
# rename so that it appears together with the block.
CRC_XATTR = "user.mp_tier.crc32"


class CorruptBlock(OSError):
    """A block file of the wrong size; it has been removed."""


def describe(exc: BaseException) -> str:
    """``ENOENT: No such file or directory: /path`` style message for a result."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f": {exc.filename}" if exc.filename else ""
        return f"{name}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def temp_path(path: str) -> str:
    """A unique sibling of ``path`` that names its writer: ``<path>.<host>.<pid>.<n>.tmp``."""
    return f"{path}.{_HOST}.{os.getpid()}.{next(_tmp_counter)}.tmp"


def _writer_is_gone(name: str) -> bool:
    """True if a temp file's writer was a process of this host that no longer runs."""
    parts = name.rsplit(".", 4)
    if len(parts) != 5 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def remove_stale_temps(directory: str, block_paths: list[str] | None = None) -> int:
    """Delete temp files of dead writers; return how many.

    Looks beside ``block_paths`` only when given (after a worker died holding
    them), else under the whole ``directory`` (at start). A writer on this host
    is dead when its pid is gone; a temp file from another host (a shared file
    system) is only removed once it is STALE_TEMP_SECONDS old, so a live
    writer elsewhere never loses its file.
    """
    if block_paths is None:
        candidates = (os.path.join(parent, name) for parent, _, names in os.walk(directory) for name in names)
    else:
        candidates = (
            os.path.join(os.path.dirname(path), name)
            for path in block_paths
            if os.path.isdir(os.path.dirname(path))
            for name in os.listdir(os.path.dirname(path))
            if name.startswith(os.path.basename(path) + ".")
        )
    removed = 0
    now = time.time()
    for path in candidates:
        name = os.path.basename(path)
        if not name.endswith(".tmp"):
            continue
        try:
            if _writer_is_gone(name) or now - os.stat(path).st_mtime > STALE_TEMP_SECONDS:
                os.unlink(path)
                removed += 1
        except FileNotFoundError:
            pass  # its writer finished or another sweeper got it
    return removed


def store_block(
    path: str,
    buffer: memoryview,
    offset: int,
    nbytes: int,
    *,
    direct: bool,
    file_mode: int,
    dir_mode: int,
    checksum: bool,
) -> int:
    """Write a block to ``path`` unless it is there; return the bytes written.

    The bytes go to a temp file of this process's in the same directory and
    are renamed into place, so a reader sees a whole block or no file; a
    failure removes the temp file. A missing directory costs one failed open
    the first time, instead of a makedirs call for every block.
    """
    if os.path.exists(path):
        return 0
    tmp = temp_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (O_DIRECT if direct else 0)
    try:
        fd = os.open(tmp, flags, file_mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=dir_mode, exist_ok=True)
        fd = os.open(tmp, flags, file_mode)
    try:
        try:
            block = buffer[offset : offset + nbytes]
            if checksum:
                os.setxattr(fd, CRC_XATTR, zlib.crc32(block).to_bytes(4, "big"))
            done = 0
            while done < nbytes:
                done += os.pwritev(fd, [block[done:]], done)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return nbytes


def load_block(path: str, buffer: memoryview, offset: int, nbytes: int, *, direct: bool, checksum: bool) -> int:
    """Read the block at ``path`` into the buffer; return the bytes read.

    Symlinks are refused (O_NOFOLLOW): a block file is always a regular file
    this tier wrote. A file of the wrong size, or (with ``checksum``) whose
    bytes do not match its recorded CRC, is corrupt and is removed so the next
    store can rewrite it; other errors leave the file alone. A block stored
    without a CRC loads unverified.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (O_DIRECT if direct else 0))
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            os.unlink(path)
            raise CorruptBlock(errno.EBADMSG, f"block file holds {size} of {nbytes} bytes, removed", path)
        block = buffer[offset : offset + nbytes]
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [block[done:]], done)
            if got == 0:
                os.unlink(path)
                raise CorruptBlock(errno.EBADMSG, f"block file ended after {done} of {nbytes} bytes, removed", path)
            done += got
        if checksum:
            _verify(fd, path, block)
    finally:
        os.close(fd)
    return nbytes


def _verify(fd: int, path: str, block: memoryview) -> None:
    try:
        recorded = int.from_bytes(os.getxattr(fd, CRC_XATTR), "big")
    except OSError as e:
        if e.errno == errno.ENODATA:
            return
        raise
    actual = zlib.crc32(block)
    if actual != recorded:
        os.unlink(path)
        raise CorruptBlock(errno.EBADMSG, f"CRC32 {actual:08x} does not match recorded {recorded:08x}, removed", path)


def probe_xattr(directory: str) -> str | None:
    """None if ``directory`` keeps user xattrs (where checksums live), else why not."""
    try:
        fd, path = tempfile.mkstemp(prefix=".xattr-probe.", dir=directory)
        try:
            os.setxattr(fd, CRC_XATTR, bytes(4))
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as e:
        return describe(e)
    return None


def remove_block(path: str) -> bool:
    """Delete a block file; False if it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def touch_block(path: str) -> None:
    """Record a use in the file's mtime: the start-up scan rebuilds LRU order from it."""
    os.utime(path)


def probe_direct(directory: str) -> str | None:
    """Try an aligned O_DIRECT write and read in ``directory``.

    Returns None if it works, else why not. Note that tmpfs accepts O_DIRECT
    without checking alignment, so success there proves only that it opens.
    """
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    buf = mmap.mmap(-1, DIRECT_ALIGN)  # page aligned
    try:
        fd, path = tempfile.mkstemp(prefix=".direct-probe.", dir=directory)
        os.close(fd)
        try:
            fd = os.open(path, os.O_RDWR | O_DIRECT)
            try:
                os.pwritev(fd, [buf], 0)
                os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)
        finally:
            os.unlink(path)
    except OSError as e:
        return describe(e)
    finally:
        buf.close()
    return None
