"""What a signal handler that interrupted a call of the tier may do there.

A handler runs on the thread it interrupted, in the middle of whatever that
thread was doing: perhaps inside a call of the tier, half-way through
changing its state. The tier's reentrant lock would let the handler's call
in (a ``shutdown()`` there once left a submitted job without a result); a
plain one would hang it. So the tier first asks whether its own thread is
inside a call already: there ``shutdown()`` only asks for the shutdown,
which the tier's next call (or its finalizer) carries out, ``stats()`` reads
without the lock, and any other call is refused with a RuntimeError that
says why.

The lock stays the C reentrant lock, taken and released by ``with`` in C:
an exception a handler raises (Ctrl-C's KeyboardInterrupt) can cut a call
short, but never leaves the lock held.
"""

from __future__ import annotations

import threading


def inside_a_call(lock: threading.RLock) -> bool:
    """True on the thread that holds ``lock`` (the tier's, or the janitor's): code running here interrupted a call."""
    owned: bool = lock._is_owned()  # type: ignore[attr-defined]  # what threading.Condition asks too
    return owned


def entered(lock: threading.RLock) -> threading.RLock:
    """The tier's ``lock``, for a call to take with ``with``; raises first if this thread is inside a call already."""
    if inside_a_call(lock):
        raise RuntimeError(
            "a call of the tier was made while another was running on the same thread (from a signal "
            "handler?): only shutdown() and stats() may be made there"
        )
    return lock
