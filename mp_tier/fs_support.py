"""What the namespace's file system can do for the tier: keep user xattrs (checksums), and O_DIRECT.

Asked once, when a tier starts, by writing a temp-named probe file in the
namespace and removing it: a file system that refuses either is found
before any block depends on it, and the tier says why it runs without.
"""

from __future__ import annotations

import mmap
import os

from .block_io import CRC_XATTR, DIRECT_ALIGN, O_DIRECT, describe
from .layout import DIRECT_PROBE, XATTR_PROBE, temp_name


def probe_xattr(root: int) -> str | None:
    """None if the namespace keeps user xattrs (where checksums live), else why not."""
    name = temp_name(XATTR_PROBE)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=root)
        try:
            os.setxattr(fd, CRC_XATTR, bytes(4))
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=root)
    except OSError as e:
        return describe(e)[1]
    return None


def probe_direct(root: int) -> str | None:
    """Try an aligned O_DIRECT write and read in the namespace.

    Returns None if it works, else why not. Note that tmpfs accepts O_DIRECT
    without checking alignment, so success there proves only that it opens.
    """
    if not O_DIRECT:
        return "this platform has no O_DIRECT"
    buf = mmap.mmap(-1, DIRECT_ALIGN)  # page aligned
    name = temp_name(DIRECT_PROBE)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | O_DIRECT, 0o600, dir_fd=root)
        try:
            os.pwritev(fd, [buf], 0)
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=root)
    except OSError as e:
        return describe(e)[1]
    finally:
        buf.close()
    return None
