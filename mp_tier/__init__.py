"""mp_tier: a file-system KV-cache tier whose block I/O runs in worker processes.

Data flow, one module per step::

    host process                                     worker processes
    ------------                                     ----------------
    tier.FileSystemTierManager  (coordinator)
      submit_*: jobs.JobMetadata -> messages.Task
        -> channels.TaskPipe (load pipe / store pipe)  -> worker.run_worker
                                                            block_io.load_block / store_block
                                                            shared_cache.PrimaryCache <-> files (layout)
      get_finished(): channels.ResultReader  <- result pipe <- messages.Completion
        -> jobs.JobResult
    pool.WorkerPool starts, watches and stops the workers; config.TierConfig sets it all.
"""

from .config import ConfigError, TierConfig
from .jobs import JobMetadata, JobResult
from .shared_cache import PrimaryCache
from .tier import FileSystemTierManager, TierBroken, TierClosed

__all__ = [
    "ConfigError",
    "FileSystemTierManager",
    "JobMetadata",
    "JobResult",
    "PrimaryCache",
    "TierBroken",
    "TierClosed",
    "TierConfig",
]
