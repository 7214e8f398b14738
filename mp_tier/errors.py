"""The tier's named failure modes, so callers catch a class instead of parsing text."""

from __future__ import annotations

from .codes import ErrorCode


class TierClosed(RuntimeError):
    """The tier was shut down, or belongs to another process (a forked child); it takes no work."""


class TierBroken(TierClosed):
    """Workers kept dying as they started, so the tier stopped replacing them.

    Like ``BrokenProcessPool``: every job in flight was failed, and every
    later call raises this instead of waiting on workers that cannot run.
    """


class Refused(Exception):
    """A job the tier will not start; it fails at once with ``code`` and the message ``<code>: <detail>``.

    Raised by the residency and queue checks before anything changes, and
    turned into a failed ``JobResult`` by the tier, never into an exception
    for the caller: the job itself was valid.
    """

    def __init__(self, code: ErrorCode, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code: ErrorCode = code


class CapacityFull(Refused):
    """A store that does not fit the byte budget."""

    def __init__(self, detail: str):
        super().__init__("ENOSPC", detail)
