"""The error codes: every one the package names is listed with its meaning, and the docs show the list."""

from __future__ import annotations

import ast
import errno
import re
from pathlib import Path

from mp_tier.codes import CODES, MEANINGS
from mp_tier.errors import CapacityFull, Refused

PACKAGE = Path(__file__).resolve().parents[2] / "mp_tier"
DOCS = PACKAGE.parent / "docs" / "errors.md"
ERRNO_NAMES = set(errno.errorcode.values())
WORD = re.compile(r"\bE[A-Z0-9]{2,}\b")


def errno_names_in_strings(path: Path) -> set[str]:
    """Every errno name in a string literal of ``path`` (f-strings' literal parts and docstrings included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(w for w in WORD.findall(node.value) if w in ERRNO_NAMES)
    return found


def test_every_code_named_in_the_package_is_listed():
    named = {(w, str(p.relative_to(PACKAGE))) for p in PACKAGE.rglob("*.py") for w in errno_names_in_strings(p)}
    assert {"ENOTRECOVERABLE", "EAGAIN", "EOWNERDEAD"} <= {w for w, _ in named}, "the scan sees the package's codes"
    assert sorted((w, where) for w, where in named if w not in CODES) == []


def test_every_listed_code_is_an_errno_name_with_one_line_of_meaning():
    assert set(MEANINGS) == set(CODES) and len(CODES) == len(set(CODES))
    assert sorted(set(CODES) - ERRNO_NAMES) == []
    assert all(meaning and "\n" not in meaning for meaning in MEANINGS.values())


def test_the_docs_list_every_code_with_its_meaning():
    text = DOCS.read_text()
    rows = dict(re.findall(r"^\| `(E[A-Z0-9]+)` \| (.+) \|$", text, re.M))
    assert rows == MEANINGS, "docs/errors.md's code table is generated from mp_tier.codes: update it"


def test_a_refusal_builds_its_message_from_its_code():
    assert str(Refused("EBUSY", "block ab is being evicted")) == "EBUSY: block ab is being evicted"
    full = CapacityFull("4 more blocks exceed max_bytes")
    assert (full.code, str(full)) == ("ENOSPC", "ENOSPC: 4 more blocks exceed max_bytes")
