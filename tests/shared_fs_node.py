"""One node of tests/test_shared_fs.py: a host process serving one mp_tier tier.

The test starts it as a node (its own UTS namespace and hostname, see
tools/glusterfs_nodes.py) and drives it with one JSON object per line on
stdin; every command gets one JSON line back on stdout (``{"error": ...}`` if
it raised). Only mp_tier's public API is used, as an engine would.

A block's bytes are a function of its key and a writer ``tag``, so any node
can check a block it loaded: a block that matches no writer's bytes is torn.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np

from mp_tier import FileSystemTierManager, JobMetadata, JobResult, PrimaryCache, TierConfig


def block_bytes_of(key: bytes, tag: int, nbytes: int) -> np.ndarray:
    """The bytes writer ``tag`` stores for ``key``."""
    return np.frombuffer(np.random.default_rng([tag, int.from_bytes(key, "big")]).bytes(nbytes), dtype=np.uint8)


class Warnings(logging.Handler):
    """mp_tier's log warnings (the O_DIRECT fallback), reported to the test."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Commands:
    """Reads command lines from fd 0 without blocking, so a loop can notice ``stop``."""

    def __init__(self) -> None:
        self.buffer = b""

    def ready(self) -> bool:
        return b"\n" in self.buffer or bool(select.select([0], [], [], 0)[0])

    def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            chunk = os.read(0, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


class Node:
    def __init__(self, commands: Commands) -> None:
        self.commands = commands
        self.cache: PrimaryCache | None = None
        self.tier: FileSystemTierManager | None = None
        self.next_job = 0
        self.tag = 0
        self.warnings = Warnings()
        logging.getLogger("mp_tier").addHandler(self.warnings)

    def start(self, root: str, block_bytes: int, num_blocks: int, read: int, write: int, config: dict) -> dict:
        self.cache = PrimaryCache.create(num_blocks, block_bytes)
        try:
            self.tier = FileSystemTierManager(
                primary_kv_view=self.cache, root_dir=root, n_read_workers=read, n_write_workers=write, config=TierConfig(**config)
            )
        except BaseException:
            self.cache.close()
            self.cache = None
            raise
        self.tier.drain(60)  # started = its start-up sweep and scan are done, so a test's own stores come after them
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "workers": self.tier.worker_pids(),
            "segment": self.cache.name,
            "warnings": self.warnings.messages,
        }

    def _stream(self, jobs: Iterator[tuple[str, list[bytes]]], inflight: int, on_result: Callable[[list[bytes], JobResult, list[int]], None]) -> None:
        """Keep ``inflight`` jobs submitted, each on a slot of block ids of its own, until ``jobs`` runs out."""
        tier, cache = self.tier, self.cache
        per_slot = cache.num_blocks // inflight
        free = list(range(inflight))
        pending: dict[int, tuple[list[bytes], list[int], int]] = {}
        for kind, keys in jobs:
            while not free:
                self._collect(pending, free, on_result)
            slot = free.pop()
            ids = list(range(slot * per_slot, slot * per_slot + len(keys)))
            if kind == "store":
                for key, block in zip(keys, ids):
                    cache.array[block] = block_bytes_of(key, self.tag, cache.block_bytes)
            self.next_job += 1
            pending[self.next_job] = (keys, ids, slot)
            getattr(tier, f"submit_{kind}")(JobMetadata(job_id=self.next_job, keys=keys, block_ids=ids))
        while pending:
            self._collect(pending, free, on_result)

    def _collect(self, pending: dict, free: list[int], on_result: Callable) -> None:
        self.tier.wait(5)
        for result in self.tier.get_finished():
            keys, ids, slot = pending.pop(result.job_id)
            on_result(keys, result, ids)
            free.append(slot)

    def store(self, keys: list[str], tag: int, per_job: int = 4, inflight: int = 2) -> dict:
        """Store ``keys`` with writer ``tag``'s bytes; count jobs and errors."""
        self.tag = tag
        keys_b = [bytes.fromhex(k) for k in keys]
        summary = {"jobs": 0, "failed": 0, "errors": []}

        def on_result(_keys: list[bytes], result: JobResult, _ids: list[int]) -> None:
            summary["jobs"] += 1
            if not result.success:
                summary["failed"] += 1
                summary["errors"].append(result.error)

        chunks = (("store", keys_b[i : i + per_job]) for i in range(0, len(keys_b), per_job))
        self._stream(chunks, inflight, on_result)
        return summary

    def load(self, keys: list[str], tags: list[int], inflight: int = 4, until_stop: bool = False, max_seconds: float = 60) -> dict:
        """Load each key in a job of its own (so every failure names its own error) and check its bytes.

        With ``until_stop`` it goes round the keys again and again until a
        ``stop`` line arrives (or ``max_seconds`` pass), and reports the rounds.
        """
        keys_b = [bytes.fromhex(k) for k in keys]
        summary: dict[str, Any] = {"ok": 0, "torn": [], "errors": collections.Counter(), "rounds": 0, "stopped": False}
        nbytes = self.cache.block_bytes
        expected: dict[bytes, list[np.ndarray]] = {}

        def on_result(job_keys: list[bytes], result: JobResult, ids: list[int]) -> None:
            good = set(job_keys if result.success else result.successful_keys or ())
            for key, block in zip(job_keys, ids):
                if key in good:
                    if key not in expected:
                        expected[key] = [block_bytes_of(key, t, nbytes) for t in tags]
                    if any(np.array_equal(self.cache.array[block], e) for e in expected[key]):
                        summary["ok"] += 1
                    else:
                        summary["torn"].append(key.hex())
                else:
                    summary["errors"][(result.error or "?").split(":")[0]] += 1

        deadline = time.monotonic() + max_seconds
        while True:
            self._stream((("load", [k]) for k in keys_b), inflight, on_result)
            summary["rounds"] += 1
            if not until_stop or time.monotonic() > deadline:
                break
            if self.commands.ready():
                command = self.commands.next()
                summary["stopped"] = command is not None and command.get("op") == "stop"
                break
        return summary

    def stop(self) -> dict:
        """A ``stop`` that arrived after its loop had ended by itself."""
        return {"late": True}

    def lookup_many(self, keys: list[str]) -> list:
        return self.tier.lookup_many([bytes.fromhex(k) for k in keys])

    def lookup(self, keys: list[str]) -> list:
        return [self.tier.lookup(bytes.fromhex(k)) for k in keys]

    def drain(self) -> dict:
        self.tier.drain(60)
        return {"results": len(self.tier.get_finished())}

    def paths(self, keys: list[str]) -> list[str]:
        return [self.tier.block_path(bytes.fromhex(k)) for k in keys]

    def stats(self) -> dict:
        return msgspec.structs.asdict(self.tier.stats())

    def shutdown(self) -> dict:
        if self.tier is not None:
            self.tier.shutdown()
        if self.cache is not None:
            self.cache.close()
        self.tier = self.cache = None
        return {}


def main() -> None:
    commands = Commands()
    node = Node(commands)
    print(json.dumps({"ready": socket.gethostname()}), flush=True)
    try:
        while (command := commands.next()) is not None:
            op = command.pop("op")
            try:
                reply = {"ok": getattr(node, op)(**command)}
            except Exception as e:  # the test decides whether this error was expected
                reply = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
    finally:
        node.shutdown()


if __name__ == "__main__":
    main()
