"""How the tier starts its own processes (workers, the janitor): a fresh interpreter that imports exactly
this package, msgspec and the standard library, from where the host imported them.

``-S`` skips ``site``: the ``.pth`` files of a big environment and an editable install's finder cost a
third of a worker's boot. The entry code then drops the host's working directory, which ``-c`` (like
``-m``) puts first on ``sys.path`` (a stray ``msgspec/`` there would shadow the real one), and appends
the two directories after the standard library, so nothing beside msgspec in site-packages can shadow a
standard module. The host's ``PYTHONPATH`` is left out for the same reason.
"""

from __future__ import annotations

import os
import sys

import msgspec

PATHS = list(dict.fromkeys(os.path.dirname(os.path.dirname(os.path.abspath(path))) for path in (__file__, msgspec.__file__)))


def command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module.main()`` with ``args`` as ``sys.argv[1:]``."""
    if not sys.executable:
        raise OSError(f"cannot start {module}: sys.executable is empty in this interpreter")
    code = f"import sys; del sys.path[0]; sys.path += {PATHS!r}; from {module} import main; main()"
    return [sys.executable, "-S", "-c", code, *args]


def environment() -> dict[str, str]:
    """The host's environment without ``PYTHONPATH``."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
