"""Atomic file and directory writes.

A crash (or Ctrl-C) must never leave a half-written file under its final name: every
writer here writes to a temporary name in the same directory and renames it into
place, which POSIX makes atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgeclf.errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; final outputs get the
    permissions an ordinary ``open``/``mkdir`` would have given them."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    For libraries that insist on writing the file themselves (``model.save``). The
    temporary name keeps ``suffix`` because some writers choose the format from it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            _give_default_mode(tmp_path, directory=False)
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (flushed to disk before the rename)."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_json(final: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``final`` atomically."""
    atomic_write_bytes(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output directory that exists and is not empty unless ``overwrite``.

    Raises:
        OutputExistsError: ``out`` is a non-empty directory (or a file) and
            ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path exists and is not a directory. Received: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory exists and is not empty: {out}. "
            "Choose another directory or pass --overwrite (overwrite=True) to replace it."
        )
    return out


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in when the block succeeds.

    The existing directory (if ``overwrite``) is only removed after the new one is
    complete, so a failure leaves the old contents untouched and no partial output.
    """
    out = check_output_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        _give_default_mode(stage, directory=True)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
