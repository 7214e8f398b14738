"""Where blocks live on disk.

    <root_dir>/<namespace>_r<rank>/<hhh>/<hh>_g<group>/<hash_hex>.bin

A key is the block hash followed by a 4-byte big-endian KV-group index
(vLLM's ``make_offload_key``). The namespace names everything that changes a
block's bytes (block size, model, dtype, parallel layout), so runs that could
not share blocks never see each other's files; ``config.json`` records it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import msgspec

from .block_io import temp_path

GROUP_BYTES = 4
MIN_KEY_BYTES = GROUP_BYTES + 4
CONFIG_FILE = "config.json"


class BlockLayout(msgspec.Struct, frozen=True):
    """Maps a key to its file under ``base`` (the ``<namespace>_r<rank>`` dir)."""

    base: str

    def path(self, key: bytes) -> str:
        digest = key[:-GROUP_BYTES].hex()
        group = int.from_bytes(key[-GROUP_BYTES:], "big")
        return f"{self.base}/{digest[:3]}/{digest[3:5]}_g{group}/{digest}.bin"

    def scan(self) -> list[bytes]:
        """Keys of every block file under ``base``, least recently used (mtime) first."""
        found = []
        for parent, _, names in os.walk(self.base):
            group = parent.rpartition("_g")[2]
            if not group.isdigit():
                continue
            suffix = int(group).to_bytes(GROUP_BYTES, "big")
            for name in names:
                if name.endswith(".bin"):
                    try:
                        found.append((os.stat(os.path.join(parent, name)).st_mtime_ns, bytes.fromhex(name[:-4]) + suffix))
                    except (OSError, ValueError):
                        continue  # removed meanwhile, or not one of ours
        found.sort()
        return [key for _, key in found]


def _clean(value: object) -> str:
    text = str(value).removeprefix("torch.")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def describe_run(block_bytes: int, offloading_spec: Any = None) -> tuple[dict[str, Any], int]:
    """The run description that names the namespace, and this process's rank.

    ``offloading_spec`` is read the way vLLM lays out its ``OffloadingSpec``
    (``vllm_config.model_config`` / ``.parallel_config``); anything missing is
    simply left out.
    """
    run: dict[str, Any] = {}
    rank = 0
    vllm_config = getattr(offloading_spec, "vllm_config", None)
    model_config = getattr(vllm_config, "model_config", None)
    parallel = getattr(vllm_config, "parallel_config", None)
    for field, source, attr in (
        ("model", model_config, "model"),
        ("dtype", model_config, "dtype"),
        ("tp", parallel, "tensor_parallel_size"),
        ("pp", parallel, "pipeline_parallel_size"),
    ):
        value = getattr(source, attr, None)
        if value is not None:
            run[field] = _clean(value)
    if parallel is not None:
        rank = int(getattr(parallel, "rank", 0) or 0)
    run["block_bytes"] = block_bytes
    return run, rank


def namespace_name(run: dict[str, Any]) -> str:
    parts = [run[k] if k in ("model", "dtype") else f"{k}{run[k]}" for k in ("model", "dtype", "tp", "pp") if k in run]
    return "_".join([*parts, f"bs{run['block_bytes']}"])


def prepare_namespace(root_dir: str, run: dict[str, Any], rank: int, dir_mode: int) -> BlockLayout:
    """Create the namespace directory and its ``config.json``, or check them.

    A namespace whose ``config.json`` describes another run is refused rather
    than reused: its blocks would load as garbage.
    """
    base = os.path.join(os.path.abspath(root_dir), f"{namespace_name(run)}_r{rank}")
    try:
        os.makedirs(base, mode=dir_mode, exist_ok=True)
        config_path = os.path.join(base, CONFIG_FILE)
        tmp = temp_path(config_path)
        with open(tmp, "w") as f:
            json.dump(run, f, sort_keys=True)
        try:
            os.link(tmp, config_path)  # first writer wins; nobody overwrites
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(config_path) as f:
            recorded = json.load(f)
    except OSError as e:
        raise OSError(e.errno, f"root_dir {root_dir!r} is not usable: {e.strerror}", e.filename) from None
    if recorded != run:
        raise ValueError(f"{config_path} describes another run: recorded {recorded}, this run {run}")
    return BlockLayout(base)
