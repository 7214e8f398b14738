"""Command line: ``python -m mp_tier config show [PATH]``."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, TierConfig


def _show_config(args: argparse.Namespace) -> None:
    """Print the settings a tier would run with, so a preset plus env overrides can be checked before a deploy."""
    config = TierConfig.from_toml(args.path) if args.path else TierConfig.from_env()
    print(config.to_toml(), end="")


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 on a bad config, as argparse does on a bad command line."""
    parser = argparse.ArgumentParser(prog="python -m mp_tier", description="Tools for the mp_tier KV-cache tier.")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="inspect tier settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show", help="print the effective settings as TOML: PATH (or the defaults), then MP_TIER_* overrides"
    )
    show.add_argument("path", nargs="?", help="a TOML config file, e.g. configs/nvme.toml")
    show.set_defaults(run=_show_config)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
