"""TierConfig from TOML files and MP_TIER_* variables, and ``python -m mp_tier config show``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from mp_tier.config import ConfigError, TierConfig, with_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))
FIELDS = [f.name for f in msgspec.structs.fields(TierConfig)]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's own MP_TIER_* variables must not leak into these tests."""
    for var in os.environ:
        if var.startswith("MP_TIER_"):
            monkeypatch.delenv(var)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tier.toml"
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    """The one ConfigError loading ``path`` raises, checked to carry no chained traceback."""
    with pytest.raises(ConfigError) as info:
        TierConfig.from_toml(path)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return str(info.value)


def test_presets_exist() -> None:
    assert {p.name for p in PRESETS} >= {"default.toml", "nvme.toml", "shared-fs.toml", "small-blocks.toml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_leaves_root_dir_to_the_caller(preset: Path) -> None:
    config = TierConfig.from_toml(preset)
    config.validate()
    assert config.root_dir == ""


def test_default_preset_spells_out_every_default() -> None:
    text = (CONFIGS / "default.toml").read_text()
    assert TierConfig.from_toml(CONFIGS / "default.toml") == TierConfig()
    machine_sized = {"n_read_workers", "n_write_workers"}  # shown as comments: their value depends on the CPUs
    missing = [name for name in FIELDS if name not in {"root_dir", *machine_sized} and f"\n{name} = " not in text]
    assert missing == []
    assert all(f"\n# {name} = " in text for name in machine_sized)


def test_presets_set_what_they_are_for() -> None:
    nvme = TierConfig.from_toml(CONFIGS / "nvme.toml")
    assert nvme.o_direct == "on" and nvme.n_read_workers > 4 and nvme.n_write_workers > 4
    shared = TierConfig.from_toml(CONFIGS / "shared-fs.toml")
    assert (shared.o_direct, shared.file_mode) == ("auto", "group")
    small = TierConfig.from_toml(CONFIGS / "small-blocks.toml")
    assert small.o_direct == "off" and small.n_read_workers > 4


def test_file_values_and_int_for_float(tmp_path: Path) -> None:
    path = write(tmp_path, 'root_dir = "/data/kv"\nn_read_workers = 2\nstop_timeout = 3\n')
    config = TierConfig.from_toml(path)
    assert (config.root_dir, config.n_read_workers, config.n_write_workers) == ("/data/kv", 2, TierConfig().n_write_workers)
    assert config.stop_timeout == 3.0 and type(config.stop_timeout) is float


def test_to_toml_round_trips(tmp_path: Path) -> None:
    config = TierConfig(root_dir='/data/"kv" \\ ü', n_read_workers=3, o_direct="off", stop_timeout=2.5)
    assert TierConfig.from_toml(write(tmp_path, config.to_toml())) == config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("n_read_wrokers = 4\n", "unknown key 'n_read_wrokers'; known keys: root_dir, ", id="unknown-key"),
        pytest.param("[tier]\nn_read_workers = 4\n", "unknown key 'tier'", id="table"),
        pytest.param('n_read_workers = "four"\n', "n_read_workers = 'four': expected an integer", id="wrong-type"),
        pytest.param("n_write_workers = 2.5\n", "n_write_workers = 2.5: expected an integer", id="float-for-int"),
        pytest.param("o_direct = true\n", "o_direct = True: expected one of auto, on, off", id="bool-for-str"),
            pytest.param("n_read_workers = true\n", "n_read_workers = True: expected an integer", id="bool-for-int"),
            pytest.param("n_read_workers = 100000\n", "n_read_workers = 100000: expected an integer >= 1 and <= 256", id="huge"),
            pytest.param("stop_timeout = inf\n", "stop_timeout = inf: expected a number > 0 and <= 86400", id="inf"),
            pytest.param("stop_timeout = nan\n", "stop_timeout = nan: expected a number > 0", id="nan"),
            pytest.param("stop_timeout = 1e300\n", "stop_timeout = 1e+300: expected a number > 0 and <= 86400", id="1e300"),
            pytest.param("stop_timeout = true\n", "stop_timeout = True: expected a number", id="bool-for-float"),
            pytest.param("task_timeout = -1\n", "task_timeout = -1: expected a number >= 0 and <= 86400", id="negative-timeout"),
            pytest.param("start_timeout = 0.05\n", "start_timeout = 0.05: expected a number >= 1 and <= 86400", id="start-below-a-start"),
            pytest.param("max_bytes = 1.5\n", "max_bytes = 1.5: expected an integer >= 0", id="float-bytes"),
            pytest.param("max_bytes = 99999999999999999999\n", "max_bytes = 99999999999999999999: expected an integer >= 0", id="huge-bytes"),
            pytest.param("checksum = 1\n", "checksum = 1: expected true or false", id="int-for-bool"),
            pytest.param("root_dir = 5\n", "root_dir = 5: expected a string", id="int-for-str"),
            pytest.param("start_method = \"fork\"\n", "unknown key 'start_method'", id="removed-key"),
        pytest.param("n_read_workers = 0\n", "n_read_workers = 0: expected an integer >= 1", id="zero-workers"),
        pytest.param("n_write_workers = -1\n", "n_write_workers = -1: expected an integer >= 1", id="negative"),
        pytest.param("io_depth = 0\n", "io_depth = 0: expected an integer >= 1 and <= 64", id="zero-io-depth"),
        pytest.param("io_depth = 65\n", "io_depth = 65: expected an integer >= 1 and <= 64", id="deep-io-depth"),
        pytest.param('o_direct = "sometimes"\n', "o_direct = 'sometimes': expected one of auto, on, off", id="word"),
        pytest.param("n_read_workers = \n", "invalid TOML: ", id="bad-syntax"),
    ],
)
def test_bad_file_gives_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: {expected}")
    assert "\n" not in message


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    assert "line 2" in load_error(write(tmp_path, "n_read_workers = 4\no_direct = off\n"))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert load_error(path) == f"{path}: cannot read: No such file or directory"


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TIER_N_READ_WORKERS", "8")
    monkeypatch.setenv("MP_TIER_O_DIRECT", "off")
    monkeypatch.setenv("MP_TIER_STOP_TIMEOUT", "2.5")
    config = TierConfig.from_toml(write(tmp_path, 'n_read_workers = 2\no_direct = "on"\nn_write_workers = 3\n'))
    assert (config.n_read_workers, config.o_direct, config.stop_timeout) == (8, "off", 2.5)
    assert config.n_write_workers == 3


def test_from_env_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TierConfig.from_env() == TierConfig()
    monkeypatch.setenv("MP_TIER_ROOT_DIR", "/mnt/kv")
    monkeypatch.setenv("MP_TIER_FILE_MODE", "group")
    assert TierConfig.from_env() == TierConfig(root_dir="/mnt/kv", file_mode="group")


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("MP_TIER_N_READ_WORKERS", "four", "n_read_workers = 'four': expected an integer >= 1 and <= 256"),
        ("MP_TIER_N_WRITE_WORKERS", "0", "n_write_workers = 0: expected an integer >= 1 and <= 256"),
        ("MP_TIER_N_WRITE_WORKERS", "0x10", "n_write_workers = '0x10': expected an integer >= 1 and <= 256"),
        ("MP_TIER_MAX_BYTES", "1e9", "max_bytes = '1e9': expected an integer >= 0 and <= 9223372036854775807"),
        ("MP_TIER_STOP_TIMEOUT", "inf", "stop_timeout = inf: expected a number > 0 and <= 86400"),
        ("MP_TIER_STOP_TIMEOUT", "nan", "stop_timeout = nan: expected a number > 0 and <= 86400"),
        ("MP_TIER_CHECKSUM", "", "checksum = '': expected true or false"),
        ("MP_TIER_O_DIRECT", "never", "o_direct = 'never': expected one of auto, on, off"),
        ("MP_TIER_STOP_TIMEOUT", "soon", "stop_timeout = 'soon': expected a number > 0 and <= 86400"),
    ],
)
def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str) -> None:
    monkeypatch.setenv(var, value)
    for load in (TierConfig.from_env, lambda: TierConfig.from_toml(CONFIGS / "default.toml")):
        with pytest.raises(ConfigError) as info:
            load()
        assert str(info.value) == f"env {var}: {expected}"


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_env_bool_words(monkeypatch: pytest.MonkeyPatch, text: str, value: bool) -> None:
    monkeypatch.setenv("MP_TIER_CHECKSUM", text)
    assert TierConfig.from_env().checksum is value


def test_env_bool_bad_word(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TIER_CHECKSUM", "maybe")
    with pytest.raises(ConfigError, match=r"^env MP_TIER_CHECKSUM: checksum = 'maybe': expected true or false$"):
        TierConfig.from_env()


def test_toml_bool_field(tmp_path: Path) -> None:
    assert TierConfig.from_toml(write(tmp_path, "checksum = true\n")).checksum is True
    message = load_error(write(tmp_path, 'checksum = "yes"\n'))
    assert message.endswith("checksum = 'yes': expected true or false")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MP_TIER_")}
    command = [sys.executable, "-m", "mp_tier", *args]
    return subprocess.run(command, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=30)


def test_cli_show_file_with_env_override() -> None:
    result = run_cli("config", "show", str(CONFIGS / "nvme.toml"), env={"MP_TIER_N_WRITE_WORKERS": "2"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" = ")[0] for line in lines] == FIELDS
    assert {'o_direct = "on"', "n_read_workers = 8", "n_write_workers = 2"} <= set(lines)


def test_cli_show_defaults_is_loadable_toml(tmp_path: Path) -> None:
    result = run_cli("config", "show")
    assert result.returncode == 0, result.stderr
    assert TierConfig.from_toml(write(tmp_path, result.stdout)) == TierConfig()


def test_cli_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "n_read_workers = 0\n")
    result = run_cli("config", "show", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"{path}: n_read_workers = 0: expected an integer >= 1 and <= 256\n"


def test_cli_bad_env_exits_2() -> None:
    result = run_cli("config", "show", env={"MP_TIER_O_DIRECT": "sometimes"})
    assert result.returncode == 2
    assert result.stderr == "env MP_TIER_O_DIRECT: o_direct = 'sometimes': expected one of auto, on, off\n"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("checksum", "no", "checksum = 'no': expected true or false"),
        ("events", "false", "events = 'false': expected true or false"),
        ("stop_timeout", True, "stop_timeout = True: expected a number > 0 and <= 86400"),
        ("stop_timeout", float("inf"), "stop_timeout = inf: expected a number > 0 and <= 86400"),
        ("root_dir", 5, "root_dir = 5: expected a string"),
        ("n_read_workers", 10**22, "n_read_workers = 10000000000000000000000: expected an integer >= 1 and <= 256"),
        ("max_bytes", 2**70, "max_bytes = 1180591620717411303424: expected an integer >= 0 and <= 9223372036854775807"),
        ("engine", "fork", "engine = 'fork': expected one of processes, threads"),
    ],
)
def test_constructor_checks_types_as_strictly_as_files(field: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        TierConfig(**{field: value})
    assert str(info.value) == expected


def test_env_numbers_with_spaces_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TIER_N_READ_WORKERS", " 3 ")
    monkeypatch.setenv("MP_TIER_TASK_TIMEOUT", "0")
    config = TierConfig.from_env()
    assert (config.n_read_workers, config.task_timeout) == (3, 0.0)


def test_env_lists_of_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TIER_WORKER_CPUS", "0, 1")
    assert TierConfig.from_env().worker_cpus == [0, 1]
    monkeypatch.setenv("MP_TIER_WORKER_CPUS", "0,x")
    with pytest.raises(ConfigError, match=r"worker_cpus = \[0, 'x'\]: expected a list of integers >= 0 and <= 4095"):
        TierConfig.from_env()


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("MP_TIER_N_READ_WORKERS", "²", "n_read_workers = '²': expected an integer >= 1 and <= 256"),
        ("MP_TIER_N_READ_WORKERS", "--5", "n_read_workers = '--5': expected an integer >= 1 and <= 256"),
        ("MP_TIER_N_READ_WORKERS", "+-3", "n_read_workers = '+-3': expected an integer >= 1 and <= 256"),
        ("MP_TIER_N_READ_WORKERS", "٣", "n_read_workers = '٣': expected an integer >= 1 and <= 256"),
        ("MP_TIER_WORKER_CPUS", "0,²", "worker_cpus = [0, '²']: expected a list of integers >= 0 and <= 4095"),
        ("MP_TIER_WORKER_CPUS", "--1", "worker_cpus = ['--1']: expected a list of integers >= 0 and <= 4095"),
        ("MP_TIER_WORKER_CPUS", "٠", "worker_cpus = ['٠']: expected a list of integers >= 0 and <= 4095"),
        ("MP_TIER_STOP_TIMEOUT", "٣", "stop_timeout = '٣': expected a number > 0 and <= 86400"),
        ("MP_TIER_STOP_TIMEOUT", "1_0", "stop_timeout = '1_0': expected a number > 0 and <= 86400"),
        ("MP_TIER_MAX_BYTES", "9" * 5000, f"max_bytes = '{'9' * 5000}': expected an integer >= 0 and <= 9223372036854775807"),
    ],
)
def test_env_numbers_are_ascii_digits_only(monkeypatch: pytest.MonkeyPatch, var: str, text: str, expected: str) -> None:
    """Python's int() and float() read other scripts' digits and underscores; a setting takes 0-9 only."""
    monkeypatch.setenv(var, text)
    with pytest.raises(ConfigError) as info:
        TierConfig.from_env()
    assert str(info.value) == f"env {var}: {expected}"


def test_cli_bad_env_number_exits_2_with_one_line() -> None:
    result = run_cli("config", "show", env={"MP_TIER_N_READ_WORKERS": "--5"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "env MP_TIER_N_READ_WORKERS: n_read_workers = '--5': expected an integer >= 1 and <= 256\n"


def test_misspelt_env_variable_is_named_with_the_closest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TIER_N_READ_WORKER", "16")
    with pytest.raises(ConfigError) as info:
        TierConfig.from_env()
    assert str(info.value) == "env MP_TIER_N_READ_WORKER: not a setting; did you mean MP_TIER_N_READ_WORKERS?"
    monkeypatch.setenv("MP_TIER_N_READ_WORKER", "16")
    monkeypatch.setenv("MP_TIER_ZZZ", "1")
    with pytest.raises(ConfigError, match=r"^env MP_TIER_N_READ_WORKER: "):  # the first, by name
        TierConfig.from_env()
    monkeypatch.delenv("MP_TIER_N_READ_WORKER")
    with pytest.raises(ConfigError, match=r"^env MP_TIER_ZZZ: not a setting; the settings are MP_TIER_ROOT_DIR, "):
        TierConfig.from_env()


def test_cli_misspelt_env_variable_exits_2_and_prints_no_settings() -> None:
    result = run_cli("config", "show", env={"MP_TIER_N_READ_WORKER": "16"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "env MP_TIER_N_READ_WORKER: not a setting; did you mean MP_TIER_N_READ_WORKERS?\n"


def test_the_projects_own_variables_that_are_not_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MP_TIER_TEST_PAUSE", "MP_TIER_GLUSTERFS"):
        monkeypatch.setenv(var, "x")
    assert TierConfig.from_env() == TierConfig()


def test_cli_show_of_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "tier.toml"
    os.mkfifo(fifo)
    result = run_cli("config", "show", str(fifo))  # run_cli's timeout fails the test if it blocks
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{fifo}: cannot read: not a regular file (a FIFO)\n"


def test_a_file_that_is_not_utf8_gives_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "tier.toml"
    path.write_bytes(b"n_read_workers = 4\n\xff\n")
    assert load_error(path) == f"{path}: invalid TOML: not UTF-8 (invalid start byte at byte 19)"


def test_settings_under_an_engines_names_are_checked_under_the_key_the_user_wrote():
    aliases = {"n_read_threads": "n_read_workers"}
    config = with_settings(TierConfig(), {"n_read_threads": 3, "checksum": True}, aliases, "t", "the engine's")
    assert (config.n_read_workers, config.checksum) == (3, True)
    with pytest.raises(ConfigError, match=r"^n_read_threads = 0: expected an integer >= 1"):
        with_settings(TierConfig(), {"n_read_threads": 0}, aliases, "t", "the engine's")
    with pytest.raises(TypeError, match=r"^n_read_threads and n_read_workers name one setting: give one$"):
        with_settings(TierConfig(), {"n_read_threads": 2, "n_read_workers": 2}, aliases, "t", "the engine's")
    with pytest.raises(TypeError, match=r"^unknown settings for 't': bogus \(neither the engine's nor TierConfig's\)$"):
        with_settings(TierConfig(), {"bogus": 1}, aliases, "t", "the engine's")


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (16, 8), (64, 8)])
def test_worker_counts_are_half_the_cpus_left_to_the_workers(monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int) -> None:
    """The workers keep off the scheduler's CPU: on 2 vCPUs one process of each kind, not two sharing one CPU."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    config = TierConfig()
    assert (config.n_read_workers, config.n_write_workers) == (workers, workers)


def test_worker_counts_follow_the_threads_own_affinity() -> None:
    """Sized from the CPUs this thread may use, read when the config is made."""
    seen: list[int] = []

    def on_one_cpu() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        seen.append(TierConfig().n_read_workers)

    thread = threading.Thread(target=on_one_cpu)
    thread.start()
    thread.join()
    assert seen == [1]
