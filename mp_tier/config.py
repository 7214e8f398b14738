"""The tier's settings: one typed struct, loadable from TOML and the environment.

Later sources win: defaults, then a TOML file, then ``MP_TIER_<FIELD>``
variables, then the tier's explicit arguments.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

O_DIRECT_CHOICES = ("auto", "on", "off")
FILE_MODE_CHOICES = ("private", "group")
ENGINE_CHOICES = ("processes", "threads")
START_METHOD_CHOICES = ("forkserver", "spawn")
EVICTION_CHOICES = ("lru", "fail")

FILE_MODES = {"private": (0o600, 0o700), "group": (0o640, 0o750)}

ENV_PREFIX = "MP_TIER_"
_TRUE_WORDS = ("true", "1", "yes")
_FALSE_WORDS = ("false", "0", "no")
_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class ConfigError(ValueError):
    """A setting with a bad value; the message names where it came from."""


class TierConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every tunable of a tier. Explicit constructor arguments override these."""

    root_dir: str = ""
    n_read_workers: int = 4
    n_write_workers: int = 4
    engine: str = "processes"
    start_method: str = "forkserver"
    o_direct: str = "auto"
    file_mode: str = "private"
    stop_timeout: float = 10.0
    checksum: bool = False
    max_bytes: int = 0
    eviction: str = "lru"
    events: bool = False
    max_queued_tasks: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for field in ("n_read_workers", "n_write_workers"):
            value = getattr(self, field)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{field} = {value!r}: expected an integer >= 1")
        for field, choices in (
            ("engine", ENGINE_CHOICES),
            ("start_method", START_METHOD_CHOICES),
            ("o_direct", O_DIRECT_CHOICES),
            ("file_mode", FILE_MODE_CHOICES),
            ("eviction", EVICTION_CHOICES),
        ):
            value = getattr(self, field)
            if value not in choices:
                raise ConfigError(f"{field} = {value!r}: expected one of {', '.join(choices)}")
        for field in ("max_bytes", "max_queued_tasks"):
            value = getattr(self, field)
            if type(value) is not int or value < 0:
                raise ConfigError(f"{field} = {value!r}: expected an integer >= 0 (0 = unbounded)")
        if not isinstance(self.stop_timeout, (int, float)) or not self.stop_timeout > 0:  # NaN too
            raise ConfigError(f"stop_timeout = {self.stop_timeout!r}: expected a number of seconds > 0")

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


def _expected(type_: Any) -> str:
    return _EXPECTED.get(type_, str(type_))


def _load_file(cls: type[TierConfig], path: str | os.PathLike[str]) -> TierConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    types = {f.name: f.type for f in msgspec.structs.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in types:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types)}")
        try:
            values[key] = msgspec.convert(value, types[key])
        except msgspec.ValidationError:
            raise ConfigError(f"{path}: {key} = {value!r}: expected {_expected(types[key])}") from None
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _apply_env(config: TierConfig) -> TierConfig:
    """Override one field at a time, so a bad value is blamed on the variable that set it."""
    for field in msgspec.structs.fields(config):
        var = ENV_PREFIX + field.name.upper()
        text = os.environ.get(var)
        if text is None:
            continue
        try:
            value = _parse_env(text, field.type)
        except ValueError:
            raise ConfigError(f"env {var}: {field.name} = {text!r}: expected {_expected(field.type)}") from None
        try:
            config = msgspec.structs.replace(config, **{field.name: value})
        except ConfigError as e:
            raise ConfigError(f"env {var}: {e}") from None
    return config


def _parse_env(text: str, type_: Any) -> Any:
    """Environment values are always strings; convert to the field's type or raise ValueError."""
    if type_ is str:
        return text
    if type_ is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError(text)
    try:
        return msgspec.convert(text.strip(), type_, strict=False)
    except msgspec.ValidationError:
        raise ValueError(text) from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    return repr(value)
