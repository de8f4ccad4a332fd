"""Atomic file and directory writes.

A crash (or Ctrl-C) must never leave a half-written file under its final name: every
writer here writes to a temporary name in the same directory and renames it into
place, which POSIX makes atomic within one filesystem.

Temporary names carry the writer's process id (``.NAME.PID.RANDOM.tmp``), so a later run
can tell what a killed writer left behind from what a live one is still writing, and
:func:`remove_stale_temporaries` cleans up the former. A write that fails for lack of
space or permission raises :class:`~edgeclf.errors.StorageError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgeclf.errors import EdgeclfError, InvalidInputError, OutputExistsError, StorageError

#: OS errors of the storage itself (not of the caller's arguments): turned into StorageError.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EFBIG: "file too large for the file system", errno.EROFS: "read-only file system",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.EIO: "input/output error"}
#: ``.NAME.PID.RANDOM.tmp[.ext]`` or ``.NAME.PID.RANDOM.old``: see temp_prefix.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)(\..*)?$")


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


def temp_prefix(name: str) -> str:
    """The prefix of a temporary standing in for ``name``: hidden, with this process's id."""
    return f".{name}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that writers which died (SIGKILL, power loss) left in ``directory``.

    A ``.old`` directory whose final name is missing is the previous content parked by
    :func:`staged_directory` just before a crash: it is put back, not removed. Returns
    what was removed or restored. Temporaries of live processes are left alone.
    """
    directory = Path(directory)
    done: list[Path] = []
    if not directory.is_dir():
        return done
    for entry in directory.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or _process_alive(int(match["pid"])):
            continue
        final = directory / match["name"]
        with contextlib.suppress(OSError):
            if match["kind"] == "old" and not final.exists() and not final.is_symlink():
                os.replace(entry, final)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            done.append(entry)
    return done


def storage_error(exc: OSError, path: str | os.PathLike, needed: int | None = None) -> OSError:
    """``exc`` as a one-line StorageError naming ``path`` when the storage caused it, else ``exc``."""
    if isinstance(exc, EdgeclfError):
        return exc
    code = exc.errno
    if code not in _STORAGE_ERRNOS and "No space left on device" in str(exc):
        code = errno.ENOSPC  # h5py and TensorFlow put the errno only in their message
    if code not in _STORAGE_ERRNOS:
        return exc
    path = Path(path)
    what = f"cannot write {path}: {_STORAGE_ERRNOS[code]}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        probe = next((p for p in (path, *path.parents) if p.exists()), None)
        free = shutil.disk_usage(probe).free if probe is not None else None
        facts = [f"{_size(free)} free there"] if free is not None else []
        facts.append(f"{_size(needed)} needed" if needed is not None else "free some space and run again")
        what += f" ({'; '.join(facts)})"
    return StorageError(what)


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Raise a StorageError naming ``path`` when the block fails for lack of space or permission."""
    try:
        yield
    except OSError as exc:
        converted = storage_error(exc, path, needed)
        if converted is exc:
            raise
        raise converted from None


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    For libraries that insist on writing the file themselves (``model.save``). The
    temporary name keeps ``suffix`` because some writers choose the format from it.
    """
    final = Path(final)
    with storage_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(final.name), suffix=f".tmp{suffix}", dir=final.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with storage_errors(final):
            yield tmp_path
            if tmp_path.exists():
                _give_default_mode(tmp_path, directory=False)
            os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically (flushed to disk before the rename)."""
    with atomic_path(final) as tmp, storage_errors(final, needed=len(data)):
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_json(final: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``final`` atomically."""
    atomic_write_bytes(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output directory that exists and is not empty unless ``overwrite``, and one that
    cannot be replaced safely whatever ``overwrite`` says.

    Raises:
        InvalidInputError: ``out`` is empty (the working directory), the working directory or one
            holding it, or a symbolic link (the new directory would replace the link, after the work).
        OutputExistsError: ``out`` is a non-empty directory (or a file) and
            ``overwrite`` is false.
    """
    if str(out) == "":
        raise InvalidInputError("the output directory's name is empty, which would be the directory you are in; "
                                "name a directory. Received: ''")
    given, out = out, Path(out)
    if out.is_symlink():
        raise InvalidInputError(f"the output directory is a symbolic link (to {os.readlink(out)}); name the directory "
                                f"itself or a new one. Received: {given}")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise InvalidInputError(f"the output directory is the directory you are in, or holds it; writing there "
                                f"would replace it. Name another directory. Received: {given}")
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
    place, so a failure leaves the old contents untouched and no partial output. What an
    earlier, killed run left beside ``out`` is cleaned up first (an old directory it had
    parked is put back).
    """
    check_output_dir(out, overwrite)  # before anything beside it is touched
    out = Path(out).absolute()
    remove_stale_temporaries(out.parent)
    out = check_output_dir(out, overwrite)  # again: a killed run's directory may have been put back
    with storage_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        with storage_errors(out):
            yield stage
            _give_default_mode(stage, directory=True)
            if not out.exists():
                os.replace(stage, out)
                return
            # Two renames cannot be one atomic step: park the old directory beside the
            # new one, and put it back if the second rename fails (or at the next run,
            # if this process dies in between).
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".old", dir=out.parent))
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


@contextlib.contextmanager
def staging_directory(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A private working directory inside ``parent`` (same file system, so its files can be
    renamed into ``parent`` atomically), removed when the block ends, and by the next
    run's :func:`remove_stale_temporaries` if this process is killed."""
    with storage_errors(parent):
        stage = Path(tempfile.mkdtemp(prefix=temp_prefix(name), suffix=".tmp", dir=parent))
    try:
        with storage_errors(stage):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: The most values (objects, arrays and their items) edgeclf parses from one JSON text: a record
#: it writes holds a few thousand. A size cap alone does not bound what ``json.loads`` allocates:
#: 64 MiB of ``{},`` are 22 million dictionaries, 1.6 GB.
MAX_JSON_VALUES = 500_000


def parse_json(text: str | bytes, what: str, max_values: int = MAX_JSON_VALUES) -> Any:
    """The JSON in ``text``, refusing one that would make more than ``max_values`` values.

    Every array item and object member follows a comma or its container's opening bracket, so
    counting those characters (inside strings too: an over-count, never an under-count) bounds
    the items, and what the parse allocates (a member is a key and a value), before it starts.

    Raises:
        ValueError: too many values, not UTF-8, not JSON, or nested too deeply for the parser (a
            RecursionError otherwise); the message names ``what`` and says which.
    """
    marks = (b",", b"[", b"{") if isinstance(text, bytes) else (",", "[", "{")
    count = sum(text.count(mark) for mark in marks)
    if count > max_values:
        raise ValueError(f"{what} holds about {count:,} JSON values, over the {max_values:,} edgeclf reads: "
                         f"it is not a record edgeclf wrote")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} holds JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{what} is not valid JSON ({str(exc)[:200]})") from None


def read_json(path: str | os.PathLike, max_bytes: int, max_values: int = MAX_JSON_VALUES) -> Any:
    """The JSON in ``path``, refusing a file over ``max_bytes`` before reading it and one of more
    than ``max_values`` values before parsing it (:func:`parse_json`).

    Raises:
        ValueError: not a regular file, too large, too many values, not UTF-8, not JSON, or nested too
            deeply; the message says which.
        OSError: the file cannot be read.
    """
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
        raise ValueError(f"{path.name} is not a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"{path.name} is {info.st_size:,} bytes, over the {max_bytes:,} it may take")
    with open(path, "rb") as fh:
        data = fh.read(info.st_size + 1)  # the file may have grown since stat (read(n) allocates n bytes)
    if len(data) > max_bytes:
        raise ValueError(f"{path.name} is over the {max_bytes:,} bytes it may take")
    return parse_json(data, path.name, max_values)
