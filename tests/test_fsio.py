"""Atomic writes: a failure never leaves a partial output or loses the old one."""

from __future__ import annotations

import json
import stat

import pytest

from edgeclf.errors import OutputExistsError
from edgeclf.fsio import atomic_path, atomic_write_json, staged_directory


def test_atomic_write_json_and_mode(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable by others, unlike mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_staged_directory_refuses_non_empty_without_overwrite(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with staged_directory(out):
            pass
    assert (out / "keep").read_text() == "x"


def test_staged_directory_replaces_on_success_only(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(out, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")
            raise RuntimeError("crash before the bundle is complete")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with staged_directory(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no leftovers


def test_staged_directory_into_empty_existing_directory(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    with staged_directory(out) as stage:
        (stage / "a").write_text("a")
    assert (out / "a").read_text() == "a"
    assert stat.S_IMODE(out.stat().st_mode) & 0o055
