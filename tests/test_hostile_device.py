"""The hostile corpus of the device surfaces: pack, unpack, platforms, dataset, verify and bench
given what a careless or hostile user would give them (issue 34, cases numbered as there).

The cases that could make a reader hang or allocate (archives, JSON floods, an index that never
answers) run the real CLI in a subprocess, measured by a small parent that reports the child's peak
RSS: one ``error:`` line, a non-zero exit, within :data:`PEAK_RSS_MB`. The others call the API in
this process (the CLI turns the same typed errors into one line) and check that the source and
every folder outside the target are as they were. Nothing here is timed: a run that hung would
meet the suite's hang bound.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from edgeclf.pack import pack
from tests.conftest import HANG_S

PEAK_RSS_MB = 300
#: The child's exit status, stdout and stderr, and its peak resident memory (Linux reports KiB).
_MEASURE = ("import json, resource, subprocess, sys, time\n"
            "started = time.perf_counter()\n"
            "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps([done.returncode, done.stdout, done.stderr,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - started]))\n")


def run_measured(*args: str, cwd: Path | None = None, env: dict | None = None) -> tuple[int, str, str, float]:
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "edgeclf", *args],
                          capture_output=True, text=True, timeout=HANG_S, cwd=cwd, env={**os.environ, **(env or {})})
    status, stdout, stderr, peak_mb, seconds = json.loads(done.stdout)
    # Reported, not asserted (pytest -s shows it): what issue 34 asks each case to stay within.
    print(f"\nedgeclf {' '.join(args)[:90]}: exit {status}, {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
    return status, stdout, stderr, peak_mb


def _refused(args, fragment: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run the CLI; assert one error line holding ``fragment``, a non-zero exit and the memory bound."""
    status, stdout, stderr, peak_mb = run_measured(*map(str, args), cwd=cwd, env=env)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert len(errors) == 1 and fragment in errors[0], stderr[-2000:]
    assert peak_mb < PEAK_RSS_MB, f"peak RSS {peak_mb:.0f} MB"
    return errors[0]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links as links) with its sha256: to show nothing changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


@pytest.fixture(scope="module")
def packages(tiny_exported, tmp_path_factory) -> dict[str, Path]:
    """A package folder holding two artifacts, and the same as .tar.gz."""
    root = tmp_path_factory.mktemp("packages")
    bundle = tiny_exported[0].path
    pack(bundle, ["openvino-int8", "onnx-int8"], root / "pkg")
    pack(bundle, ["onnx-int8"], root / "pkg.tar.gz")
    return {"folder": root / "pkg", "archive": root / "pkg.tar.gz"}


def _package_members(packages) -> dict[str, bytes]:
    folder = packages["folder"]
    names = sorted((p.name for p in folder.iterdir()), key=lambda n: n != "bundle.json")
    return {name: (folder / name).read_bytes() for name in names}


# -- 1. pack onto, into or above its source ------------------------------------------------------

@pytest.mark.parametrize("where", ["onto itself", "inside itself", "its parent", "archive inside itself"])
def test_1_pack_never_writes_onto_into_or_above_its_source(packages, tmp_path, where):
    from edgeclf.errors import InvalidInputError
    from edgeclf.runtime import verify

    source = tmp_path / "parent" / "src"
    source.parent.mkdir()
    subprocess.run(["cp", "-r", str(packages["folder"]), str(source)], check=True)
    before, parent_before = _tree(source), _tree(source.parent)
    out = {"onto itself": source, "inside itself": source / "small", "its parent": source.parent,
           "archive inside itself": source / "small.tar.gz"}[where]
    with pytest.raises(InvalidInputError, match="choose an output apart") as caught:
        pack(source, ["onnx-int8"], out, overwrite=True)
    assert str(source) in str(caught.value) and "\n" not in str(caught.value)
    assert _tree(source) == before and _tree(source.parent) == parent_before
    assert verify(source, "onnx-int8", record=False, allow_small_set=True).passed  # still its own package


def test_1_unpack_never_replaces_the_folder_holding_its_archive(packages, tmp_path):
    from edgeclf.errors import InvalidInputError
    from edgeclf.pack import unpack

    folder = tmp_path / "device"
    folder.mkdir()
    archive = folder / "pkg.tar.gz"
    archive.write_bytes(packages["archive"].read_bytes())
    before = _tree(folder)
    with pytest.raises(InvalidInputError, match="holds the archive it unpacks"):
        unpack(archive, folder, overwrite=True)
    assert _tree(folder) == before


# -- 2, 3. archives that make a reader hang or allocate ------------------------------------------

def _tar_header(name: bytes, size: int, kind: bytes) -> bytes:
    header = bytearray(512)
    header[0:len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % 0
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _gz(path: Path, *blocks: bytes) -> Path:
    with gzip.open(path, "wb", compresslevel=1) as fh:
        for block in blocks:
            fh.write(block)
    return path


def _hostile_archive(kind: str, packages, tmp: Path) -> Path:
    members = _package_members(packages)
    record = members["bundle.json"]
    first = _tar_header(b"bundle.json", len(record), b"0") + record + b"\0" * (-len(record) % 512)
    if kind == "pax header of 400,000 digits":  # quadratic in tarfile's pax regex before Python 3.11.10
        digits = b"9" * 400_000
        return _gz(tmp / "evil.tar.gz", _tar_header(b"././@PaxHeader", len(digits), b"x"), digits)
    if kind == "GNU long name of 1 GiB":  # tarfile reads the whole name into memory first
        return _gz(tmp / "evil.tar.gz", first, _tar_header(b"././@LongLink", 1 << 30, b"L"), b"n" * (1 << 20))
    if kind == "1 GiB of zeros declared by the record":  # ~100 KB of gzip that would write 1 GiB
        meta = json.loads(record)
        meta["package"]["files"]["verification.npz"]["size_bytes"] = 1 << 30
        record = json.dumps(meta).encode()
        first = _tar_header(b"bundle.json", len(record), b"0") + record + b"\0" * (-len(record) % 512)
        return _gz(tmp / "evil.tar.gz", first, _tar_header(b"verification.npz", 1 << 30, b"0"),
                   *([b"\0" * (1 << 20)] * 100))
    if kind == "zip directory of 2 million entries":  # zipfile parses the whole directory before a member
        # Only the end records, which declare the directory zipfile would read.
        end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 2_000_000, 2_000_000, 92_000_000, 0)
        locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1)
        end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        path = tmp / "evil.zip"
        path.write_bytes(end64 + locator + end)
        return path
    if kind == "zip of 100 members":
        path = tmp / "evil.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, payload in members.items():
                zf.writestr(name, payload)
            for i in range(100 - len(members)):
                zf.writestr(f"extra{i}", b"x")
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, fragment", [
    ("pax header of 400,000 digits", "pax header of 400,000 bytes"),
    ("GNU long name of 1 GiB", "a GNU long name"),
    ("1 GiB of zeros declared by the record", "more than 50 times"),
    ("zip directory of 2 million entries", "lists 2,000,000 members"),
    ("zip of 100 members", "lists 100 members"),
])
def test_2_3_archives_are_read_within_bounds_set_before_the_library_allocates(packages, tmp_path, kind, fragment):
    archive = _hostile_archive(kind, packages, tmp_path)
    _refused(["unpack", archive, tmp_path / "out"], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # no output, no staging folder


@pytest.mark.parametrize("where", ["unpack", "predict"])
def test_3_a_bundle_json_of_millions_of_values_is_refused_before_it_is_parsed(packages, tmp_path, where):
    flood = b"[" + b"{}," * 5_000_000 + b"{}]"  # 15 MB, under the size cap: 5 million dictionaries
    if where == "unpack":
        archive = tmp_path / "evil.tar.gz"
        _gz(archive, _tar_header(b"bundle.json", len(flood), b"0"), flood, b"\0" * (-len(flood) % 512))
        _refused(["unpack", archive, tmp_path / "out"], "JSON values")
        assert not (tmp_path / "out").exists()
    else:
        folder = tmp_path / "pkg"
        subprocess.run(["cp", "-r", str(packages["folder"]), str(folder)], check=True)
        (folder / "bundle.json").write_bytes(flood)
        image = tmp_path / "x.png"
        image.write_bytes(b"\x89PNG")
        _refused(["predict", folder, image], "JSON values")


# -- 4. platforms without an index ----------------------------------------------------------------

@pytest.fixture
def silent_index():
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/simple"
    stop.set()
    thread.join()
    for s in [*held, server]:
        s.close()


def _closed_port_index() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/simple"  # closed when this returns: connections refused


@pytest.mark.parametrize("index", ["refused", "silent"])
def test_4_platforms_offline_exits_with_one_line_and_writes_no_table(index, request, tmp_path):
    url = _closed_port_index() if index == "refused" else request.getfixturevalue("silent_index")
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": url, "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_NO_INPUT": "1"}
    started = time.perf_counter()
    tool = Path(__file__).resolve().parent.parent / "tools" / "platforms.py"
    done = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, env={
        **os.environ, **env}, timeout=HANG_S, cwd=tmp_path)
    print(f"\nplatforms against a {index} index: exit {done.returncode}, {time.perf_counter() - started:.1f} s")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and done.stdout == "" and len(errors) == 1, done.stderr[-2000:]
    assert "package index" in errors[0] and "no table was written" in errors[0]


# -- 5, 6. an empty or symlinked target ------------------------------------------------------------

@pytest.mark.parametrize("command", ["unpack", "dataset gauges"])
@pytest.mark.parametrize("target", ["empty", "symlink", "working directory"])
def test_5_6_an_empty_symlinked_or_working_directory_target_is_refused_up_front(packages, tmp_path, monkeypatch,
                                                                                  command, target):
    from edgeclf.errors import InvalidInputError
    from edgeclf.pack import unpack
    from edgeclf.train.gauges import write_gauges_folder

    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs.txt").write_text("keep")
    if target == "symlink":
        (here / "link").symlink_to(elsewhere)
    monkeypatch.chdir(here)
    out = {"empty": "", "symlink": "link", "working directory": "."}[target]
    before = _tree(tmp_path)
    fragment = {"empty": "name is empty", "symlink": "symbolic link", "working directory": "directory you are in"}
    with pytest.raises(InvalidInputError, match=fragment[target]):
        if command == "unpack":
            unpack(packages["archive"], out, overwrite=True)
        else:
            write_gauges_folder(out, per_class=2, overwrite=True)
    assert _tree(tmp_path) == before  # nothing written, nothing left beside the target


# -- 7. verify and a set whose labels were changed --------------------------------------------------

def test_7_verify_fails_a_package_whose_relabelled_subset_was_resigned(packages, tmp_path):
    import numpy as np

    from edgeclf.bundle import Bundle
    from edgeclf.fsio import sha256_file
    from edgeclf.verification import load_verification_set

    folder = tmp_path / "pkg"
    subprocess.run(["cp", "-r", str(packages["folder"]), str(folder)], check=True)
    bundle = Bundle.load(folder)
    reference = load_verification_set(bundle)
    keep = len(reference) * 3 // 4
    labels = bundle.labels
    shifted = np.array([labels[(labels.index(v) + 1) % len(labels)] for v in reference.values[:keep]])
    np.savez_compressed(folder / "verification.npz", pixels=reference.images[:keep], labels=shifted,
                        logits=reference.logits[:keep])
    meta = json.loads((folder / "bundle.json").read_text())
    digest, size = sha256_file(folder / "verification.npz"), (folder / "verification.npz").stat().st_size
    meta["verification_set"].update(sha256=digest, size_bytes=size, images=keep)  # re-signed in both records
    meta["package"]["files"]["verification.npz"].update(sha256=digest, size_bytes=size)
    (folder / "bundle.json").write_text(json.dumps(meta))
    from edgeclf.errors import BundleError
    from edgeclf.runtime import verify

    with pytest.raises(BundleError, match="labels disagree with export"):
        verify(folder, "all", allow_small_set=True)
    assert json.loads((folder / "bundle.json").read_text()) == meta  # no result stored


# -- 8. dataset options whose product is not bounded --------------------------------------------------

@pytest.mark.parametrize("size, fragment", [(4096, "369,098,752 pixels"), (3000, "canvas of 144,000,000 pixels")])
def test_8_dataset_refuses_what_its_options_produce_together(tmp_path, size, fragment):
    from edgeclf.errors import InvalidInputError
    from edgeclf.train.gauges import write_gauges_folder

    with pytest.raises(InvalidInputError, match=fragment):
        write_gauges_folder(tmp_path / "out", per_class=2, size=size)
    assert list(tmp_path.iterdir()) == []


# -- 9. bench on an altered package, a FIFO for a file -----------------------------------------------

def test_9_bench_runs_the_package_check_first(packages, tmp_path):
    from edgeclf.benchmarks.harness import BenchConfig, run_bench
    from edgeclf.errors import BundleError

    folder = tmp_path / "pkg"
    subprocess.run(["cp", "-r", str(packages["folder"]), str(folder)], check=True)
    os.replace(folder / "model.int8.openvino.xml", tmp_path / "x")
    (folder / "model.int8.openvino.xml").write_bytes((tmp_path / "x").read_bytes().replace(b"<net", b"<net ", 1))
    with pytest.raises(BundleError, match="is not as packed"):
        run_bench(folder, BenchConfig(duration_s=0.5, baselines=False))


def test_9_a_fifo_given_as_archive_or_image_is_named_for_what_it_is(tmp_path):
    from edgeclf.errors import ImageDecodeError, InvalidInputError
    from edgeclf.images import load_image
    from edgeclf.pack import unpack

    fifo = tmp_path / "pipe.tar.gz"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match="must be a regular file"):
        unpack(fifo, tmp_path / "out")
    image = tmp_path / "pipe.png"
    os.mkfifo(image)
    with pytest.raises(ImageDecodeError, match="not a FIFO or device"):
        load_image(image, (32, 32))
