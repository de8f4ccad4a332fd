"""Atomic writes: a failure never leaves a partial output or loses the old one."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from edgeclf.errors import OutputExistsError, StorageError
from edgeclf.fsio import atomic_path, atomic_write_bytes, atomic_write_json, staged_directory


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_json_and_mode(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    # What open() would have made (0666 less the umask), not mkstemp's private 0600.
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
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
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # as mkdir makes it, not mkdtemp's 0700


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_staged_directory_cleans_up_after_a_killed_run(tmp_path):
    """``train --overwrite`` killed mid-way left its stage (and, between its two renames,
    the parked old bundle): the next run removes the one and puts the other back."""
    dead = _dead_pid()
    stale = tmp_path / f".bundle.{dead}.abc123.tmp"
    (stale / "half").mkdir(parents=True)
    parked = tmp_path / f".other.{dead}.def456.old"
    parked.mkdir()
    (parked / "bundle.json").write_text("{}")
    live = tmp_path / f".bundle.{os.getpid()}.ghi789.tmp"
    live.mkdir()
    with staged_directory(tmp_path / "bundle") as stage:
        (stage / "a").write_text("a")
    assert not stale.exists() and live.is_dir()
    assert (tmp_path / "other" / "bundle.json").read_text() == "{}" and not parked.exists()


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_is_one_storage_error_naming_path_and_space(small_disk):
    target = small_disk / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"x" * (1 << 20))
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "no space left on the device" in message
    assert "1.0 MiB needed" in message and "free there" in message
    assert target.read_bytes() == b"old" and sorted(p.name for p in small_disk.iterdir()) == ["model.bin"]
    with pytest.raises(StorageError, match="no space left"):
        with staged_directory(small_disk / "bundle") as stage:
            (stage / "big").write_bytes(b"x" * (1 << 20))
    assert sorted(p.name for p in small_disk.iterdir()) == ["model.bin"]


def test_a_read_only_file_system_is_a_storage_error(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(StorageError, match=f"cannot write {small_disk / 'x'}: read-only file system"):
        atomic_write_bytes(small_disk / "x", b"x")
