"""Opening paths beneath a directory fd without ever following a symlink.

``O_NOFOLLOW`` guards only a path's last component: a directory inside the
root that someone replaced by a symlink would lead a store, a load or an
eviction outside it. Every file operation of the tier therefore starts from
the namespace directory's fd and resolves the rest with ``openat2`` and
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` (one system call, Linux 5.6+), or,
where the kernel lacks it or a seccomp profile refuses it (EPERM: Docker's
default profile before 20.10; a file a policy refuses, fanotify's, then turns
it off for the process too, which costs only speed), one ``O_NOFOLLOW |
O_DIRECTORY`` component at a time, which refuses the same paths. Either way a
symlink anywhere below the root fails with ELOOP and ``..`` cannot climb out of it.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after the unified table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_use_openat2 = True  # until the kernel says ENOSYS, or a seccomp profile EPERM
_MISSING = -errno.ENOENT


def _refusal(code: int, path: str) -> OSError:
    if code == errno.EXDEV:  # the kernel's answer to a path that climbs out: say so plainly
        return OSError(errno.EXDEV, "path leaves the root directory", path)
    return OSError(code, os.strerror(code), path)


def _open(dir_fd: int, path: str, flags: int, mode: int) -> int:
    """``open_beneath``'s fd, or ``_MISSING`` if a component of ``path`` does not exist.

    Not raising there matters: a store into a new directory meets it every
    time, and the exception would cost about as much as the open.
    """
    global _use_openat2
    if _use_openat2:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _syscall(_SYS_OPENAT2, ctypes.c_int(dir_fd), os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return _MISSING
        if code not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp profile that refuses what it does not know
            raise _refusal(code, path)
        _use_openat2 = False
    try:
        return open_by_components(dir_fd, path, flags, mode)
    except FileNotFoundError:
        return _MISSING


def _parts(path: str) -> list[str]:
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise OSError(errno.EXDEV, "path leaves the root directory or is not plain", path)
    return parts


def open_by_components(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """``open_beneath`` one component at a time: each directory with O_NOFOLLOW | O_DIRECTORY."""
    *dirs, last = _parts(path)
    current = dir_fd
    try:
        for name in dirs:
            following = os.open(name, DIR_FLAGS, dir_fd=current)
            if current != dir_fd:
                os.close(current)
            current = following
        return os.open(last, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` (relative, '/'-separated) below ``dir_fd``; no component may be a symlink."""
    fd = _open(dir_fd, path, flags, mode)
    if fd == _MISSING:
        raise _refusal(errno.ENOENT, path)
    return fd


def open_dir(dir_fd: int, path: str) -> int:
    """An O_PATH fd of directory ``path`` below ``dir_fd``."""
    return open_beneath(dir_fd, path, DIR_FLAGS)


def make_dir(dir_fd: int, path: str, mode: int) -> tuple[int, bool]:
    """``open_dir``, making what is missing of ``path`` with ``mode``; True if this call made its last part.

    A directory made just now held nothing a moment ago, which spares a
    store the look for an old block there. A missing directory costs one
    failed open the first time rather than a mkdir for every block. Below
    that, a parent is opened before it is made (it usually exists) and the
    last part made before it is opened (it usually does not), so that the
    usual case raises nothing.
    """
    fd = _open(dir_fd, path, DIR_FLAGS, 0)
    if fd != _MISSING:
        return fd, False
    *parents, last = _parts(path)
    current = dir_fd
    try:
        for name in parents:
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=current)
            except FileNotFoundError:
                _mkdir(current, name, mode)
                child = os.open(name, DIR_FLAGS, dir_fd=current)
            if current != dir_fd:
                os.close(current)
            current = child
        made = _mkdir(current, last, mode)
        return os.open(last, DIR_FLAGS, dir_fd=current), made
    finally:
        if current != dir_fd:
            os.close(current)


def _mkdir(parent: int, name: str, mode: int) -> bool:
    """Make directory ``name`` in ``parent``; False if something is there already."""
    try:
        os.mkdir(name, mode, dir_fd=parent)
    except FileExistsError:
        return False  # made meanwhile by another worker, or only a part above it was missing
    return True
