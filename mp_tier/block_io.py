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
import tempfile

O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096
_tmp_counter = itertools.count()


class CorruptBlock(OSError):
    """A block file of the wrong size; it has been removed."""


def describe(exc: BaseException) -> str:
    """``ENOENT: No such file or directory: /path`` style message for a result."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f": {exc.filename}" if exc.filename else ""
        return f"{name}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def store_block(
    path: str, buffer: memoryview, offset: int, nbytes: int, *, direct: bool, file_mode: int, dir_mode: int
) -> int:
    """Write a block to ``path`` unless it is there; return the bytes written.

    The bytes go to a temp file of this process's in the same directory and
    are renamed into place, so a reader sees a whole block or no file; a
    failure removes the temp file. A missing directory costs one failed open
    the first time, instead of a makedirs call for every block.
    """
    if os.path.exists(path):
        return 0
    tmp = f"{path}.{os.getpid()}.{next(_tmp_counter)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (O_DIRECT if direct else 0)
    try:
        fd = os.open(tmp, flags, file_mode)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=dir_mode, exist_ok=True)
        fd = os.open(tmp, flags, file_mode)
    try:
        try:
            block = buffer[offset : offset + nbytes]
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


def load_block(path: str, buffer: memoryview, offset: int, nbytes: int, *, direct: bool) -> int:
    """Read the block at ``path`` into the buffer; return the bytes read.

    Symlinks are refused (O_NOFOLLOW): a block file is always a regular file
    this tier wrote. A file of the wrong size is corrupt and is removed, so the
    next store can rewrite it; other errors leave the file alone.
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
    finally:
        os.close(fd)
    return nbytes


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
