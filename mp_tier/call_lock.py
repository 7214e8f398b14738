"""The tier's lock: one call at a time, and never a call inside a call that a signal handler interrupted.

A handler runs on the thread it interrupted, in the middle of whatever that
thread was doing: perhaps inside a call of the tier, half-way through
changing its state. A plain reentrant lock lets the handler's call in (a
``shutdown()`` there once left a submitted job without a result); a
non-reentrant one hangs it. This lock asks the reentrant lock whether this
thread owns it, which is one C call and so cannot itself be interrupted:
a ``shutdown()`` found there is put off until the interrupted call returns,
``stats()`` answers (it only reads), and any other call is refused with a
RuntimeError that says why.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

_NOTHING = contextlib.nullcontext()


class CallLock:
    """Held for the length of one call of the tier; ``then`` runs once the call holding it returns."""

    __slots__ = ("_lock", "then")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.then: Callable[[], None] | None = None  # put off by a signal handler until the running call returns

    def held_here(self) -> bool:
        """True on the thread inside a call: code running here interrupted that call (a signal handler)."""
        owned: bool = self._lock._is_owned()  # type: ignore[attr-defined]  # what threading.Condition asks too
        return owned

    def for_reading(self) -> AbstractContextManager[None]:
        """This lock, or nothing on the thread inside a call: a signal handler there may still read counters."""
        return _NOTHING if self.held_here() else self

    def __enter__(self) -> None:
        if self.held_here():
            raise RuntimeError(
                "a call of the tier was made while another was running on the same thread (from a signal "
                "handler?): only shutdown(), which waits for the interrupted call to return, and stats() may be"
            )
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self.then is not None:
            then, self.then = self.then, None
            then()

    def acquire(self, timeout: float) -> bool:
        """For the tier's finalizer: the lock within ``timeout`` seconds, or False (a thread stuck inside a call)."""
        return self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        self._lock.release()
