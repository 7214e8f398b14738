#!/usr/bin/env python3
"""The load generator, run from a checkout: the same as ``mp-tier bench`` (see mp_tier.bench)."""

import sys

from mp_tier.bench.cli import main

if __name__ == "__main__":  # the tier's workers start with forkserver
    sys.exit(main())
