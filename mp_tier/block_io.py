"""Moving one block between a buffer and its file, and the checks of one block file around it.

Plain functions of (root, path, buffer, offset): they run unchanged in a
worker process or a worker thread. ``root`` is the namespace directory's fd
and ``path`` a ``BlockPath`` below it, resolved without following any
symlink (``beneath``), so no operation here ever leaves the namespace.
``buffer`` is the whole primary cache and ``offset`` the block's byte offset
in it, so bytes go straight between the shared mapping and the kernel with
no copy in Python.

Only regular files count as blocks: every open is non-blocking (a FIFO never
hangs a worker) and checked with ``fstat`` before use, and a block file must
belong to an allowed owner before its bytes reach the cache.

The usual case runs in C (``_block_calls``) without the interpreter between
its system calls: a store tries it first, and a worker hands a task's loads
to it and brings here only the blocks it steps aside for, having changed
nothing. The code here decides every other case, so these rules are written
once.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import Callable

from . import _block_calls
from .beneath import make_dir, open_beneath, open_dir
from .layout import BlockPath, temp_name
from .namespace import Owners

O_DIRECT = getattr(os, "O_DIRECT", 0)
DIRECT_ALIGN = 4096
# The block's CRC32 (4 bytes, big-endian), set on the temp file before the
# rename so that it appears together with the block.
CRC_XATTR = "user.mp_tier.crc32"
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class CorruptBlock(OSError):
    """A block file of the wrong size or checksum; it has been removed."""


def describe(exc: BaseException) -> tuple[str, str]:
    """The errno name and an ``ENOENT: No such file or directory: /path`` style message for a result.

    Anything that is not an OSError is reported as EIO with its type, so a
    result always carries a code.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f": {exc.filename}" if exc.filename else ""
        return code, f"{code}: {exc.strerror}{where}"
    return "EIO", f"EIO: {type(exc).__name__}: {exc}"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "a device"


def _readable(st: os.stat_result) -> bool:
    """Whether this process may read a file of this mode and owner: one it cannot read is no block to keep."""
    uid = os.geteuid()
    return uid == 0 or bool(st.st_mode & (stat.S_IRUSR if st.st_uid == uid else stat.S_IRGRP))


def store_block(
    root: int,
    path: BlockPath,
    buffer: memoryview,
    offset: int,
    nbytes: int,
    *,
    direct: bool,
    file_mode: int,
    dir_mode: int,
    checksum: bool,
    owners: Owners,
    ready: Callable[[], None] | None = None,
) -> int:
    """Write a block to ``path`` unless a whole one is there; return the bytes written.

    The bytes go to a temp file of this process's in the same directory and
    are renamed into place, so a reader sees a whole block or no file; a
    failure removes the temp file. A file of the wrong size or owner, or
    one this process cannot read, is replaced; an entry that is not a
    regular file fails the block (EEXIST). ``ready`` runs just before the
    block's bytes are first read, so it never runs for a block skipped.
    """
    if not checksum and _block_calls.store(
        root, path.dir, path.name, temp_name(path.name), buffer, offset, nbytes, direct, file_mode, dir_mode, ready
    ):
        return nbytes
    _within(buffer, offset, nbytes)
    leaf, made = make_dir(root, path.dir, dir_mode)
    try:
        if not made and (st := _entry(leaf, path.name)) is not None:
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EEXIST, f"{_kind(st.st_mode)}, not a block file, is in the way", path.rel)
            if st.st_size == nbytes and owners.allow(st) and _readable(st):
                return 0
        _write_in_place(leaf, path, buffer, offset, nbytes, direct, file_mode, checksum, ready)
    finally:
        os.close(leaf)
    return nbytes


def _write_in_place(
    leaf: int,
    path: BlockPath,
    buffer: memoryview,
    offset: int,
    nbytes: int,
    direct: bool,
    file_mode: int,
    checksum: bool,
    ready: Callable[[], None] | None,
) -> None:
    """Write the block to a temp file in ``leaf`` and rename it to ``path.name``; a failure removes the temp file
    (if the file system lets it) and its error names the block, whichever step failed (the temp file's create
    would name the temp name, a write or the CRC's setxattr the fd's number or nothing)."""
    tmp = temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | (O_DIRECT if direct else 0), file_mode, dir_fd=leaf)
    except OSError as e:
        raise _naming(e, path) from None
    try:
        try:
            if ready is not None:
                ready()
            with buffer[offset : offset + nbytes] as block:
                if checksum:
                    os.setxattr(fd, CRC_XATTR, zlib.crc32(block).to_bytes(4, "big"))
                done = 0
                while done < nbytes:
                    if (put := os.pwrite(fd, block[done:], done)) == 0:  # no progress: say so rather than loop, as the C call does
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    done += put
        finally:
            os.close(fd)
        os.rename(tmp, path.name, src_dir_fd=leaf, dst_dir_fd=leaf)
    except BaseException as e:
        try:
            os.unlink(tmp, dir_fd=leaf)
        except OSError:
            pass  # removed by someone else, or refused (a file system read-only since the error): the error that matters is e
        if isinstance(e, OSError):
            raise _naming(e, path) from None
        raise


def _naming(e: OSError, path: BlockPath) -> OSError:
    """``e`` as the block's error: the same errno (and so the same OSError subclass), naming the block."""
    return OSError(e.errno, e.strerror, path.rel)


def _within(buffer: memoryview, offset: int, nbytes: int) -> None:
    """Refuse a block that is not all inside the buffer, as the C call does: a slice would quietly come up short."""
    if nbytes <= 0 or not 0 <= offset <= buffer.nbytes - nbytes:
        raise ValueError(f"block at offset {offset}, {nbytes} bytes, is outside the {buffer.nbytes}-byte buffer")


def _entry(leaf: int, name: str) -> os.stat_result | None:
    """The lstat of ``name`` in directory ``leaf``, or None if there is no such entry.

    ``access`` says "none" without raising, which a store of a new block
    would otherwise pay for every time.
    """
    if not os.access(name, os.F_OK, dir_fd=leaf, follow_symlinks=False):
        return None
    try:
        return os.stat(name, dir_fd=leaf, follow_symlinks=False)
    except FileNotFoundError:
        return None  # removed since


def load_block(
    root: int,
    path: BlockPath,
    buffer: memoryview,
    offset: int,
    nbytes: int,
    *,
    direct: bool,
    checksum: bool,
    owners: Owners,
    ready: Callable[[], None] | None = None,
) -> int:
    """Read the block at ``path`` into the buffer; return the bytes read.

    Refused, and left alone: a symlink (ELOOP), anything but a regular file
    (EINVAL), a file of another owner (EPERM). A file of the wrong size, or
    (with ``checksum``) whose bytes do not match its recorded CRC, is corrupt
    and is removed so the next store can rewrite it (EBADMSG). A block stored
    without a CRC loads unverified. ``ready`` runs just before the first
    byte reaches the buffer: never for a block missing or refused.
    """
    _within(buffer, offset, nbytes)
    fd = open_beneath(root, path.rel, _READ | (O_DIRECT if direct else 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{_kind(st.st_mode)}, not a block file", path.rel)
        if not owners.allow(st):
            raise OSError(errno.EPERM, f"block file owned by uid {st.st_uid} gid {st.st_gid}, not by an allowed owner", path.rel)
        if st.st_size != nbytes:
            remove_block(root, path)
            raise CorruptBlock(errno.EBADMSG, f"block file holds {st.st_size} of {nbytes} bytes, removed", path.rel)
        if ready is not None:
            ready()
        with buffer[offset : offset + nbytes] as block:  # released here: a traceback keeping it would pin the cache
            try:  # reading the bytes or their CRC: an error names the block (an fd's would name its number)
                done = _read_into(fd, block)
                problem = _crc_problem(fd, block) if checksum and done == nbytes else None
            except OSError as e:
                raise _naming(e, path) from None
            if done < nbytes:
                problem = f"block file ended after {done} of {nbytes} bytes"
            if problem is not None:
                remove_block(root, path)
                raise CorruptBlock(errno.EBADMSG, f"{problem}, removed", path.rel)
    finally:
        os.close(fd)
    return nbytes


def _read_into(fd: int, block: memoryview) -> int:
    """Read the file from its start into ``block``; the bytes read: all of them, or fewer where the file ended."""
    done = 0
    while done < len(block):
        got = os.preadv(fd, [block[done:]], done)
        if got == 0:
            break
        done += got
    return done


def _crc_problem(fd: int, block: memoryview) -> str | None:
    """None if the block matches its recorded CRC or has none, else how it differs.

    A file system without user xattrs (getxattr: not supported) can hold no CRC: its blocks load
    unverified, as one stored without a CRC does (the tier refuses checksum = true there).
    """
    try:
        recorded = int.from_bytes(os.getxattr(fd, CRC_XATTR), "big")
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise
    actual = zlib.crc32(block)
    return None if actual == recorded else f"CRC32 {actual:08x} does not match recorded {recorded:08x}"


def block_problem(root: int, path: BlockPath, block: memoryview, owners: Owners, *, checksum: bool) -> str | None:
    """What ``load_block`` would find wrong with this block, changing nothing: None if it would load.

    ``block`` is a buffer of the block's size. A load removes a block of
    the wrong size or CRC (the message then starts with EBADMSG); an error
    it raises (an unreadable file) comes as the OSError itself.
    """
    fd = open_beneath(root, path.rel, _READ)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"EINVAL: {_kind(st.st_mode)}, not a block file"
        if (why := refusal(st, owners)) is not None:
            return f"EPERM: {why}"
        if st.st_size != len(block):
            return f"EBADMSG: holds {st.st_size} of {len(block)} bytes"
        if (done := _read_into(fd, block)) < len(block):
            return f"EBADMSG: ended after {done} of {len(block)} bytes"
        problem = _crc_problem(fd, block) if checksum else None
    finally:
        os.close(fd)
    return None if problem is None else f"EBADMSG: {problem}"


def remove_block(root: int, path: BlockPath) -> bool:
    """Delete a block file; False if it was already gone."""
    try:
        leaf = open_dir(root, path.dir)
    except FileNotFoundError:
        return False
    try:
        os.unlink(path.name, dir_fd=leaf)
    except FileNotFoundError:
        return False
    finally:
        os.close(leaf)
    return True


def touch_block(root: int, path: BlockPath) -> None:
    """Record a use in the file's mtime: the start-up scan rebuilds LRU order from it. Its error names the block."""
    leaf = open_dir(root, path.dir)
    try:
        os.utime(path.name, dir_fd=leaf, follow_symlinks=False)
    except OSError as e:
        raise _naming(e, path) from None
    finally:
        os.close(leaf)


def note_use(root: int, path: BlockPath) -> None:
    """``touch_block`` after a block was loaded or found whole: recency is a hint, so neither a file
    another user of the group owns (which refuses the utime), nor one removed meanwhile (ENOENT, or
    ESTALE from an NFS server another host removed it on), nor one on a file system mounted read-only
    fails a block whose bytes were good. ``_block_calls.load_run`` keeps the same list."""
    try:
        touch_block(root, path)
    except (PermissionError, FileNotFoundError):
        pass
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.ESTALE):
            raise


def has_block(root: int, path: BlockPath, owners: Owners, nbytes: int | None) -> bool:
    """True if a regular file of an allowed owner, ``nbytes`` long (None: of any size), is at ``path``: anything
    else there is no block to load (a load removes a file of another size, and a store writes it again)."""
    try:
        fd = open_beneath(root, path.rel, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ESTALE):  # a symlink, here or above it; a file another NFS client removed
            return False
        raise
    return stat.S_ISREG(st.st_mode) and owners.allow(st) and nbytes in (None, st.st_size)


def may_remain(root: int, path: BlockPath, owners: Owners) -> bool:
    """After a failed delete: False only if no file is left at ``path`` (unsure: it stays counted; any size takes room)."""
    try:
        return has_block(root, path, owners, None)
    except OSError:
        return True


def refusal(st: os.stat_result, owners: Owners) -> str | None:
    """Why a load would refuse the file at a block's name (and a store replace it), or None for a block to keep."""
    if not stat.S_ISREG(st.st_mode):
        return _kind(st.st_mode)
    if not owners.allow(st):
        return f"owned by uid {st.st_uid} gid {st.st_gid}"
    if not _readable(st):
        return f"mode {stat.S_IMODE(st.st_mode):o}, unreadable"
    return None
