"""Block keys for the bench: fresh ones for stores, named ones a trace can come back to."""

from __future__ import annotations

import hashlib
import itertools
import os

GROUP0 = (0).to_bytes(4, "big")


class Keys:
    """36-byte keys (32-byte hash + group 0) that no earlier run can have written."""

    def __init__(self) -> None:
        self._nonce = os.urandom(16)
        self._count = itertools.count()

    def named(self, name: str) -> bytes:
        return hashlib.blake2b(name.encode(), key=self._nonce, digest_size=32).digest() + GROUP0

    def fresh(self, n: int) -> list[bytes]:
        return [self.named(f"k{next(self._count)}") for _ in range(n)]
