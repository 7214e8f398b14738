from collections.abc import Callable

def load(
    root: int,
    rel: str,
    buffer: memoryview,
    offset: int,
    nbytes: int,
    direct: bool,
    uid: int,
    gids: frozenset[int],
    ready: Callable[[], None] | None,
    /,
) -> bool: ...
def store(
    root: int,
    dir: str,
    name: str,
    tmp: str,
    buffer: memoryview,
    offset: int,
    nbytes: int,
    direct: bool,
    file_mode: int,
    dir_mode: int,
    ready: Callable[[], None] | None,
    /,
) -> bool: ...
