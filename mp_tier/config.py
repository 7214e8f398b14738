"""The tier's settings: one typed struct, loadable from TOML and the environment."""

from __future__ import annotations

import msgspec

O_DIRECT_CHOICES = ("auto", "on", "off")
FILE_MODE_CHOICES = ("private", "group")
ENGINE_CHOICES = ("processes", "threads")
START_METHOD_CHOICES = ("forkserver", "spawn")

FILE_MODES = {"private": (0o600, 0o700), "group": (0o640, 0o750)}


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
        ):
            value = getattr(self, field)
            if value not in choices:
                raise ConfigError(f"{field} = {value!r}: expected one of {', '.join(choices)}")
        if not isinstance(self.stop_timeout, (int, float)) or self.stop_timeout <= 0:
            raise ConfigError(f"stop_timeout = {self.stop_timeout!r}: expected a number of seconds > 0")
