"""The namespace directory: which run's blocks it holds, and whether it can be trusted.

    <root_dir>/<namespace>_r<rank>/config.json

The namespace names everything that changes a block's bytes (block size,
model, dtype, parallel layout), so runs that could not share blocks never
see each other's files; ``config.json`` records it and the layout version,
written once (first writer wins, through ``link``) and durably (the file and
its directory are fsynced). Every name here is ``layout``'s. A namespace
another user could have filled is refused: a block planted there would load
into the cache as KV data.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any

import msgspec

from .layout import CONFIG_FILE, LAYOUT_VERSION, VERSION_KEY, BlockLayout, temp_name

_CONFIG_MAX_BYTES = 1 << 16


class OtherRun(ValueError):
    """A namespace whose ``config.json`` records another run (``recorded``), so its blocks are not this run's."""

    def __init__(self, message: str, recorded: dict[str, Any]):
        super().__init__(message)
        self.recorded = recorded


class Owners(msgspec.Struct, frozen=True):
    """Who may have written a block file the tier loads: its own uid, and in group mode its groups."""

    uid: int
    gids: frozenset[int] = frozenset()

    def allow(self, st: os.stat_result) -> bool:
        return st.st_uid == self.uid or st.st_gid in self.gids


def _clean(value: object) -> str:
    text = str(value).removeprefix("torch.")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def describe_run(block_bytes: int, offloading_spec: Any = None) -> tuple[dict[str, Any], int]:
    """The run description that names the namespace, and this process's rank.

    ``offloading_spec`` is read the way vLLM lays out its ``OffloadingSpec``
    (``vllm_config.model_config`` / ``.parallel_config``); anything missing is
    simply left out.
    """
    run: dict[str, Any] = {}
    rank = 0
    vllm_config = getattr(offloading_spec, "vllm_config", None)
    model_config = getattr(vllm_config, "model_config", None)
    parallel = getattr(vllm_config, "parallel_config", None)
    for field, source, attr in (
        ("model", model_config, "model"),
        ("dtype", model_config, "dtype"),
        ("tp", parallel, "tensor_parallel_size"),
        ("pp", parallel, "pipeline_parallel_size"),
    ):
        value = getattr(source, attr, None)
        if value is not None:
            run[field] = _clean(value)
    if parallel is not None:
        rank = int(getattr(parallel, "rank", 0) or 0)
    run["block_bytes"] = block_bytes
    return run, rank


def owners_for(group: bool) -> Owners:
    """The owners this process trusts: itself, plus its groups when files are shared with the group."""
    return Owners(os.geteuid(), frozenset({os.getegid(), *os.getgroups()}) if group else frozenset())


def prepare_namespace(
    root_dir: str, name: str, run: dict[str, Any], modes: tuple[int, int], owners: Owners
) -> tuple[BlockLayout, int]:
    """Create or check the namespace directory and its ``config.json``; return the layout and the directory's fd.

    Everything after this goes through the fd, so a namespace renamed or
    replaced later cannot redirect the tier. Refused (PermissionError): a
    namespace that is a symlink, owned by another user, or writable by others
    (group-writable only with ``file_mode = "group"``). Refused (ValueError):
    a ``config.json`` that is not a small regular file of JSON describing
    this run, or that records a layout version this code does not read.
    """
    file_mode, dir_mode = modes
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"namespace {name!r} is not a plain directory name")
    base = os.path.join(os.path.abspath(root_dir), name)
    try:
        os.makedirs(os.path.dirname(base), mode=dir_mode, exist_ok=True)
        parent = os.open(os.path.dirname(base), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.mkdir(os.path.basename(base), dir_mode, dir_fd=parent)
                os.fsync(parent)
            except FileExistsError:
                pass
            fd = os.open(os.path.basename(base), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
    except OSError as e:
        raise _unusable(root_dir, e) from None
    try:
        _check_trusted(base, os.fstat(fd), owners)
        recorded = _read_or_write_config(fd, base, run, file_mode)
    except OSError as e:
        os.close(fd)
        if isinstance(e, PermissionError) and e.filename == base:
            raise
        raise _unusable(root_dir, e) from None
    except BaseException:
        os.close(fd)
        raise
    version = recorded.pop(VERSION_KEY, 1)  # written before layouts had versions: the first
    if version != LAYOUT_VERSION:
        os.close(fd)
        raise ValueError(
            f"{base}/{CONFIG_FILE} records layout version {version!r}, and this mp_tier reads layout version {LAYOUT_VERSION} only: "
            "use the mp_tier that wrote it, or another root_dir"
        )
    if recorded != run:
        os.close(fd)
        raise OtherRun(f"{base}/{CONFIG_FILE} describes another run: recorded {recorded}, this run {run}", recorded)
    return BlockLayout(base), fd


def identity(fd: int) -> tuple[int, int]:
    """The directory an fd holds, as (device, inode): how a namespace renamed away or made again is told apart."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def held(fd: int, base: str) -> tuple[int, int] | None:
    """The directory ``fd`` holds, as (device, inode), if ``base`` still names it; None if it was removed, or
    renamed away and another made."""
    try:
        st = os.fstat(fd)
        at = os.stat(base, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):  # ESTALE: a network file system's removed directory
            return None
        raise
    here = st.st_dev, st.st_ino
    return here if st.st_nlink and (at.st_dev, at.st_ino) == here else None


def replaced(fd: int, base: str) -> bool:
    """Whether ``base`` no longer names the directory ``fd`` holds (removed, or renamed away and another made)."""
    return held(fd, base) is None


def renew(fd: int, base: str, run: dict[str, Any], modes: tuple[int, int], owners: Owners) -> tuple[tuple[int, int], bool]:
    """The directory at ``base`` as (device, inode), which ``fd`` holds on return, and whether it had to be put
    in place of ``fd``: one that is no longer the directory ``fd`` held is made or checked again as at start
    (the fd's number stays; a rotated directory is never followed).

    Raises as ``prepare_namespace`` does when the directory now there fails its checks.
    """
    if (now := held(fd, base)) is not None:
        return now, False
    fresh = prepare_namespace(os.path.dirname(base), os.path.basename(base), run, modes, owners)[1]
    try:
        os.dup2(fresh, fd, inheritable=False)
    finally:
        os.close(fresh)
    return identity(fd), True


def reopen(base: str, expected: tuple[int, int]) -> int | None:
    """An fd of the directory at ``base`` if it is the one a worker made or checked (``expected``), else None."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    if identity(fd) == expected:
        return fd
    os.close(fd)
    return None


def check_namespace(ns_fd: int, base: str, owners: Owners) -> Any:
    """The run recorded in an existing namespace, after the same trust check a tier makes.

    PermissionError if the tier would refuse the directory, ValueError if its
    ``config.json`` is no run description, FileNotFoundError if it has none.
    """
    _check_trusted(base, os.fstat(ns_fd), owners)
    return _read_config(ns_fd, f"{base}/{CONFIG_FILE}")


def _unusable(root_dir: str, e: OSError) -> OSError:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        why = f"too many open files ({errno.errorcode[e.errno]}) while opening root_dir {root_dir!r}: raise the limit (ulimit -n)"
    else:
        why = f"root_dir {root_dir!r} is not usable: {e.strerror}"
    return OSError(e.errno, why, e.filename)


def _check_trusted(base: str, st: os.stat_result, owners: Owners) -> None:
    writable_by = stat.S_IWOTH | (0 if owners.gids else stat.S_IWGRP)
    if not owners.allow(st) or st.st_mode & writable_by:
        raise PermissionError(
            errno.EPERM,
            f"namespace directory is owned by uid {st.st_uid} gid {st.st_gid} with mode {stat.S_IMODE(st.st_mode):o}; "
            f"this tier (uid {owners.uid}) only uses one it owns that others cannot write "
            f"(file_mode = \"group\" admits its groups): another user could have planted blocks there",
            base,
        )


def _read_or_write_config(ns_fd: int, base: str, run: dict[str, Any], file_mode: int) -> Any:
    where = f"{base}/{CONFIG_FILE}"
    try:
        return _read_config(ns_fd, where)
    except FileNotFoundError:
        pass
    write_once(ns_fd, CONFIG_FILE, json.dumps({**run, VERSION_KEY: LAYOUT_VERSION}, sort_keys=True).encode(), file_mode)
    return _read_config(ns_fd, where)


def write_once(dir_fd: int, name: str, data: bytes, file_mode: int) -> None:
    """Publish ``data`` as ``name`` in the directory unless it exists: written to a temp file, fsynced, then
    linked into place (the first writer wins; nobody overwrites), and the directory fsynced."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return  # published already: a restart costs no fsync
    except FileNotFoundError:
        pass
    tmp = temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                if not (put := os.write(fd, view)):  # no progress (a FUSE daemon may answer so): say so, never loop
                    raise OSError(errno.EIO, os.strerror(errno.EIO), name)
                view = view[put:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp, dir_fd=dir_fd)
    os.fsync(dir_fd)


def _read_config(ns_fd: int, where: str) -> Any:
    """The recorded run; ValueError naming the file if it is not a small regular file of JSON."""
    fd = os.open(CONFIG_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=ns_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{where} is not a regular file (mode {st.st_mode:o}); remove it if no tier uses this namespace")
        data = os.read(fd, _CONFIG_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if not data:
        raise ValueError(f"{where} is empty (a crash before it reached the disk?); remove it if no tier uses this namespace")
    try:
        if len(data) > _CONFIG_MAX_BYTES:
            raise ValueError(f"longer than {_CONFIG_MAX_BYTES} bytes")
        recorded = json.loads(data)
        if not isinstance(recorded, dict):
            raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{where} is not a run description ({e}); remove it if no tier uses this namespace") from None
    return recorded
