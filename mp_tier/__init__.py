"""mp_tier: a file-system KV-cache tier whose block I/O runs in worker processes.

The data flow and the module table: docs/architecture.md.

Names are imported lazily, so a worker process (``worker_process``) starts
without numpy or the host's side of the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "ConfigError": "config",
    "TierConfig": "config",
    "TierBroken": "errors",
    "TierClosed": "errors",
    "JobMetadata": "jobs",
    "JobResult": "jobs",
    "TierEvent": "jobs",
    "TierStats": "jobs",
    "PrimaryCache": "shared_cache",
    "FileSystemTierManager": "tier",
}

__all__ = [
    "ConfigError",
    "FileSystemTierManager",
    "JobMetadata",
    "JobResult",
    "PrimaryCache",
    "TierBroken",
    "TierClosed",
    "TierConfig",
    "TierEvent",
    "TierStats",
    "__version__",
]

if TYPE_CHECKING:
    from .config import ConfigError, TierConfig
    from .errors import TierBroken, TierClosed
    from .jobs import JobMetadata, JobResult, TierEvent, TierStats
    from .shared_cache import PrimaryCache
    from .tier import FileSystemTierManager


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mp_tier' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
