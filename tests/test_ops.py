"""The operator commands (``mp-tier du``, ``verify``, ``clean``) on real trees: blocks a real tier wrote,
files planted beside them, temp files of live and dead writer processes, and hostile trees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BLOCK, fill_random, make_keys, run_job

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
    tier = FileSystemTierManager(primary_kv_view=cache, root_dir=str(tmp_path / "root"), n_read_workers=1, n_write_workers=1, config=TierConfig(checksum=True))
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
    root, tier, keys = stored
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
    root, tier, keys = stored
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


def test_verify_exit_status_two_on_a_usage_error(tmp_path, capsys):
    status, out, err = mp_tier(capsys, "verify", str(tmp_path / "missing"))
    assert status == 2 and out == "" and err.count("\n") == 1 and "ENOENT" in err
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tmp_path), "--frobnicate"])
    assert e.value.code == 2
