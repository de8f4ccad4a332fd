"""``edgeclf pack`` and ``unpack``: a device package, only what a device needs.

A package is a bundle directory that holds the chosen artifacts (an OpenVINO IR with its
weights file), the verification set and a ``bundle.json`` cut down to them: labels, input,
preprocessing, the artifacts' records and what was measured of them, and a ``package``
record of what it was packed from (the source bundle.json's sha256, the model's sha256,
the formats, the edgeclf version) and the sha256 and size of every file in it. No
``model.keras``, no other artifact. ``Predictor.load``, ``predict``, ``verify`` and
``bench`` read it as they read a bundle.

An archive (``.tar.gz``, ``.tgz`` or ``.zip``) is not opened in place: ``edgeclf unpack``
writes it out as a folder, since ``verify`` and ``bench`` record their results in
``bundle.json``. Unpacking accepts only what ``pack`` writes: regular files with plain
names (no folder, no ``..``, no link), each listed in the package record with its size
and sha256, within a size bound; anything else is refused before a byte lands, and the
folder appears under its name only once every file has been checked.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from edgeclf import __version__
from edgeclf.archive import MAX_MEMBERS, ArchiveRefused, Inflation, Member, open_members
from edgeclf.bundle import BUNDLE_FILE, MAX_BUNDLE_JSON_BYTES, Bundle, artifact_files
from edgeclf.errors import BundleError, InvalidInputError, OutputExistsError
from edgeclf.formats import FORMATS, entries
from edgeclf.limits import is_int
from edgeclf.fsio import atomic_path, read_json, sha256_file, staged_directory, storage_error, storage_errors

PACKAGE_FORMAT = "edgeclf-package/1"
ARCHIVES = (".tar.gz", ".tgz", ".zip")
#: A package's files are a few artifacts and a verification set (at most 1 GiB); far more is not a package.
MAX_PACKAGE_BYTES = 16 << 30
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # used with fullmatch


@dataclass(frozen=True)
class PackReport:
    path: Path
    formats: list[str]
    files: dict[str, int]  # name -> bytes
    source_bytes: int  # the whole source bundle directory
    build_on_device: list[str] = field(default_factory=list)  # formats `edgeclf engine` builds there

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def archive_kind(path: str | os.PathLike) -> str | None:
    """"tar.gz", "zip", or None (a folder) from the name ``path`` ends with."""
    name = str(path).lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    return "zip" if name.endswith(".zip") else None


#: Formats a device builds itself (``edgeclf engine``): a TensorRT engine runs only on the GPU and TensorRT
#: it was built with, so pack ships the artifact it is built from instead, and says so in the record.
BUILT_ON_DEVICE = {"tensorrt": FORMATS["tensorrt"].source}


def _chosen_formats(bundle: Bundle, formats: Sequence[str], allow_unvalidated: bool) -> tuple[list[str], list[str]]:
    """(artifacts to pack, formats the device builds from them)."""
    artifacts = bundle.meta.get("artifacts") or {}
    names = [n.strip().lower() for n in formats if n.strip()]
    to_build = [n for n in names if n in BUILT_ON_DEVICE]
    names = [BUILT_ON_DEVICE.get(n, n) for n in names]
    if not names:
        raise InvalidInputError(f"pack needs at least one artifact format (--for), one of {list(FORMATS)}")
    for name in names:
        if name not in FORMATS:
            hint = next((f for f in FORMATS for entry, _ in entries(f) if entry == name), None)
            raise InvalidInputError(f"unknown artifact format {name!r}" + (
                f" ({name} runs the {hint} artifact: pack {hint})" if hint else "") + f"; expected one of "
                f"{list(FORMATS)}. Received: --for {','.join(formats)}")
        record = artifacts.get(name)
        if not isinstance(record, dict):
            raise InvalidInputError(f"{bundle.path} has no {name} artifact; export it first (edgeclf export "
                                    f"{bundle.path} --format {name}). It has: {sorted(artifacts) or 'none'}")
        if record.get("status") != "validated" and not allow_unvalidated:
            raise InvalidInputError(f"the {name} artifact of {bundle.path} is {record.get('status')!r}, not validated "
                                    f"against Keras; pack it anyway with --allow-unvalidated")
    return list(dict.fromkeys(names)), to_build


def _package_meta(bundle: Bundle, formats: list[str], files: dict[str, Path], to_build: list[str]) -> dict[str, Any]:
    """bundle.json of the package: the source's, cut down to ``formats``, with the package record."""
    meta = json.loads(json.dumps(bundle.meta))  # a deep copy of plain JSON
    meta["artifacts"] = {f: meta["artifacts"][f] for f in formats}
    kept = {entry for f in formats for entry, _ in entries(f)}
    for machine in ((meta.get("verified") or {}).get("machines") or {}).values():
        results = machine.get("results") or {}
        machine["results"] = {k: v for k, v in results.items() if k.split("+")[0] in kept}
    meta.pop("benchmarks", None)  # measured with the Keras baselines and every artifact: bench again on the device
    meta["package"] = {
        "format": PACKAGE_FORMAT,
        "formats": formats,
        "edgeclf_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "from": {"bundle": str(bundle.path.resolve()),
                 "bundle_json_sha256": sha256_file(bundle.path / BUNDLE_FILE),
                 "model_sha256": (meta.get("model") or {}).get("sha256")},
        "files": {name: {"sha256": sha256_file(path), "size_bytes": path.stat().st_size}
                  for name, path in sorted(files.items())},
    }
    if to_build:  # `edgeclf engine PACKAGE` builds them, where they will run
        meta["package"]["build_on_device"] = {name: BUILT_ON_DEVICE[name] for name in to_build}
    return meta


def pack(bundle_path: str | os.PathLike, formats: Sequence[str], out: str | os.PathLike, *,
         allow_unvalidated: bool = False, overwrite: bool = False) -> PackReport:
    """Write a device package of ``formats`` from the bundle at ``bundle_path`` to ``out``: a folder,
    or one ``.tar.gz``/``.tgz``/``.zip`` file when ``out`` ends so.

    Raises:
        BundleError: not a bundle; an artifact's files differ from its record; no verification set.
        InvalidInputError: an unknown format, one the bundle lacks, or one not validated.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    bundle = Bundle.load(bundle_path)
    _check_apart(bundle.path, Path(out), "pack's output", "the bundle it packs")
    chosen, to_build = _chosen_formats(bundle, formats, allow_unvalidated)
    files: dict[str, Path] = {}
    for fmt in chosen:
        parts = artifact_files(bundle, bundle.meta["artifacts"][fmt])  # sha256 and size checked here
        for part, key in ((parts.entry, "file"), (parts.weights, "weights_file")):
            if part is not None:  # named as recorded (an interrupted re-export's pending copy included)
                files[bundle.meta["artifacts"][fmt][key]] = part
    record = bundle.meta.get("verification_set")
    if not isinstance(record, dict):
        raise BundleError(f"{bundle.path} has no verification set, which verify needs on the device; export the "
                          f"bundle again with this edgeclf")
    verification = bundle.inside(record["file"], "verification_set.file")
    if not verification.is_file() or sha256_file(verification) != record.get("sha256"):
        raise BundleError(f"{verification} is missing or differs from the verification set export recorded")
    files[record["file"]] = verification
    trust = bundle.meta.get("trust")
    if isinstance(trust, dict):  # calibrated confidence, familiarity and intervals on the device
        path = bundle.inside(trust.get("file"), "trust.file")
        if not path.is_file() or sha256_file(path) != trust.get("sha256"):
            raise BundleError(f"{path} is missing or differs from the trust file export recorded; re-export the bundle")
        files[trust["file"]] = path
    odd = [name for name in files if not _PLAIN_NAME.fullmatch(name) or name == BUNDLE_FILE]
    if odd:  # unpack accepts plain names only: refuse here what could not come back
        raise BundleError(f"{bundle.path}: a package holds files by plain names, but bundle.json names {odd}")
    data = (json.dumps(_package_meta(bundle, chosen, files, to_build), indent=2) + "\n").encode("utf-8")
    out = Path(out)
    kind = archive_kind(out)
    if kind is None:
        with staged_directory(out, overwrite) as stage:
            for name, path in files.items():
                shutil.copyfile(path, stage / name)
            (stage / BUNDLE_FILE).write_bytes(data)
    else:
        if out.exists() and not overwrite:
            raise OutputExistsError(f"{out} exists; choose another name or pass --overwrite")
        if out.is_dir():
            raise OutputExistsError(f"{out} is a directory; an archive's name must be a file's")
        _write_archive(out, kind, files, data)
    source = sum(p.stat().st_size for p in bundle.path.rglob("*") if p.is_file())
    sizes = {n: p.stat().st_size for n, p in files.items()}
    sizes[BUNDLE_FILE] = len(data)
    return PackReport(out, chosen, sizes, source, to_build)


def _check_apart(source: Path, out: Path, what: str, source_what: str) -> None:
    """Refuse an output that is the source, lies inside it or holds it: writing it would change or
    replace the source (a package packed onto itself lost its other artifacts).

    Raises:
        InvalidInputError: naming both paths.
    """
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        relation = "is" if dst == src else "lies inside" if src in dst.parents else "holds"
        raise InvalidInputError(f"{what} {relation} {source_what}, which writing it would change; choose an output "
                                f"apart from it. Received: {out} for {source}")


def _write_archive(out: Path, kind: str, files: dict[str, Path], data: bytes) -> None:
    """``data`` (the package's bundle.json) first, as unpack reads it, then ``files`` (name -> path)."""
    with atomic_path(out, suffix=".tar.gz" if kind == "tar.gz" else ".zip") as tmp:
        if kind == "tar.gz":
            with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(BUNDLE_FILE)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
                for name, path in files.items():
                    with open(path, "rb") as fh:  # the file's content even where the bundle holds a link
                        member = tar.gettarinfo(fileobj=fh, arcname=name)
                        member.uid = member.gid = 0
                        member.uname = member.gname = ""
                        tar.addfile(member, fh)
        else:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True,
                                 strict_timestamps=False) as archive:
                info = zipfile.ZipInfo(BUNDLE_FILE, date_time=_dt.datetime.now().timetuple()[:6])
                info.external_attr, info.compress_type = (stat.S_IFREG | 0o644) << 16, zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
                for name, path in files.items():
                    archive.write(path, arcname=name)


# --- unpacking ---------------------------------------------------------------------------------

def _refuse(archive: Path, why: str) -> BundleError:
    return BundleError(f"{archive} is not a package edgeclf wrote: {why}; nothing was unpacked")


def unpack(archive: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the package in ``archive`` (.tar.gz, .tgz or .zip) out as the folder ``out``, checked.

    ``bundle.json`` comes first (``pack`` writes it first); its package record says which files
    follow and their sizes, so a member it does not list, or of another size, is refused before
    a byte of it is written, and nothing beyond what the record declares is ever written.

    Raises:
        BundleError: a member that ``pack`` does not write (a link, a folder, a path with ``..``, an
            absolute path), a member not listed or of another size, a damaged archive, a file
            differing from its sha256, or a listed file missing.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
        StorageError: the disk is full or read-only.
    """
    archive = Path(archive)
    kind = archive_kind(archive)
    if kind is None:
        raise InvalidInputError(f"unpack takes a .tar.gz, .tgz or .zip file written by edgeclf pack. Received: {archive}")
    if not archive.exists():
        raise InvalidInputError(f"no such package file. Received: {archive}")
    if not archive.is_file():
        raise InvalidInputError(f"a package file must be a regular file, not a FIFO, device or folder. "
                                f"Received: {archive}")
    _check_apart(archive, Path(out), "unpack's output folder", "the archive it unpacks")
    if archive.stat().st_size > MAX_PACKAGE_BYTES:
        raise _refuse(archive, f"{archive.stat().st_size:,} bytes, over the {MAX_PACKAGE_BYTES >> 30} GiB a package "
                               f"may take")
    with staged_directory(out, overwrite) as stage:
        try:
            _unpack_members(archive, open_members(archive, kind), stage)
        except ArchiveRefused as exc:
            raise _refuse(archive, str(exc)) from None
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise _refuse(archive, f"it is damaged ({type(exc).__name__}: {str(exc)[:200]})") from None
        except OSError as exc:
            if exc.errno is not None:  # the disk, not the archive
                raise storage_error(exc, stage) from None
            raise _refuse(archive, f"it is damaged ({exc})") from None
        problem = package_problem(stage)
        if problem:
            raise _refuse(archive, problem)
    return Path(out)


def _unpack_members(archive: Path, members: Iterator[tuple[Member, Inflation]], stage: Path) -> None:
    listed: dict[str, Any] | None = None
    seen: set[str] = set()
    for count, (member, inflation) in enumerate(members, 1):
        if count > MAX_MEMBERS:
            raise _refuse(archive, f"over {MAX_MEMBERS} members")
        if not _PLAIN_NAME.fullmatch(member.name):
            raise _refuse(archive, f"member {member.name[:200]!r} is not a plain file name (a package holds no "
                                   f"folders, absolute paths or '..')")
        if not member.regular:
            raise _refuse(archive, f"member {member.name!r} is {member.what}")
        if member.name in seen:
            raise _refuse(archive, f"member {member.name!r} is there twice")
        seen.add(member.name)
        if listed is None:  # the record comes first, and bounds everything after it
            if member.name != BUNDLE_FILE or member.size > MAX_BUNDLE_JSON_BYTES:
                raise _refuse(archive, f"its first member is {member.name!r}, not {BUNDLE_FILE} of at most "
                                       f"{MAX_BUNDLE_JSON_BYTES >> 20} MiB")
            _copy_bounded(archive, member.open(), stage / BUNDLE_FILE, member.size, inflation)
            listed = _listed_sizes(archive, stage / BUNDLE_FILE)
            continue
        expected = listed.get(member.name)
        if expected is None:
            raise _refuse(archive, f"it holds files the package record does not list: {member.name}")
        if member.size != expected:
            raise _refuse(archive, f"member {member.name!r} declares {member.size} bytes, the package record "
                                   f"says {expected}")
        _copy_bounded(archive, member.open(), stage / member.name, member.size, inflation)
    if listed is None:
        raise _refuse(archive, "it is empty")


def read_record(meta_path: Path) -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "size_bytes"} of the files the package record in ``meta_path`` lists.

    Raises:
        ValueError: ``meta_path`` is not a bundle.json holding a package record of plain file names
            with sizes and sha256s (the message says which).
        OSError: it cannot be read.
    """
    if meta_path.is_symlink():
        raise ValueError(f"its {BUNDLE_FILE} is a link")
    meta = read_json(meta_path, MAX_BUNDLE_JSON_BYTES)
    record = meta.get("package") if isinstance(meta, dict) else None
    files = record.get("files") if isinstance(record, dict) and record.get("format") == PACKAGE_FORMAT else None
    if not isinstance(files, dict):
        raise ValueError(f"its {BUNDLE_FILE} has no package record of format {PACKAGE_FORMAT!r}")
    for name, entry in files.items():
        size = entry.get("size_bytes") if isinstance(entry, dict) else None
        if not (_PLAIN_NAME.fullmatch(name) and name != BUNDLE_FILE and is_int(size) and size >= 0
                and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"the package record lists {name[:200]!r}, not a plain file name with its size and "
                             f"sha256")
    return files


def _listed_sizes(archive: Path, meta_path: Path) -> dict[str, int]:
    """name -> size of the files the package record lists, bounded: what unpack may write after bundle.json."""
    try:
        sizes = {name: entry["size_bytes"] for name, entry in read_record(meta_path).items()}
    except ValueError as exc:  # JSON and UTF-8 errors are ValueErrors too
        raise _refuse(archive, str(exc)) from None
    if sum(sizes.values()) > MAX_PACKAGE_BYTES:
        raise _refuse(archive, f"its package record declares over {MAX_PACKAGE_BYTES >> 30} GiB of files")
    return sizes


def _copy_bounded(archive: Path, source, target: Path, size: int, inflation: Inflation) -> None:
    """Copy at most ``size`` bytes (what the member declares) and refuse a member that holds more or less,
    or that expands far beyond the archive bytes read (``inflation``)."""
    written = 0
    with source, open(target, "wb") as fh:
        while chunk := source.read(min(1 << 20, size - written + 1)):
            written += len(chunk)
            if written > size:
                raise _refuse(archive, f"member {target.name!r} holds more than the {size} bytes it declares")
            inflation.add(len(chunk))
            fh.write(chunk)
    if written != size:
        raise _refuse(archive, f"member {target.name!r} holds {written} bytes, not the {size} it declares")


def package_problem(path: str | os.PathLike) -> str | None:
    """Why the folder ``path`` is not the package its ``bundle.json`` describes, or None.

    Every file the package record lists must be there, a regular file of its size and sha256,
    and nothing else may be (but files ``verify`` and ``bench`` write: bench results, locks)."""
    path = Path(path)
    try:
        listed = read_record(path / BUNDLE_FILE)
    except FileNotFoundError:
        return f"it has no {BUNDLE_FILE}"
    except ValueError as exc:  # JSON and UTF-8 errors are ValueErrors too
        return str(exc)
    for name, expected in listed.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            return f"{name} is missing (or not a regular file)"
        if file.stat().st_size != expected["size_bytes"]:
            return f"{name} is {file.stat().st_size} bytes, the package record says {expected['size_bytes']}"
        if sha256_file(file) != expected["sha256"]:
            return f"{name} differs from the file packed (sha256): it was altered"
    extra = sorted(p.name for p in path.iterdir() if p.name not in listed and p.name != BUNDLE_FILE
                   and not p.name.startswith(".") and p.name != "benchmarks")
    if extra:
        return f"it holds files the package record does not list: {', '.join(extra)[:300]}"
    return None


def check_package(bundle: Bundle) -> None:
    """For a package (a bundle with a package record): raise BundleError unless it is intact."""
    if "package" not in bundle.meta:
        return
    with storage_errors(bundle.path):
        problem = package_problem(bundle.path)
    if problem:
        raise BundleError(f"the package {bundle.path} is not as packed: {problem}; pack it again")
