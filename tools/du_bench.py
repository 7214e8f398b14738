"""Time ``mp-tier du`` on a large tree: N empty block files with the tier's own names, built fast, timed, removed.

    python tools/du_bench.py --files 1000000 [--root DIR] [--keep]

The namespace is made by the tier's ``prepare_namespace`` and every name by
its ``BlockLayout``, so ``du`` sees exactly what a tier would have left; the
files are empty (``du`` reads names and ``lstat`` only, so size does not
change its work). The run is timed in a fresh process, as an operator runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from mp_tier.config import FILE_MODES
from mp_tier.namespace import owners_for, prepare_namespace


def build(root: str, files: int, block_bytes: int, dirs: int) -> None:
    layout, ns_fd = prepare_namespace(root, f"bs{block_bytes}_r0", {"block_bytes": block_bytes}, FILE_MODES["private"], owners_for(False))
    os.close(ns_fd)
    made: set[str] = set()
    for i in range(files):
        # The first 5 hex digits of a hash pick its directory: spread the files over ``dirs`` of them.
        key = (((i % dirs) << 236) | i).to_bytes(32, "big") + (0).to_bytes(4, "big")
        path = layout.locate(key)
        directory = f"{layout.base}/{path.dir}"
        if path.dir not in made:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            made.add(path.dir)
        os.mknod(f"{directory}/{path.name}", stat.S_IFREG | 0o600)  # one system call, no fd


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--block-bytes", type=int, default=2 << 20)
    p.add_argument(
        "--dirs", type=int, default=4096, help="leaf directories to spread over (a tier's random hashes use up to 2**20 per group)"
    )
    p.add_argument("--root", help="a new directory to build in (default: a temp dir)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="du-bench-")
    try:
        t0 = time.perf_counter()
        build(root, args.files, args.block_bytes, args.dirs)
        print(f"built {args.files:,} files in {args.dirs:,} leaf directories under {root} in {time.perf_counter() - t0:.1f} s")
        for run in ("first", "second"):
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "mp_tier", "du", root], capture_output=True, text=True, check=True)
            print(f"du ({run} run, wall time including interpreter start): {time.perf_counter() - t0:.2f} s")
        print(done.stdout, end="")
    finally:
        if not args.keep:
            shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
