"""The operator commands (``mp-tier du``, ``verify``, ``clean``) on real trees: blocks a real tier wrote,
files planted beside them, temp files of live and dead writer processes, and hostile trees."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BLOCK, fill_random, make_keys, mounted, run_job
from test_security import NOBODY, as_user

from mp_tier import FileSystemTierManager, JobMetadata, PrimaryCache, TierConfig
from mp_tier.__main__ import main

WRITER = "import sys; from mp_tier.layout import temp_name; print(temp_name(sys.argv[1]), flush=True); sys.stdin.read()"


def mp_tier(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``mp-tier ARGV`` in this process: its status, stdout and stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def as_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    status, out, err = mp_tier(capsys, *argv, "--json")
    assert status in (0, 1), err
    return json.loads(out)


@pytest.fixture
def stored(tmp_path: Path, cache: PrimaryCache) -> tuple[Path, FileSystemTierManager, list[bytes]]:
    """A tier with checksums on that stored 6 blocks of group 0 and 2 of group 1 under tmp_path/root."""
    keys = make_keys(6) + make_keys(2, seed=1, group=1)
    fill_random(cache, range(len(keys)))
    config = TierConfig(checksum=True)
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "root"), n_read_workers=1, n_write_workers=1, config=config)
    try:
        assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=list(range(len(keys))))).success
        yield tmp_path / "root", tier, keys
    finally:
        tier.shutdown()


class Writer:
    """A real process whose pid names a temp file, as a store in progress does: alive until ended."""

    def __init__(self, directory: Path, block_name: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, block_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.path = directory / self.proc.stdout.readline().strip()
        self.path.write_bytes(b"partial")

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    made: list[Writer] = []
    yield made
    for w in made:
        if w.proc.poll() is None:
            w.end()
        w.path.unlink(missing_ok=True)


def leaf_of(root: Path) -> Path:
    """A leaf directory of the layout holding a block."""
    return next(root.glob("*/*/*/*.bin")).parent


def test_du_counts_what_the_tier_wrote_and_every_odd_file_beside_it(stored, writers, capsys):
    root, _, _ = stored
    leaf = leaf_of(root)
    live, dead = Writer(leaf, "a.bin"), Writer(leaf, "b.bin")
    writers += [live, dead]
    dead.end()
    (leaf / "notes.txt").write_text("not a block")
    (leaf / ("a" * 64 + ".bin")).symlink_to("/etc/passwd")  # a block-like name on a symlink, in another leaf
    os.mkfifo(leaf / "pipe")
    (leaf / os.fsdecode(b"caf\xe9.bin")).write_bytes(b"x")  # not UTF-8
    report = as_json(capsys, "du", str(root))
    [ns] = report["namespaces"]
    assert ns["run"]["block_bytes"] == BLOCK and ns["rank"] == 0
    assert ns["blocks"] == 8 and ns["bytes"] == 8 * BLOCK
    assert ns["groups"] == {"0": [6, 6 * BLOCK], "1": [2, 2 * BLOCK]}
    assert ns["oldest"] <= ns["newest"]
    assert (ns["live_temps"], ns["stale_temps"]) == (1, 1)
    assert ns["foreign"] == 4  # notes.txt, the misplaced symlink, the FIFO, the non-UTF-8 name
    assert report["total"]["blocks"] == 8
    status, out, err = mp_tier(capsys, "du", str(root))
    assert status == 0 and err == "" and "caf\\xe9.bin" in out and "total: 1 namespaces" in out


def test_du_reports_a_refused_block_file(stored, capsys):
    root, _, _ = stored
    block = next(root.glob("*/*/*/*.bin"))
    target = block.with_name(block.name + ".elsewhere")
    block.rename(target)
    block.symlink_to(target)
    fifo = sorted(root.glob("*/*/*/*.bin"))[-1]
    fifo.unlink()
    os.mkfifo(fifo)
    ns = as_json(capsys, "du", str(root))["namespaces"][0]
    assert ns["refused"] == 2 and sorted(name.rsplit("(")[1] for name in ns["examples"]["refused"]) == ["a FIFO)", "a symlink)"]
    assert ns["blocks"] == 6


def corrupt(root: Path) -> dict[str, Path]:
    """Damage three of the stored blocks, each a different way."""
    short, flipped, long = sorted(root.glob("*/*/*/*.bin"))[:3]
    short.write_bytes(short.read_bytes()[: BLOCK // 2])
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0xFF
    with open(flipped, "r+b") as f:  # in place: the CRC xattr stays
        f.write(data)
    with open(long, "ab") as f:
        f.write(b"extra")
    return {"short": short, "crc": flipped, "long": long}


def test_verify_reports_short_long_and_crc_damage_and_fix_removes_exactly_those(stored, capsys):
    root, tier, keys = stored
    assert mp_tier(capsys, "verify", str(root))[0] == 0
    damaged = corrupt(root)
    before = set(root.glob("*/*/*/*.bin"))
    report = as_json(capsys, "verify", str(root))
    found = {p["path"].rsplit("/", 1)[1]: p["problem"] for p in report["problems"]}
    assert found == {
        damaged["short"].name: f"EBADMSG: holds {BLOCK // 2} of {BLOCK} bytes",
        damaged["crc"].name: found[damaged["crc"].name],
        damaged["long"].name: f"EBADMSG: holds {BLOCK + 5} of {BLOCK} bytes",
    }
    assert "CRC32" in found[damaged["crc"].name]
    assert set(root.glob("*/*/*/*.bin")) == before, "verify without --fix changed nothing"
    status, out, _ = mp_tier(capsys, "verify", str(root), "--fix")
    assert status == 1 and "3 corrupt blocks removed" in out
    assert set(root.glob("*/*/*/*.bin")) == before - set(damaged.values())
    assert mp_tier(capsys, "verify", str(root))[0] == 0
    intact = [k for k in keys if Path(tier.block_path(k)) not in damaged.values()]
    assert len(intact) == len(keys) - 3
    assert run_job(tier, "load", JobMetadata(job_id=2, keys=intact, block_ids=list(range(100, 100 + len(intact))))).success


def test_verify_on_a_file_system_without_xattrs_finds_its_whole_blocks_good(tmp_path, cache, capsys):
    """No CRC can be recorded where user xattrs are unsupported (the tier refuses checksum = true there), so
    every block there loads unverified, as one stored without a CRC: verify reports none of them. Before, each
    whole block was a problem (ENOTSUP) and verify exited 1 on a tree every load of which succeeds."""
    with mounted("ramfs", tmp_path / "ram") as mount:  # no user xattrs (getxattr says ENOTSUP), so no CRC
        keys = make_keys(3, seed=2)
        fill_random(cache, range(3))
        tier = FileSystemTierManager(primary_kv_view=cache, root_dir=str(mount / "root"), n_read_workers=1, n_write_workers=1)
        try:
            assert run_job(tier, "store", JobMetadata(job_id=1, keys=keys, block_ids=[0, 1, 2])).success
            assert run_job(tier, "load", JobMetadata(job_id=2, keys=keys, block_ids=[10, 11, 12])).success
        finally:
            tier.shutdown()
        report = as_json(capsys, "verify", str(mount / "root"))
        assert report["problems"] == [] and report["blocks"] == 3, report


def test_verify_exit_status_two_on_a_usage_error(tmp_path, capsys):
    status, out, err = mp_tier(capsys, "verify", str(tmp_path / "missing"))
    assert status == 2 and out == "" and err.count("\n") == 1 and "ENOENT" in err
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tmp_path), "--frobnicate"])
    assert e.value.code == 2


OLD = 2 * 3600  # seconds: older than the sweep's grace (STALE_TEMP_SECONDS)


def age(path: Path, seconds: float) -> None:
    old = os.stat(path).st_mtime - seconds
    os.utime(path, (old, old))


def test_clean_removes_stale_temps_and_old_empty_dirs_never_a_live_writers_file(stored, writers, tmp_path, capsys):
    root, _, keys = stored
    leaf = leaf_of(root)
    ns = leaf.parent.parent
    live, dead = Writer(leaf, "a.bin"), Writer(leaf, "b.bin")
    writers += [live, dead]
    dead.end()
    old_empty, fresh_empty = ns / "fff" / "ff_g0", ns / "eee" / "ee_g0"
    for d in (old_empty, fresh_empty):
        d.mkdir(parents=True)
    age(old_empty, OLD)
    age(old_empty.parent, OLD)
    stranger = ns / "keep-me"  # not the layout's: never entered, never removed
    stranger.mkdir()
    age(stranger, OLD)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / dead.path.name).write_bytes(b"not under ROOT")
    (leaf / "aaa").symlink_to(outside)
    before = sorted(p for p in root.rglob("*"))
    status, out, _ = mp_tier(capsys, "clean", str(root), "--dry-run")
    assert status == 0 and f"would remove stale temp {ns.name}/{leaf.parent.name}/{leaf.name}/{dead.path.name}" in out
    assert "would remove empty directory" in out and sorted(root.rglob("*")) == before
    done = as_json(capsys, "clean", str(root))
    assert (done["stale_temps"], done["dirs"], done["evicted"]) == (1, 2, 0)
    assert not dead.path.exists() and not old_empty.exists() and not old_empty.parent.exists()
    assert live.path.exists() and fresh_empty.exists() and stranger.exists() and (outside / dead.path.name).exists()
    assert len(list(root.glob("*/*/*/*.bin"))) == len(keys)
    (outside / dead.path.name).unlink()


def test_clean_max_bytes_evicts_least_recently_used_blocks_first(stored, capsys):
    root, _, _ = stored
    by_age = sorted(root.glob("*/*/*/*.bin"))
    for i, path in enumerate(by_age):
        age(path, 1000 - i)  # the first is the least recently used
    done = as_json(capsys, "clean", str(root), "--max-bytes", str(3 * BLOCK))
    assert done["evicted"] == 5 and done["block_bytes_left"] == 3 * BLOCK
    assert sorted(root.glob("*/*/*/*.bin")) == by_age[5:]


def test_clean_beside_a_live_tier_that_keeps_storing(stored, writers, capsys):
    """Clean runs in a thread while the tier stores: every store succeeds, the newest blocks stay loadable,
    and the live writer's temp file survives; old planted blocks go to meet the budget."""
    root, tier, _ = stored
    leaf = leaf_of(root)
    live = Writer(leaf, "a.bin")
    writers.append(live)
    for key in make_keys(2000, seed=7):
        path = Path(tier.block_path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        age(path, OLD)
    result: list[int] = []
    cleaner = threading.Thread(target=lambda: result.append(main(["clean", str(root), "--max-bytes", str(16 * BLOCK)])))
    cleaner.start()
    job, during = 10, 0
    while cleaner.is_alive() or job == 10:
        cleaning = cleaner.is_alive()  # as the store begins: on a loaded host one store can outlast the clean
        fresh = make_keys(4, seed=job)
        assert run_job(tier, "store", JobMetadata(job_id=job, keys=fresh, block_ids=[0, 1, 2, 3])).success
        during += cleaning
        job += 1
    cleaner.join()
    capsys.readouterr()
    assert result == [0] and during >= 1 and live.path.exists()
    assert run_job(tier, "load", JobMetadata(job_id=job, keys=fresh, block_ids=[4, 5, 6, 7])).success
    assert sum(p.stat().st_size for p in root.glob("*/*/*/*.bin")) <= 16 * BLOCK + (job - 10) * 4 * BLOCK


ONE_POINT = (
    "import sys; from mp_tier.ops import tune; tune.SWEEP[:] = [('workers', (1,))]; "
    "from mp_tier.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.timeout(240)  # a real point: 7 tier and raw runs, each after an os.sync: 60-81 s on a loaded 2-core host
def test_tune_writes_a_preset_tierconfig_loads_with_the_table_and_leaves_nothing(tmp_path):
    """One point of a real sweep, in a process of its own (the raw loops' forkserver goes with it); the default
    sweep takes a minute or more, and the notes show one."""
    root, out = tmp_path / "cache", tmp_path / "preset.toml"
    root.mkdir()
    argv = ["tune", str(root), "--block-size", "64k", "--seconds", "0.2", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", ONE_POINT, *argv], capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stderr
    assert list(root.iterdir()) == [], "tune left something behind"
    config = TierConfig.from_toml(out)
    assert (config.n_read_workers, config.n_write_workers, config.o_direct) == (1, 1, "off")
    text = out.read_text()
    assert "# workers=1 o_direct=off" in text and "(raw)" in text and "busy/idle >= 0.9" in text
    assert "workers=1 o_direct=off" in done.stdout


def test_tune_refuses_bad_seconds_in_one_line(tmp_path, capsys):
    status, _, err = mp_tier(capsys, "tune", str(tmp_path), "--seconds", "0")
    assert status == 2 and err.count("\n") == 1 and "--seconds 0.0" in err and list(tmp_path.iterdir()) == []


COMMANDS = [["du"], ["verify"], ["clean"], ["clean", "--max-bytes", "1k"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
@pytest.mark.parametrize("kind", ["missing", "file", "symlink"])
def test_a_bad_root_is_one_line_and_exit_status_two(tmp_path, capsys, command, kind):
    target = tmp_path / "root"
    if kind == "file":
        target.write_text("not a directory")
    elif kind == "symlink":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    status, out, err = mp_tier(capsys, command[0], str(target), *command[1:])
    assert status == 2 and out == "" and err.count("\n") == 1 and str(target) in err
    assert {"missing": "ENOENT", "file": "not a directory", "symlink": "is a symlink"}[kind] in err


def hostile(root: Path, ns: Path, plant_chain) -> None:
    """A FIFO with a stale temp file's name, one at a block name, a 1,500-deep stranger's tree, names that
    are not UTF-8, and a namespace that is a symlink to a directory outside ROOT."""
    leaf = leaf_of(root)
    block = next(leaf.glob("*.bin"))
    os.mkfifo(leaf / (block.name + ".00000000.1.0.tmp"))  # another host's temp name: stale by age
    age(leaf / (block.name + ".00000000.1.0.tmp"), OLD)
    block.unlink()
    os.mkfifo(block)
    plant_chain(ns, 1500)
    plant_chain(leaf, 1500)
    (ns / os.fsdecode(b"\xff\xfe")).mkdir()
    (leaf / os.fsdecode(b"\xff.bin")).write_bytes(b"")
    (root / os.fsdecode(b"ns-\xff")).mkdir()



def test_hostile_trees_are_reported_and_skipped_never_a_traceback_nothing_outside_touched(stored, tmp_path, capsys, plant_chain):
    root, _, _ = stored
    ns = leaf_of(root).parent.parent
    outside = tmp_path / "outside"
    (outside / "000" / "00_g0").mkdir(parents=True)
    (outside / "config.json").write_text('{"block_bytes": 65536}')
    stale = outside / "000" / "00_g0" / ("0" * 64 + ".bin.00000000.1.0.tmp")
    stale.write_bytes(b"")
    age(stale, OLD)
    (root / "elsewhere").symlink_to(outside)
    hostile(root, ns, plant_chain)
    snapshot = sorted(os.walk(outside))
    for command in (["du"], ["verify"], ["verify", "--fix"], ["clean"], ["clean", "--max-bytes", "1k"], ["du", "--json"]):
        status, out, err = mp_tier(capsys, command[0], str(root), *command[1:])
        assert status == (1 if command[0] == "verify" else 0), (command, err)
        assert "Traceback" not in err and err == "", command
    ns_du = as_json(capsys, "du", str(root))
    [usage] = [u for u in ns_du["namespaces"] if u["run"]]
    assert usage["refused"] == 1 and usage["foreign"] >= 4  # the FIFOs, the chain, the non-UTF-8 names
    assert any("a FIFO" in e for e in usage["examples"]["refused"])
    assert sorted(os.walk(outside)) == snapshot and stale.exists(), "something outside ROOT was touched"
    assert os.path.exists(ns / "d") and (ns / os.fsdecode(b"\xff\xfe")).exists()
    fifo_temp = next(leaf_of(root).glob("*.00000000.1.0.tmp"))
    assert fifo_temp.is_fifo(), "clean removes only regular temp files"
    fifo_temp.unlink()
    stale.unlink()
    status, out, _ = mp_tier(capsys, "du", str(root))
    assert "namespace ns-\\xff: skipped: no config.json" in out and "namespace elsewhere: skipped: a symlink, never followed" in out



def quietly(argv: list[str]) -> tuple[int, str, str]:
    """``mp-tier ARGV`` with its output kept, for a forked child of another uid (capsys stays in the parent)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def test_a_root_another_user_owns_is_one_line_for_them(shared_tmp):
    root = shared_tmp / "root"
    root.mkdir(mode=0o700)

    def as_nobody() -> None:
        for command in (["du"], ["verify"], ["clean"]):
            status, out, err = quietly([command[0], str(root)])
            assert status == 2 and out == "" and err.count("\n") == 1 and "EACCES" in err, (command, err)

    as_user(NOBODY, [NOBODY], as_nobody)


def test_files_another_user_owns_are_reported_never_removed_nor_loaded(stored, capsys):
    """Run as root: a namespace another uid made, holding a stale temp file, is skipped whole; a block file
    of that uid inside the tier's namespace is refused by du, reported by verify and kept by --fix and clean."""
    root, _, _ = stored
    leaf = leaf_of(root)
    theirs = root / "theirs"
    planted_block = leaf / (leaf.parent.name + leaf.name[:2] + "f" * 59 + ".bin")
    stale = theirs / "abc" / "de_g0" / ("abcde" + "0" * 59 + ".bin.00000000.1.0.tmp")
    stale.parent.mkdir(parents=True)
    (theirs / "config.json").write_text(json.dumps({"block_bytes": BLOCK}))
    stale.write_bytes(b"")
    os.utime(stale, (1, 1))
    planted_block.write_bytes(bytes(BLOCK))
    for path in (planted_block, theirs, stale.parent.parent, stale.parent, stale, theirs / "config.json"):
        os.chown(path, NOBODY, NOBODY)
    usage = {u["namespace"]: u for u in as_json(capsys, "du", str(root))["namespaces"]}
    assert f"owned by uid {NOBODY}" in usage["theirs"]["skipped"]
    [ours] = [u for u in usage.values() if u["run"]]
    assert ours["refused"] == 1 and f"owned by uid {NOBODY}" in ours["examples"]["refused"][0]
    report = as_json(capsys, "verify", str(root), "--fix")
    assert [(p["problem"].split(":")[0], p["removed"]) for p in report["problems"]] == [("EPERM", False)]
    assert as_json(capsys, "clean", str(root), "--max-bytes", "1k")["stale_temps"] == 0
    assert planted_block.exists() and stale.exists()
    planted_block.unlink()
    stale.unlink()


def test_a_namespace_of_another_layout_version_is_skipped_whole(stored, capsys):
    """Its names may mean something else: du reports it, and clean and verify never enter it."""
    root, _, _ = stored
    other = root / "bs65536_r1"
    stale = other / "abc" / "de_g0" / ("abcde" + "0" * 59 + ".bin.00000000.1.0.tmp")
    stale.parent.mkdir(parents=True, mode=0o700)
    other.chmod(0o700)
    (other / "config.json").write_text(json.dumps({"block_bytes": BLOCK, "layout_version": 2}))
    stale.write_bytes(b"")
    os.utime(stale, (1, 1))
    usage = {u["namespace"]: u for u in as_json(capsys, "du", str(root))["namespaces"]}
    assert usage["bs65536_r1"]["skipped"] == "layout version 2: this mp_tier reads layout version 1 only"
    assert as_json(capsys, "clean", str(root))["stale_temps"] == 0 and stale.exists()
    stale.unlink()
