"""How a bench run ends early: a usage error (one line, no traceback), or a stop signal."""

from __future__ import annotations

import signal
from types import FrameType


class UsageError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the run is, as Ctrl-C raises KeyboardInterrupt."""


def stop_on_sigterm() -> None:
    """Make SIGTERM (a job runner's stop, ``timeout``, ``kill``) end a run as Ctrl-C does, through its
    clean-ups: by default it kills the process where it stands, and the run's block files stay behind."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, stop)


def stopped_status(stop: KeyboardInterrupt) -> int:
    """The shell's exit status for a process ended by that signal: 128 + its number."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
