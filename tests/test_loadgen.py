"""Smoke tests of the load generator through its installed entry points.

Every workload runs on tiny sizes, the JSON keeps its schema, roots are
guarded; the runs go through ``python -m mp_tier bench``, the ``mp-tier``
console script (the README's main command) alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from helpers import mounted, small_ext4

from mp_tier.bench.report import SCHEMA
from mp_tier.bench.root_dir import MARKER, fs_type
from mp_tier.shared_cache import SEGMENT_PREFIX

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, "-m", "mp_tier", "bench"]
MP_TIER = Path(sysconfig.get_path("scripts")) / "mp-tier"  # the console script pip installs
MAIN = [str(MP_TIER), "bench"]  # the README's main command
ENTRIES = {"python -m mp_tier bench": BENCH, "mp-tier bench": MAIN}

# Tiny and quick: 64 KiB blocks, 2 MiB per phase, one worker of each kind.
TINY = ["--block-size", "64k", "--total", "2m", "--workers", "1", "--inflight", "2", "--idle-seconds", "0.05", "--no-progress"]

# The documented JSON schema (docstring of mp_tier.bench.report): changing it means bumping "schema".
TOP_KEYS = {"schema", "args", "platform", "runs", "ratios"}
RUN_KEYS = {
    "workload", "phase", "engine", "sweep", "block_bytes", "blocks_per_job", "read_workers", "write_workers",
    "inflight", "direct", "wall_s", "bytes", "blocks", "gbps", "blocks_per_s", "job_ms", "submit_us", "poll_us",
    "host_cpu_s_per_gb", "worker_cpu_s_per_gb", "busy_idle", "idle_loop_rate", "store", "load", "idle_load_ms",
    "trace", "cache_drop", "round", "errors",
}  # fmt: skip
DIST_KEYS = {"n", "p50", "p99", "max", "mean"}
OP_KEYS = {"jobs", "blocks", "bytes", "failed_jobs", "job_ms", "submit_us"}
RATIO_KEYS = {"sweep", "round", "workload", "phase", "versus", "gbps", "busy_idle", "job_p99", "host_cpu_per_gb"}


def run_loadgen(*args: str, entry: list[str] = BENCH, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the tool as a user would; check afterwards that it left no shared-memory segment behind."""
    proc = subprocess.Popen([*entry, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    leaked = [n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{proc.pid}_")]
    assert leaked == [], f"loadgen leaked shared memory: {leaked}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_json(tmp_path: Path, *args: str, entry: list[str] = BENCH) -> dict:
    out = tmp_path / "out.json"
    root = tmp_path / "root"
    done = run_loadgen(*TINY, "--root", str(root), "--json", str(out), *args, entry=entry)
    assert done.returncode == 0, done.stderr
    assert not root.exists(), "loadgen left its files behind without --keep"
    return json.loads(out.read_text())


# A host spinning in pure Python starves the thread engine's workers of the GIL (a
# block can take a second): that is what the tool measures, but not in a smoke test.
THREADS_UNSTARVED = ["--spin-us", "0"]


def test_store_compared_with_threads_and_raw_writes_the_documented_json(tmp_path):
    doc = run_json(tmp_path, "--workload", "store", "--compare", "threads,raw", *THREADS_UNSTARVED)
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == SCHEMA == "mp_tier.loadgen/1"
    assert doc["args"]["block_size"] == 64 << 10 and doc["args"]["workers"] == [1, 1]
    assert {run["engine"] for run in doc["runs"]} == {"processes", "threads", "raw"}
    for run in doc["runs"]:
        assert set(run) == RUN_KEYS
        assert run["bytes"] == 2 << 20 and run["gbps"] > 0 and run["errors"] == []
    tier_run = next(run for run in doc["runs"] if run["engine"] == "processes")
    assert set(tier_run["store"]) == OP_KEYS and set(tier_run["job_ms"]) == DIST_KEYS
    assert tier_run["store"]["jobs"] == 2 and tier_run["worker_cpu_s_per_gb"] is not None
    threads_run = next(run for run in doc["runs"] if run["engine"] == "threads")
    assert threads_run["worker_cpu_s_per_gb"] is None  # the workers are threads of the host
    assert {(q["versus"], q["workload"]) for q in doc["ratios"]} == {("threads", "store"), ("raw", "store")}
    assert all(set(q) == RATIO_KEYS for q in doc["ratios"])


def test_load_runs_cold_with_the_cache_dropped_then_warm(tmp_path):
    doc = run_json(tmp_path, "--workload", "load")
    assert [run["phase"] for run in doc["runs"]] == ["cold", "warm"]
    cold, warm = doc["runs"]
    assert cold["cache_drop"].startswith("fadvise") and warm["cache_drop"] is None
    assert cold["load"]["bytes"] == warm["load"]["bytes"] == 2 << 20
    assert cold["load"]["failed_jobs"] == 0


def test_mixed_measures_loads_under_a_flood_against_the_same_loads_alone(tmp_path):
    doc = run_json(tmp_path, "--workload", "mixed", "--load-gap-ms", "1", entry=ENTRIES["mp-tier bench"])
    flood, alone = doc["runs"]
    assert (flood["phase"], alone["phase"]) == ("flood", "idle-loads")
    assert flood["store"]["bytes"] == 2 << 20
    assert flood["load"]["jobs"] >= 1 and alone["load"]["jobs"] == flood["load"]["jobs"]
    assert flood["idle_load_ms"] == alone["load"]["job_ms"]


def test_trace_reports_prefix_hits(tmp_path):
    doc = run_json(tmp_path, "--workload", "trace", "--total", "4m", "--conversations", "2")
    (run,) = doc["runs"]
    trace = run["trace"]
    assert trace["requests"] > 0 and trace["prompt_blocks"] > 0
    assert trace["hit_blocks"] > 0, "two conversations must come back to a stored prefix"
    assert trace["hit_rate"] == pytest.approx(trace["hit_blocks"] / trace["prompt_blocks"])


def test_prints_a_table_and_ratios(tmp_path):
    done = run_loadgen(
        *TINY, "--workload", "store", "--compare", "threads", "--root", str(tmp_path / "r"), *THREADS_UNSTARVED, entry=MAIN
    )
    assert done.returncode == 0, done.stderr
    assert "busy/idle" in done.stdout and "processes/threads store fresh" in done.stdout


def test_refuses_a_root_holding_foreign_files(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "precious.txt").write_text("not loadgen's")
    done = run_loadgen(*TINY, "--root", str(root), entry=MAIN)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "refusing --root" in done.stderr and "precious.txt" in done.stderr
    assert os.listdir(root) == ["precious.txt"]


def test_keep_leaves_files_that_a_later_run_accepts(tmp_path):
    root = tmp_path / "kept"
    first = run_loadgen(*TINY, "--workload", "store", "--root", str(root), "--keep", entry=MAIN)
    assert first.returncode == 0, first.stderr
    (run_dir,) = root.iterdir()
    assert (run_dir / MARKER).is_file() and any(p.suffix == ".bin" for p in run_dir.rglob("*"))
    second = run_loadgen(*TINY, "--workload", "store", "--root", str(root))
    assert second.returncode == 0, second.stderr
    assert list(root.iterdir()) == [run_dir], "the second run removes only its own files"


def test_sweep_draws_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    done = run_loadgen(*TINY, "--workload", "store", "--sweep", "workers=1,2+1", "--plot", str(png), "--root", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[workers=2+1]" in done.stdout


@pytest.mark.parametrize("entry", ENTRIES)
def test_plot_without_matplotlib_says_which_extra_to_install(tmp_path, entry):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    done = subprocess.run(
        [*ENTRIES[entry], "--sweep", "workers=1,2", "--plot", str(tmp_path / "x.png")],
        cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--plot needs matplotlib: pip install -e '.[plot]'" in done.stderr


@pytest.mark.parametrize("entry", ENTRIES)
def test_plot_without_sweep_is_a_usage_error(tmp_path, entry):
    done = run_loadgen("--plot", str(tmp_path / "x.png"), entry=ENTRIES[entry])
    assert done.returncode == 2 and "--plot needs --sweep" in done.stderr


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_offers_the_same_options(entry):
    done = subprocess.run([*ENTRIES[entry], "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {entry} ")
    for option in ("--workload", "--compare", "--sweep", "--json", "--root", "--keep", "--no-progress"):
        assert option in done.stdout


WORKER_COUNT = "(expected N or R+W, e.g. 2 or 3+1, each an integer >= 1 and <= 256)"
BLOCK_SIZE = "not a multiple of 4096 bytes (e.g. 64k, 256k, 2m)"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "300", f"not a worker count: '300' {WORKER_COUNT}"),
        ("--workers", "2+257", f"not a worker count: '2+257' {WORKER_COUNT}"),
        ("--workers", "²", f"not a worker count: '²' {WORKER_COUNT}"),
        ("--sweep", "workers=1,300", f"not a worker count: '300' {WORKER_COUNT}"),
        ("--seconds", "-1", "expected a number of seconds > 0, got '-1'"),
        ("--seconds", "0", "expected a number of seconds > 0, got '0'"),
        ("--seconds", "nan", "expected a number of seconds > 0, got 'nan'"),
        ("--spin-us", "-1", "expected a whole number >= 0, got '-1'"),
        ("--block-size", "3", f"not a block size: '3' is 3 bytes, {BLOCK_SIZE}"),
        ("--block-size", "6000", f"not a block size: '6000' is 6000 bytes, {BLOCK_SIZE}"),
        ("--sweep", "block_size=64k,3", f"not a block size: '3' is 3 bytes, {BLOCK_SIZE}"),
        ("--idle-seconds", "-1", "expected a number >= 0, got '-1'"),
        ("--load-gap-ms", "inf", "expected a number >= 0, got 'inf'"),
        ("--zipf", "nan", "expected a number >= 0, got 'nan'"),
    ],
)
def test_a_bad_option_is_a_usage_error_naming_the_value_that_changes_nothing(tmp_path, option, value, message):
    root = tmp_path / "root"
    done = run_loadgen(*TINY, "--seconds", "1", option, value, "--root", str(root))  # tiny, should it run after all
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"python -m mp_tier bench: error: argument {option}: {message}"
    assert done.stdout == "" and not root.exists()


def test_console_script_keeps_config_show_and_its_exit_status(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MP_TIER_")}
    shown = subprocess.run([str(MP_TIER), "config", "show"], env=clean, check=False, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "n_read_workers = " in shown.stdout, shown.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("n_read_workers = 0\n")
    refused = subprocess.run([str(MP_TIER), "config", "show", str(bad)], env=clean, check=False, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == f"{bad}: n_read_workers = 0: expected an integer >= 1 and <= 256\n"


def test_importing_mp_tier_leaves_the_bench_and_its_extras_out():
    code = "import sys, mp_tier; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tqdm', 'matplotlib') or m.startswith('mp_tier.bench')))"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_every_package_is_listed_for_setuptools():
    """A non-editable install ships only the packages pyproject.toml names: the bench must be one of them."""
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mp_tier").rglob("__init__.py"))
    assert "mp_tier.bench" in found and sorted(listed) == found


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_run_stopped_by_a_signal_removes_what_it_wrote(tmp_path, stop, status):
    """Ctrl-C, or SIGTERM from a job runner, `timeout` or `kill`, ends a run through its clean-ups: its block
    files, its run directory and its shared memory go with it."""
    root = tmp_path / "root"
    args = ["--block-size", "64k", "--total", "1g", "--seconds", "60", "--workers", "1", "--idle-seconds", "0.05"]
    # Ctrl-C reaches a run started from a terminal, with SIGINT at its default. Tests started in the background
    # (nohup, or `&` in a script) ignore SIGINT, and the run would too (an ignored signal stays ignored across
    # exec, and Python then raises no KeyboardInterrupt): a handler here is the default in the run.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([*MAIN, *args, "--no-progress", "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 30
        while not any(root.glob("loadgen-*/**/*.bin")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run wrote no block"
            time.sleep(0.01)
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert "interrupted" in err
    assert not root.exists()
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"{SEGMENT_PREFIX}{proc.pid}_")] == []


@pytest.mark.parametrize("journal, label", [(True, "ext4"), (False, "ext4, no journal")])
def test_the_header_says_whether_an_ext4_root_has_a_journal(tmp_path, journal, label):
    """Without one, a store after many deletions costs up to ten times the CPU: a reader of the figures must know."""
    with small_ext4(tmp_path, 8, *([] if journal else ["-O", "^has_journal"])) as (_, target):
        done = subprocess.run([*BENCH, "--root", str(target / "run"), *TINY, "--workload", "store"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"({label})," in done.stdout.splitlines()[0]


def test_a_mount_point_with_a_space_is_read_as_its_own_file_system(tmp_path):
    """/proc/self/mountinfo writes a space in a mount point as \\040: read raw, the path matched the mount above it."""
    with mounted("tmpfs", tmp_path / "my cache", "size=1m") as target:
        assert fs_type(str(target / "inside")) == "tmpfs"
