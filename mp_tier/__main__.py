"""Command line: ``mp-tier config show [PATH]`` and ``mp-tier bench [options]`` (also ``python -m mp_tier ...``)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, TierConfig
from .ops.cli import add_commands


def _show_config(args: argparse.Namespace) -> None:
    """Print the settings a tier would run with, so a preset plus env overrides can be checked before a deploy."""
    config = TierConfig.from_toml(args.path) if args.path else TierConfig.from_env()
    print(config.to_toml(), end="")


def _prog() -> str:
    """The command as typed, for usage lines: 'mp-tier' (the console script) or 'python -m mp_tier'."""
    name = os.path.basename(sys.argv[0])
    return "python -m mp_tier" if name == "__main__.py" else name


def _bench(prog: str, options: list[str]) -> int:
    """The load generator, imported only when asked for: the tier itself never needs it."""
    from .bench.cli import main as bench_main

    return bench_main(options, prog=f"{prog} bench")


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 on a bad config, as argparse does on a bad command line."""
    parser = argparse.ArgumentParser(prog=_prog(), description="Tools for the mp_tier KV-cache tier.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "bench", add_help=False, help="run the load generator; its options follow (bench --help lists them)"
    )
    config = commands.add_parser("config", help="inspect tier settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show", help="print the effective settings as TOML: PATH (or the defaults), then MP_TIER_* overrides"
    )
    show.add_argument("path", nargs="?", help="a TOML config file, e.g. configs/nvme.toml")
    show.set_defaults(run=_show_config)
    add_commands(commands)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(parser.prog, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        status: int | None = args.run(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
