"""Time each system call of mp_tier's per-block store and load on one directory.

What dominates a block's cost on a given file system: the bytes, or the
metadata round trips around them (a missed ``stat``, the temp file's
``open(O_CREAT)``, ``close``, ``rename``, and on load ``open``/``fstat``)?
This replays the sequence block_io runs for each block, one call at a time,
and prints the median and p90 of each, in microseconds:

    store: stat (miss) | open O_CREAT|O_EXCL | [fsetxattr] | pwritev | close | rename
    load:  open | fstat | preadv | [fgetxattr] | close
    evict: unlink

    python tools/fs_op_costs.py DIR [--block-size 2m] [--blocks 64] [--direct] [--checksum]

Blocks go to ``DIR/fs-op-costs-<pid>/`` in 4 sub-directories, which is removed
afterwards. Loads read the blocks back in a different order than they were
written, after ``posix_fadvise(DONTNEED)``, so they are as cold as the file
system lets a client make them.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

STEPS = {
    "store": ["stat (miss)", "open O_CREAT", "fsetxattr", "pwritev", "close", "rename"],
    "load": ["open", "fstat", "preadv", "fgetxattr", "close (load)"],
    "evict": ["unlink"],
}


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def measure(directory: str, block_bytes: int, blocks: int, direct: bool, checksum: bool) -> dict[str, list[float]]:
    """Seconds per call, per step name, over ``blocks`` blocks."""
    times: dict[str, list[float]] = {name: [] for steps in STEPS.values() for name in steps}
    flag = os.O_DIRECT if direct else 0
    buf = mmap.mmap(-1, block_bytes)  # page aligned, as the shared segment is
    buf.write(os.urandom(block_bytes))
    view = memoryview(buf)
    work = os.path.join(directory, f"fs-op-costs-{os.getpid()}")
    for sub in range(4):
        os.makedirs(os.path.join(work, str(sub)))

    def timed(name: str, call: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        result = call(*args)
        times[name].append(time.perf_counter() - start)
        return result

    paths = [os.path.join(work, str(i % 4), f"{i:08x}.bin") for i in range(blocks)]
    try:
        for path in paths:
            tmp = path + ".tmp"
            timed("stat (miss)", os.path.exists, path)
            fd = timed("open O_CREAT", os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o600)
            if checksum:
                timed("fsetxattr", os.setxattr, fd, "user.mp_tier.crc32", b"\0\0\0\0")
            timed("pwritev", os.pwritev, fd, [view], 0)
            timed("close", os.close, fd)
            timed("rename", os.replace, tmp, path)
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        for path in paths[1::2] + paths[::2]:
            fd = timed("open", os.open, path, os.O_RDONLY | os.O_NOFOLLOW | flag)
            timed("fstat", os.fstat, fd)
            timed("preadv", os.preadv, fd, [view], 0)
            if checksum:
                timed("fgetxattr", os.getxattr, fd, "user.mp_tier.crc32")
            timed("close (load)", os.close, fd)
        for path in paths:
            timed("unlink", os.unlink, path)
    finally:
        view.release()
        buf.close()
        shutil.rmtree(work, ignore_errors=True)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--block-size", type=parse_size, default=2 << 20)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--direct", action="store_true", help="O_DIRECT, as o_direct = on")
    parser.add_argument("--checksum", action="store_true", help="the xattr calls of checksum = true")
    args = parser.parse_args(argv)
    times = measure(args.directory, args.block_size, args.blocks, args.direct, args.checksum)
    print(f"{args.directory}: {args.blocks} blocks of {args.block_size} bytes, direct={args.direct}, checksum={args.checksum}")
    print(f"{'phase':6} {'call':14} {'p50 us':>9} {'p90 us':>9} {'share':>6}")
    for phase, steps in STEPS.items():
        total = sum(statistics.median(times[s]) for s in steps if times.get(s))
        for step in steps:
            if times.get(step):
                p50 = statistics.median(times[step])
                p90 = statistics.quantiles(times[step], n=10)[-1] if len(times[step]) > 1 else p50
                print(f"{phase:6} {step:14} {p50 * 1e6:9.0f} {p90 * 1e6:9.0f} {p50 / total:6.0%}")
        print(f"{phase:6} {'sum of p50':14} {total * 1e6:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
