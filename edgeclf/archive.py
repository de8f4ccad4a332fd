"""Reading a package archive (.tar.gz or .zip) member by member, with bounds edgeclf sets
before any library allocates.

A package archive holds a few plain files (:mod:`edgeclf.pack`). Python's readers trust
what an archive declares: ``tarfile`` parses a pax header with a regular expression that
takes minutes on one header of 400,000 digits (CVE-2024-6232, fixed in 3.11.10 and
3.12.6 only), reads a GNU long name of any declared size into memory, and ``zipfile``
reads a central directory of millions of entries before a caller sees the first. So:

- **tar.gz** is read here, as the ustar/pax subset ``pack`` writes: 512-byte headers with
  their checksum, pax extended headers of at most :data:`MAX_EXTENDED_HEADER` bytes (their
  ``path`` and ``size`` records), and regular files; a GNU long name, a global or sparse
  header, or a base-256 size is refused, as ``pack`` never writes one. gzip itself is
  Python's (it allocates nothing an archive declares).
- **zip**: the end-of-central-directory record (and its zip64 form) is read first; more
  entries than :data:`MAX_MEMBERS` or a directory over
  :data:`MAX_ZIP_DIRECTORY` bytes is refused before ``zipfile`` parses it.
- **Inflation**: what a member expands to is bounded by the archive bytes read so far
  (:data:`MAX_INFLATION` times, beyond :data:`INFLATION_FLOOR`): a package's artifacts and
  verification set barely compress, so a small archive that would write gigabytes of
  zeros is refused as it is read, not after.
"""

from __future__ import annotations

import gzip
import stat
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

BLOCK = 512
#: A package holds a few artifacts, the verification set, the trust file and bundle.json.
MAX_MEMBERS = 64
#: A pax header of a package member holds a name of at most 200 characters and a few times.
MAX_EXTENDED_HEADER = 8 << 10
#: A central directory of at most 64 members, each with a plain name and a little extra data.
MAX_ZIP_DIRECTORY = 1 << 20
#: Written bytes may exceed this many times the archive bytes read ...
MAX_INFLATION = 50
#: ... only once more than this has been written (bundle.json and an OpenVINO XML compress well).
INFLATION_FLOOR = 64 << 20

_TYPES = {b"0": "regular", b"\0": "regular", b"7": "regular", b"1": "a hard link", b"2": "a symbolic link",
          b"3": "a character device", b"4": "a block device", b"5": "a folder", b"6": "a FIFO"}


class ArchiveRefused(Exception):
    """The archive is not one ``pack`` writes; the message says why (the caller names the archive)."""


class Member:
    """One archive member, its kind already read from the header: a name, a size and an opener."""

    def __init__(self, name: str, size: int, regular: bool, what: str, opener: Callable[[], BinaryIO]) -> None:
        self.name, self.size, self.regular, self.what, self.open = name, size, regular, what, opener


class Inflation:
    """Refuses output growing past MAX_INFLATION times the archive bytes read (beyond the floor)."""

    def __init__(self, consumed: Callable[[], int]) -> None:
        self.consumed, self.written = consumed, 0

    def add(self, count: int) -> None:
        self.written += count
        if self.written > INFLATION_FLOOR and self.written > MAX_INFLATION * max(self.consumed(), 1):
            raise ArchiveRefused(f"it expands to over {self.written:,} bytes from {self.consumed():,} bytes of archive, "
                                 f"more than {MAX_INFLATION} times: a package's files barely compress")


def open_members(archive: Path, kind: str) -> Iterator[tuple[Member, Inflation]]:
    """(member, inflation bound) in archive order; ``kind`` is "tar.gz" or "zip".

    Raises:
        ArchiveRefused: a header or directory outside the bounds above.
        OSError, EOFError, zlib.error, zipfile.BadZipFile: a damaged archive.
    """
    if kind == "tar.gz":
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            inflation = Inflation(raw.tell)
            for member in _tar_members(stream):
                yield member, inflation
    else:
        _check_zip_directory(archive)
        size = archive.stat().st_size
        with zipfile.ZipFile(archive) as zf:
            read = 0
            # The members' packed bytes as each is about to be read, at most the archive's own size
            # (members may declare overlapping data).
            inflation = Inflation(lambda: min(read, size))
            for info in zf.infolist():
                read += info.compress_size
                yield _zip_member(zf, info), inflation


# --- tar ---------------------------------------------------------------------------------------

def _field(header: bytes, start: int, end: int) -> bytes:
    return header[start:end].split(b"\0", 1)[0]


def _octal(header: bytes, start: int, end: int, what: str) -> int:
    raw = header[start:end]
    if raw[:1] and raw[0] & 0x80:
        raise ArchiveRefused(f"a header gives its {what} in base-256, which pack never writes")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if len(text) > end - start or any(c not in b"01234567" for c in text):
        raise ArchiveRefused(f"a header's {what} field is not an octal number")
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    recorded = _octal(header, 148, 156, "checksum")
    blanked = header[:148] + b" " * 8 + header[156:]
    return recorded in (sum(blanked), sum(struct.unpack("512b", blanked)))  # unsigned, or signed as some writers


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise EOFError(f"the archive ends inside a member ({len(data)} of {count} bytes)")
    return data


def _skip(stream: BinaryIO, count: int) -> None:
    while count > 0:
        count -= len(_read_exact(stream, min(count, 1 << 20)))


def _pax_records(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: "LENGTH KEY=VALUE\\n" each, read in one linear pass."""
    records, at = {}, 0
    while at < len(data):
        if data[at:].strip(b"\0") == b"":
            break
        space = data.find(b" ", at, at + 12)
        length_text = data[at:space] if space > at else b""
        if not length_text.isdigit():
            raise ArchiveRefused("a pax header record has no length")
        length = int(length_text)
        record = data[space + 1:at + length]
        if length <= space - at or at + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveRefused("a pax header record is malformed")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        at += length
    return records


def _tar_members(stream: BinaryIO) -> Iterator[Member]:
    """Members of the ustar/pax stream, each header read once; a member's data is read by its opener
    (at most its size) and whatever it leaves is skipped before the next header."""
    extended: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or header == b"\0" * BLOCK:
            if len(header) not in (0, BLOCK):
                raise EOFError("the archive ends inside a header")
            return  # the end-of-archive block (or a stream without one)
        if not _checksum_ok(header):
            raise ArchiveRefused("a header's checksum is wrong")
        kind, size = header[156:157], _octal(header, 124, 136, "size")
        padded = -(-size // BLOCK) * BLOCK
        if kind == b"x":
            if size > MAX_EXTENDED_HEADER:
                raise ArchiveRefused(f"a pax header of {size:,} bytes, over the {MAX_EXTENDED_HEADER:,} a package "
                                     f"member needs")
            extended = _pax_records(_read_exact(stream, padded)[:size])
            if any(key.startswith("GNU.sparse") for key in extended):
                raise ArchiveRefused("a member is a sparse file, which pack never writes")
            continue
        if kind in (b"g", b"L", b"K", b"S") or kind not in _TYPES:
            names = {b"g": "a global pax header", b"L": "a GNU long name", b"K": "a GNU long link name",
                     b"S": "a GNU sparse file"}
            raise ArchiveRefused(f"it holds {names.get(kind, f'a member of type {kind!r}')}, which pack never writes")
        prefix = _field(header, 345, 500) if header[257:263] == b"ustar\0" else b""
        name = extended.get("path") or (prefix + b"/" + _field(header, 0, 100) if prefix
                                        else _field(header, 0, 100)).decode("utf-8", "replace")
        if "size" in extended:
            if not extended["size"].isdigit() or len(extended["size"]) > 15:
                raise ArchiveRefused("a pax header's size is not a number of bytes")
            size = int(extended["size"])
            padded = -(-size // BLOCK) * BLOCK
        extended = {}
        remaining = [size]

        def opener(remaining=remaining) -> BinaryIO:
            return _Bounded(stream, remaining)

        what = _TYPES[kind]
        yield Member(name, size, what == "regular", what, opener)
        _skip(stream, remaining[0] + padded - size)  # what the opener left unread, and the padding


class _Bounded:
    """At most ``remaining[0]`` bytes of ``stream``; ``remaining`` tells the reader how many are left."""

    def __init__(self, stream: BinaryIO, remaining: list[int]) -> None:
        self.stream, self.remaining = stream, remaining

    def read(self, count: int = -1) -> bytes:
        count = self.remaining[0] if count < 0 else min(count, self.remaining[0])
        data = self.stream.read(count)
        self.remaining[0] -= len(data)
        return data

    def __enter__(self) -> _Bounded:
        return self

    def __exit__(self, *exc) -> None:
        return None


# --- zip ---------------------------------------------------------------------------------------

_END = struct.Struct("<4s4H2LH")  # end of central directory
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


def _check_zip_directory(archive: Path) -> None:
    """Refuse a central directory over the bounds from its end record, before zipfile reads it
    (found as zipfile finds it: at the very end, else the last signature in the final 64 KiB)."""
    with open(archive, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - (_END.size + 0xFFFF)))
        tail = fh.read()
        at = len(tail) - _END.size if tail[-_END.size:][:4] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
        if at < 0:
            return  # not a zip: zipfile says so
        _, _, _, _, entries, directory, _, _ = _END.unpack_from(tail, at)
        start = size - len(tail) + at
        if entries == 0xFFFF or directory == 0xFFFFFFFF:  # zip64: the real figures are in its own record
            locator = tail[at - _END64_LOCATOR.size:at] if at >= _END64_LOCATOR.size else b""
            if len(locator) == _END64_LOCATOR.size and locator[:4] == b"PK\x06\x07":
                offset = _END64_LOCATOR.unpack(locator)[2]
                if 0 <= offset < start:
                    fh.seek(offset)
                    record = fh.read(_END64.size)
                    if len(record) == _END64.size and record[:4] == b"PK\x06\x06":
                        entries, directory = _END64.unpack(record)[7:9]
    if entries > MAX_MEMBERS:
        raise ArchiveRefused(f"its directory lists {entries:,} members, over the {MAX_MEMBERS} a package holds")
    if directory > MAX_ZIP_DIRECTORY:
        raise ArchiveRefused(f"its directory is {directory:,} bytes, over the {MAX_ZIP_DIRECTORY:,} a package needs")


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: a writer that records no file type
    regular = not info.is_dir() and kind in (0, stat.S_IFREG)
    if regular and (info.flag_bits & 0x61 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)):
        raise ArchiveRefused(f"member {info.filename[:200]!r} is encrypted or compressed in a way pack never writes")
    return Member(info.filename, info.file_size, regular,
                  "a symbolic link" if kind == stat.S_IFLNK else "not a regular file", lambda: zf.open(info))
