"""Atomic file and directory writes.

A crash (or Ctrl-C) must never leave a half-written file under its final name: every
writer here writes to a temporary name in the same directory and renames it into
place, which POSIX makes atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgeclf.errors import OutputExistsError


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, before any
    # threads (TensorFlow's, the decoder pool's) could create files meanwhile.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _give_default_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; final outputs get the
    permissions an ordinary ``open``/``mkdir`` would have given them."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


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
        raise OutputExistsError(f"output path exists and is a file, not a directory. Received: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            "output directory exists and is not empty; choose another directory or pass "
            f"--overwrite (overwrite=True) to replace it. Received: {out}"
        )
    return out


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in when the block succeeds.

    The existing directory (if ``overwrite``) is only removed after the new one is in
    place, so a failure leaves the old contents untouched and no partial output.
    """
    out = check_output_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
        _give_default_mode(stage, directory=True)
        if not out.exists():
            os.replace(stage, out)
            return
        # Two renames cannot be one atomic step: park the old directory beside the
        # new one, and put it back if the second rename fails.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old)
        try:
            os.replace(stage, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
