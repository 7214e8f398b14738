"""The one C extension (``pyproject.toml`` holds everything else): a block's system calls in one call."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mp_tier._block_calls", ["mp_tier/_block_calls.c"])])
