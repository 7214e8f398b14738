"""Operator commands for a cache root: ``mp-tier du``, ``verify``, ``clean`` and ``tune``.

They judge every name with the tier's own layout, namespace and block I/O
code (``tree`` walks a root the way the tier does), so what they call a
block, a stale temp file or a corrupt block is what the tier would.
"""
