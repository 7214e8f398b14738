"""The trace workload's requests: multi-turn chats whose prompts come back with a longer prefix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .driver import Window
from .keys import Keys
from .records import Dist, TraceStats


class ChatTrace:
    """Multi-turn chats: a request continues a Zipf-popular conversation with one more turn.

    A turn adds ``turn_blocks`` blocks to the conversation's prompt; after
    ``max_turns`` turns it starts over as a new conversation (new keys), so
    prompts stay within a cache slot. The same seed gives every engine the
    same request sequence.
    """

    def __init__(self, conversations: int, zipf: float, turn_blocks: int, max_turns: int, seed: int):
        self.conversations = conversations
        self.zipf = zipf
        weights = np.arange(1, conversations + 1, dtype=float) ** -zipf
        self._p = weights / weights.sum()
        self._rng = np.random.default_rng(seed)
        self._picks: Iterator[int] = iter(())
        self._keys = Keys()
        self._turn_blocks = turn_blocks
        self._max_turns = max_turns
        self._prompts: list[list[bytes]] = [[] for _ in range(conversations)]
        self._generation = [0] * conversations

    def next_prompt(self) -> list[bytes]:
        c = next(self._picks, None)
        if c is None:
            self._picks = iter(self._rng.choice(len(self._p), size=4096, p=self._p).tolist())
            c = next(self._picks)
        prompt = self._prompts[c]
        if len(prompt) == self._max_turns * self._turn_blocks:
            self._generation[c] += 1
            prompt.clear()
        start = len(prompt)
        prompt += [self._keys.named(f"c{c}.{self._generation[c]}.{i}") for i in range(start, start + self._turn_blocks)]
        return list(prompt)


def trace_requests(win: Window, trace: ChatTrace, budget: int, block_bytes: int, deadline: float) -> dict[str, Any]:
    """Serve requests until ``budget`` bytes were submitted: look up, load the leading hits, store the misses."""
    tier = win.host.tier
    lookup_ns: list[int] = []
    spent = requests = prompt_blocks = hit_blocks = inflight_blocks = 0
    while spent < budget and time.perf_counter() < deadline:
        if not win.has_room("request"):
            win.step()
            continue
        prompt = trace.next_prompt()
        t0 = time.perf_counter_ns()
        states = tier.lookup_many(prompt)
        lookup_ns.append(time.perf_counter_ns() - t0)
        hits = next((i for i, s in enumerate(states) if s is not True), len(states))
        missing = [i for i in range(hits, len(prompt)) if states[i] is False]
        slot = win.open("request")
        if hits:
            win.submit(slot, "load", prompt[:hits])
        if missing:
            win.submit(slot, "store", [prompt[i] for i in missing], missing)
        if not hits and not missing:
            win.release(slot)
        requests += 1
        prompt_blocks += len(prompt)
        hit_blocks += hits
        inflight_blocks += states.count(None)
        spent += (hits + len(missing)) * block_bytes
    win.drain()
    stats = TraceStats(
        conversations=trace.conversations,
        zipf=trace.zipf,
        requests=requests,
        prompt_blocks=prompt_blocks,
        hit_blocks=hit_blocks,
        inflight_blocks=inflight_blocks,
        hit_rate=hit_blocks / prompt_blocks if prompt_blocks else 0.0,
        lookup_many_us=Dist.of(lookup_ns, 1e-3),
    )
    return {"trace": stats}
