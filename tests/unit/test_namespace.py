"""The namespace directory's name and config.json, on real files: the run and the layout version it records."""

from __future__ import annotations

import json
import os

import pytest

from mp_tier.layout import CONFIG_FILE, LAYOUT_VERSION, VERSION_KEY, namespace_name
from mp_tier.namespace import describe_run, owners_for, prepare_namespace

MODES = (0o600, 0o700)
RUN = {"block_bytes": 65536}
NAME = namespace_name(RUN, 0)


def prepare(root, run=RUN):
    layout, fd = prepare_namespace(str(root), NAME, run, MODES, owners_for(False))
    os.close(fd)
    return layout


def test_the_name_says_what_a_block_depends_on_and_the_rank():
    assert NAME == "bs65536_r0"
    spec_run = {"model": "meta-llama-Llama-3.1-8B", "dtype": "bfloat16", "tp": 2, "pp": 1, "block_bytes": 2097152}
    assert namespace_name(spec_run, 1) == "meta-llama-Llama-3.1-8B_bfloat16_tp2_pp1_bs2097152_r1"
    assert describe_run(65536) == (RUN, 0)


def test_config_json_records_the_run_and_the_layout_version(tmp_path):
    layout = prepare(tmp_path)
    assert layout.base == str(tmp_path / NAME)
    with open(os.path.join(layout.base, CONFIG_FILE)) as f:
        assert json.load(f) == {**RUN, VERSION_KEY: LAYOUT_VERSION}
    prepare(tmp_path)  # and reads it back


def test_a_config_json_from_before_layout_versions_is_the_first(tmp_path):
    os.mkdir(tmp_path / NAME, 0o700)
    (tmp_path / NAME / CONFIG_FILE).write_text(json.dumps(RUN))
    assert LAYOUT_VERSION == 1
    prepare(tmp_path)


@pytest.mark.parametrize("version", [LAYOUT_VERSION + 1, 0, "1", None])
def test_an_unknown_layout_version_is_refused_naming_both(tmp_path, version):
    os.mkdir(tmp_path / NAME, 0o700)
    (tmp_path / NAME / CONFIG_FILE).write_text(json.dumps({**RUN, VERSION_KEY: version}))
    message = f"{CONFIG_FILE} records layout version {version!r}, and this mp_tier reads layout version {LAYOUT_VERSION} only"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(tmp_path)


def test_another_run_is_refused(tmp_path):
    prepare(tmp_path)
    with pytest.raises(ValueError, match="describes another run"):
        prepare(tmp_path, {"block_bytes": 4096})
