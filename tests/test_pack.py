"""edgeclf pack and unpack: a device package of only what a device needs, refused when tampered with."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeclf.bundle import Bundle, update_bundle
from edgeclf.errors import BundleError, InvalidInputError
from edgeclf.fsio import sha256_file
from edgeclf.pack import PACKAGE_FORMAT, pack, unpack
from tests.conftest import run_cli


@pytest.fixture
def source(tiny_exported, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_exported[0].path, tmp_path / "bundle"))


def _images(bundle: Path) -> np.ndarray:
    with np.load(bundle / "verification.npz") as npz:
        return npz["pixels.npy"][:16] if "pixels.npy" in npz.files else npz["pixels"][:16]


def test_a_package_holds_only_the_chosen_artifacts_and_runs_as_the_bundle_does(source, tmp_path):
    from edgeclf.runtime import Predictor, verify

    report = pack(source, ["onnx-int8"], tmp_path / "pkg")
    files = sorted(p.name for p in (tmp_path / "pkg").iterdir())
    # No model.keras, no other artifact; the trust file for calibrated confidence, familiarity and intervals.
    assert files == ["bundle.json", "model.int8.onnx", "trust.npz", "verification.npz"]
    assert report.bytes < report.source_bytes / 2
    meta = Bundle.load(tmp_path / "pkg").meta
    assert list(meta["artifacts"]) == ["onnx-int8"] and "benchmarks" not in meta
    record = meta["package"]
    assert record["format"] == PACKAGE_FORMAT and record["formats"] == ["onnx-int8"]
    assert record["from"]["bundle_json_sha256"] == sha256_file(source / "bundle.json")
    assert record["files"]["model.int8.onnx"]["sha256"] == sha256_file(source / "model.int8.onnx")
    pixels = _images(source)
    with Predictor.load(source, "onnx-int8") as full, Predictor.load(tmp_path / "pkg") as packed:  # auto
        assert packed.describe()["artifact"].endswith("model.int8.onnx")
        assert [p.label for p in packed.predict_batch(pixels)] == [p.label for p in full.predict_batch(pixels)]
    assert verify(tmp_path / "pkg", "all", allow_small_set=True).passed


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_an_archive_unpacks_to_a_package_that_verify_passes(source, tmp_path, suffix):
    archive = tmp_path / f"pkg{suffix}"
    out = run_cli("pack", str(source), "--for", "openvino-int8,onnx", "--out", str(archive))
    assert out.returncode == 0, out.stderr
    assert f"package {archive}: openvino-int8, onnx" in out.stdout and "model.int8.openvino.bin" in out.stdout
    out = run_cli("unpack", str(archive), str(tmp_path / "device"))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "device").iterdir()) == [
        "bundle.json", "model.int8.openvino.bin", "model.int8.openvino.xml", "model.onnx", "trust.npz",
        "verification.npz"]
    out = run_cli("verify", str(tmp_path / "device"), "--allow-small-set")
    assert out.returncode == 0, out.stderr
    assert "onnx " in out.stdout and "openvino-int8" in out.stdout


def test_what_is_not_validated_or_not_there_is_refused(source, tmp_path):
    with pytest.raises(InvalidInputError, match="unknown artifact format 'openvino-bf16' .*pack openvino"):
        pack(source, ["openvino-bf16"], tmp_path / "a")
    with update_bundle(source) as bundle:
        bundle.meta["artifacts"]["onnx"]["status"] = "failed-validation"
    with pytest.raises(InvalidInputError, match="'failed-validation', not validated .*--allow-unvalidated"):
        pack(source, ["onnx"], tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert pack(source, ["onnx"], tmp_path / "b", allow_unvalidated=True).formats == ["onnx"]
    with pytest.raises(Exception, match="exists"):
        pack(source, ["onnx"], tmp_path / "b", allow_unvalidated=True)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_byte_flipped_in_a_package_is_refused_on_one_line(source, tmp_path):
    pack(source, ["onnx-int8"], tmp_path / "pkg")
    _flip(tmp_path / "pkg" / "verification.npz", 5000)
    out = run_cli("verify", str(tmp_path / "pkg"), "--allow-small-set")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: the package {tmp_path / 'pkg'} is not as packed: verification.npz differs from the file packed "
        f"(sha256): it was altered; pack it again"]
    pack(source, ["onnx-int8"], tmp_path / "pkg.tar.gz")
    _flip(tmp_path / "pkg.tar.gz", (tmp_path / "pkg.tar.gz").stat().st_size // 2)
    out = run_cli("unpack", str(tmp_path / "pkg.tar.gz"), str(tmp_path / "out"))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "is not a package edgeclf wrote" in out.stderr and "nothing was unpacked" in out.stderr
    assert not (tmp_path / "out").exists()


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data[member.name]) if member.name in data else None)


@pytest.mark.parametrize("case", ["dot-dot", "absolute", "symlink", "hard link", "folder", "unlisted", "zip symlink",
                                  "newline"])
def test_hostile_archives_are_refused_before_anything_lands(source, tmp_path, case):
    pack(source, ["onnx-int8"], tmp_path / "pkg")
    names = sorted((p.name for p in (tmp_path / "pkg").iterdir()), key=lambda n: n != "bundle.json")  # record first
    data = {name: (tmp_path / "pkg" / name).read_bytes() for name in names}
    members = []
    for name, payload in data.items():
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        members.append(info)
    archive = tmp_path / ("evil.zip" if case.startswith("zip") else "evil.tar.gz")
    evil = tarfile.TarInfo({"dot-dot": "../escaped", "absolute": str(tmp_path / "escaped"),
                            "newline": "model.int8.onnx\n"}.get(case, "extra"))
    if case in ("dot-dot", "absolute", "unlisted", "newline"):
        evil.size, data[evil.name] = 4, b"evil"
    elif case == "symlink":
        evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif case == "hard link":
        evil.type, evil.linkname = tarfile.LNKTYPE, "bundle.json"
    elif case == "folder":
        evil.type = tarfile.DIRTYPE
    if case == "zip symlink":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, payload in data.items():
                zf.writestr(name, payload)
            link = zipfile.ZipInfo("extra")
            link.external_attr = (0o120777 << 16)
            zf.writestr(link, "/etc/passwd")
    else:
        _tar(archive, [*members, evil], data)
    with pytest.raises(BundleError, match="is not a package edgeclf wrote: .*nothing was unpacked") as caught:
        unpack(archive, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging folder left
    if case == "unlisted":
        assert "does not list: extra" in str(caught.value)
    if case in ("symlink", "zip symlink"):
        assert "symbolic link" in str(caught.value)


def test_an_archive_declaring_one_size_and_holding_another_is_refused(source, tmp_path):
    pack(source, ["onnx-int8"], tmp_path / "pkg.zip")
    with zipfile.ZipFile(tmp_path / "pkg.zip") as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    meta = json.loads(members["bundle.json"])
    meta["package"]["files"]["verification.npz"]["size_bytes"] += 1
    members["bundle.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    with pytest.raises(BundleError, match="member 'verification.npz' declares .* bytes, the package record says"):
        unpack(tmp_path / "bad.zip", tmp_path / "out")
