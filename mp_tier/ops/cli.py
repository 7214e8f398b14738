"""The operator commands' options, added to ``mp-tier``'s parser; each command module is imported when run."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Any

from ..bench.units import parse_size
from .tree import UsageError, shown


def _runner(command: str, *fields: str) -> Any:
    """A ``run`` for argparse: the command's exit status, or 2 with one line on a usage error, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"mp_tier.ops.{command}")
        try:
            status: int = module.run(args.root, *(getattr(args, f) for f in fields))
            return status
        except UsageError as e:
            print(f"mp-tier {command}: error: {e}", file=sys.stderr)
        except OSError as e:
            where = f": {shown(str(e.filename))}" if e.filename else ""
            print(f"mp-tier {command}: error: {errno.errorcode.get(e.errno or 0, 'EIO')}: {e.strerror}{where}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"mp-tier {command}: interrupted", file=sys.stderr)
            return 130
        return 2

    return run


def add_commands(commands: Any) -> None:
    """``du``, ``verify``, ``clean`` and ``tune`` under ``commands`` (an argparse subparsers object)."""
    du = commands.add_parser("du", help="what each namespace under ROOT holds (read-only)")
    du.add_argument("root", metavar="ROOT")
    du.add_argument("--json", action="store_true", help="print JSON instead of text")
    du.set_defaults(run=_runner("du", "json"))

    verify = commands.add_parser("verify", help="read every block; exit 0 if all would load, 1 if not, 2 on a usage error")
    verify.add_argument("root", metavar="ROOT")
    verify.add_argument("--fix", action="store_true", help="remove the corrupt blocks, exactly those a load would remove")
    verify.add_argument("--json", action="store_true", help="print JSON instead of text")
    verify.set_defaults(run=_runner("verify", "fix", "json"))

    clean = commands.add_parser("clean", help="remove stale temp files and old empty directories by the tier's own rules")
    clean.add_argument("root", metavar="ROOT")
    clean.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    clean.add_argument(
        "--max-bytes", type=parse_size, metavar="N", help="also evict least recently used blocks until ROOT holds at most N bytes of them (e.g. 50g)"
    )
    clean.add_argument("--json", action="store_true", help="print JSON instead of text")
    clean.set_defaults(run=_runner("clean", "dry_run", "max_bytes", "json"))

    tune = commands.add_parser("tune", help="short store and cold-load sweeps on ROOT's file system; writes the best as a TOML preset")
    tune.add_argument("root", metavar="ROOT")
    tune.add_argument("--block-size", type=parse_size, default=2 << 20, metavar="B", help="bytes per block (default 2m)")
    tune.add_argument("--seconds", type=float, default=1.0, metavar="S", help="seconds each measured phase runs at most (default 1)")
    tune.add_argument("--out", metavar="PRESET", help="write the preset here (default: print it)")
    tune.set_defaults(run=_runner("tune", "block_size", "seconds", "out"))
