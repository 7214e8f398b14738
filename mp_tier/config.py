"""The tier's settings: one typed struct, loadable from TOML and the environment.

Later sources win: defaults, then a TOML file, then ``MP_TIER_<FIELD>``
variables, then the tier's explicit arguments. Every value, whatever its
source, is checked by msgspec against the field's annotated type (kind and
range), so a constructor call, a file and a variable get the same check and
the same one-line message.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import stat
import sys
import typing
from typing import Annotated, Any, Literal

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

Workers = Annotated[int, msgspec.Meta(ge=1, le=256)]
Bytes = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
OptionalSeconds = Annotated[float, msgspec.Meta(ge=0, le=86400)]
StartSeconds = Annotated[float, msgspec.Meta(ge=1, le=86400)]  # a worker's start takes 0.1-0.6 s
IoDepth = Annotated[int, msgspec.Meta(ge=1, le=64)]
Niceness = Annotated[int, msgspec.Meta(ge=0, le=19)]
Cpus = list[Annotated[int, msgspec.Meta(ge=0, le=4095)]]
Engine = Literal["processes", "threads"]
ODirect = Literal["auto", "on", "off"]
FileMode = Literal["private", "group"]
Eviction = Literal["lru", "fail"]
SchedPolicy = Literal["normal", "batch", "idle"]

# (file mode, directory mode) of what the tier creates.
FILE_MODES = {"private": (0o600, 0o700), "group": (0o640, 0o750)}

# vLLM's FS-tier names for the worker counts, which the constructor and the vLLM adapter take as well
THREAD_NAMES = {"n_read_threads": "n_read_workers", "n_write_threads": "n_write_workers"}

ENV_PREFIX = "MP_TIER_"
# Variables the project reads that are not settings: a test hook of the workers, the shared-FS tests' switch.
ENV_NOT_SETTINGS = frozenset({"MP_TIER_TEST_PAUSE", "MP_TIER_GLUSTERFS"})
# Numbers as a setting takes them: ASCII digits only (int() and float() also take '٣' and '1_0').
_INT = re.compile(r"[+-]?[0-9]{1,100}")  # int() refuses over 4300 digits
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)
_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def machine_workers() -> int:
    """Default worker processes of each kind: half the CPUs the workers may use, rounded up, at most 8.

    The workers keep off the scheduler's CPU, so they have all but one of the
    CPUs this process may use (all of one CPU). With ``io_depth`` lanes each,
    one process per kind already keeps 4 reads and 4 writes in flight; on 2
    vCPUs a second one only shares the workers' single CPU, and the switching
    cost more CPU per block than it gave (docs/bench.md). A machine with many
    CPUs gets more processes for the CPU a block costs.
    """
    usable = max(1, len(os.sched_getaffinity(0)) - 1)
    return min(8, (usable + 1) // 2)


class ConfigError(ValueError):
    """A setting with a bad value; the message names where it came from."""


class TierConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every tunable of a tier. Explicit constructor arguments override these."""

    root_dir: str = ""
    n_read_workers: Workers = msgspec.field(default_factory=machine_workers)
    n_write_workers: Workers = msgspec.field(default_factory=machine_workers)
    engine: Engine = "processes"
    o_direct: ODirect = "auto"
    file_mode: FileMode = "private"
    stop_timeout: Seconds = 10.0
    task_timeout: OptionalSeconds = 300.0
    start_timeout: StartSeconds = 60.0
    checksum: bool = False
    max_bytes: Bytes = 0
    eviction: Eviction = "lru"
    events: bool = False
    max_queued_tasks: Bytes = 0
    worker_nice: Niceness = 0
    worker_cpus: Cpus = msgspec.field(default_factory=list)
    worker_sched: SchedPolicy = "normal"
    io_depth: IoDepth = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value its type refuses."""
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            check(field.name, value, field.type)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TierConfig:
        """The file's settings, then MP_TIER_* overrides: a deployment can retune a shared preset without editing it."""
        return _apply_env(_load_file(cls, path))

    @classmethod
    def from_env(cls) -> TierConfig:
        """Defaults plus MP_TIER_* overrides, for callers that have no config file."""
        return _apply_env(cls())

    def to_toml(self) -> str:
        """One ``key = value`` line per field, so shown settings can be saved as a preset and loaded back."""
        return "".join(f"{f.name} = {_toml_value(getattr(self, f.name))}\n" for f in msgspec.structs.fields(self))


def check(name: str, value: Any, type_: Any) -> Any:
    """``value`` converted to ``type_`` (an int is a valid float), or ConfigError naming both."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError:
        raise ConfigError(f"{name} = {value!r}: expected {describe(type_)}") from None


def with_settings(base: TierConfig, settings: dict[str, Any], aliases: dict[str, str], owner: str, alias_kind: str) -> TierConfig:
    """``base`` with ``settings``, each checked under the key the caller wrote: a field's name or its alias
    (an engine's own name for it), so an error names what the user typed. Two keys for one field, or a key
    that names none, is a TypeError, as an unknown keyword argument is."""
    types = {f.name: f.type for f in msgspec.structs.fields(TierConfig)}
    if unknown := sorted(name for name in settings if aliases.get(name, name) not in types):
        raise TypeError(f"unknown settings for {owner!r}: {', '.join(unknown)} (neither {alias_kind} nor TierConfig's)")
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}  # field -> the key that set it
    for name, value in sorted(settings.items()):
        field = aliases.get(name, name)
        if field in keys:
            raise TypeError(f"{keys[field]} and {name} name one setting: give one")
        keys[field] = name
        values[field] = check(name, value, types[field])
    return msgspec.structs.replace(base, **values)


def describe(type_: Any) -> str:
    """What a field accepts, in words: ``an integer >= 1 and <= 256``, ``one of auto, on, off``."""
    bounds: list[str] = []
    if typing.get_origin(type_) is Annotated:
        type_, *metas = typing.get_args(type_)
        for meta in metas:
            for attr, sign in _BOUNDS:
                if (limit := getattr(meta, attr, None)) is not None:
                    bounds.append(f"{sign} {limit:g}" if isinstance(limit, float) else f"{sign} {limit}")
    if typing.get_origin(type_) is Literal:
        return "one of " + ", ".join(typing.get_args(type_))
    if typing.get_origin(type_) is list:
        return f"a list of {describe(typing.get_args(type_)[0]).replace('an integer', 'integers')}"
    kind = _KIND.get(type_, str(type_))
    return f"{kind} {' and '.join(bounds)}" if bounds else kind


def _load_file(cls: type[TierConfig], path: str | os.PathLike[str]) -> TierConfig:
    try:
        data = tomllib.loads(_read_regular(path).decode())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    types = {f.name: f.type for f in msgspec.structs.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types)}")
        try:
            values[key] = check(key, value, types[key])
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return cls(**values)


def _read_regular(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; opened without blocking and refused unless a regular file, so a FIFO cannot hang us."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else f"mode {mode:o}"
            raise OSError(errno.EINVAL, f"not a regular file ({kind})")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _apply_env(config: TierConfig) -> TierConfig:
    """Override one field at a time, so a bad value is blamed on the variable that set it."""
    _refuse_unknown_env(config)
    for field in msgspec.structs.fields(config):
        var = ENV_PREFIX + field.name.upper()
        text = os.environ.get(var)
        if text is None:
            continue
        try:
            value = check(field.name, _parse_env(text, field.type), field.type)
        except ConfigError as e:
            raise ConfigError(f"env {var}: {e}") from None
        config = msgspec.structs.replace(config, **{field.name: value})
    return config


def _refuse_unknown_env(config: TierConfig) -> None:
    """A misspelt variable would silently change nothing: name the first one, and the setting it is closest to."""
    names = [f.name.upper() for f in msgspec.structs.fields(config)]
    for var in sorted(os.environ):
        if var.startswith(ENV_PREFIX) and var[len(ENV_PREFIX) :] not in names and var not in ENV_NOT_SETTINGS:
            close = difflib.get_close_matches(var[len(ENV_PREFIX) :], names, n=1)  # the shared prefix would match anything
            known = [ENV_PREFIX + name for name in close or names]
            hint = f"did you mean {known[0]}?" if close else f"the settings are {', '.join(known)}"
            raise ConfigError(f"env {var}: not a setting; {hint}")


def _parse_env(text: str, type_: Any) -> Any:
    """Environment values are strings: the field's kind read from one, or the text as given for ``check`` to refuse."""
    kind = typing.get_args(type_)[0] if typing.get_origin(type_) is Annotated else type_
    word = text.strip()
    if typing.get_origin(kind) is list:  # "0,1": a list of integers
        items = [item.strip() for item in word.split(",") if item.strip()]
        return [int(item) if _INT.fullmatch(item) else item for item in items]
    if kind is bool:
        lowered = word.lower()
        return lowered in _TRUE_WORDS if lowered in _TRUE_WORDS + _FALSE_WORDS else text
    if kind is int:
        return int(word) if _INT.fullmatch(word) else text
    if kind is float:  # inf and nan too: the field's range refuses them by name
        return float(word) if _FLOAT.fullmatch(word) else text
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    return repr(value)
