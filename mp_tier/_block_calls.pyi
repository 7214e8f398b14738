from collections.abc import Callable

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
def locate(key: bytes, /) -> tuple[str, str]: ...
def load_run(
    root: int,
    keys: list[bytes],
    block_ids: list[int],
    buffer: memoryview,
    nbytes: int,
    direct: bool,
    uid: int,
    gids: frozenset[int],
    touch: bool,
    between: Callable[[], None] | None,
    hooks: list[Callable[[], None] | None] | None,
    start: int,
    /,
) -> tuple[int, int]: ...
