"""The command line: help without TensorFlow, and one-line typed errors for bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeclf.cli import main
from edgeclf.commands.common import parse_labels
from tests.conftest import HANG_S, run_cli


def test_help_does_not_import_tensorflow():
    code = (
        "import sys, contextlib, io\n"
        "from edgeclf.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['dataset', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, argv\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_parse_labels():
    assert parse_labels("3..7") == [3, 4, 5, 6, 7]
    assert parse_labels("-2,3,10") == [-2, 3, 10]
    assert parse_labels("-3..-1,5") == [-3, -2, -1, 5]


def _error_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    return err[-1]


def test_missing_data_directory(capsys, tmp_path):
    line = _error_line(capsys, ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                "--weights", "none", "--image-size", "75"])
    assert "data directory not found" in line and "nope" in line


def test_empty_data_directory(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    line = _error_line(capsys, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                                "--weights", "none", "--image-size", "75"])
    assert "it is empty" in line


def test_non_integer_folder(capsys, tmp_path, digits_dir):
    shutil.copytree(digits_dir / "test" / "1", tmp_path / "d" / "one")
    line = _error_line(capsys, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                                "--weights", "none", "--image-size", "75"])
    assert "'one'" in line


def test_image_size_too_small(capsys, tmp_path, digits_dir):
    line = _error_line(capsys, ["train", str(digits_dir / "test"), "--out", str(tmp_path / "o"),
                                "--weights", "none", "--image-size", "64"])
    assert "at least 75x75" in line and "(64, 64)" in line


def test_weights_file_missing(capsys, tmp_path, digits_dir):
    line = _error_line(capsys, ["train", str(digits_dir / "test"), "--out", str(tmp_path / "o"),
                                "--weights", str(tmp_path / "w.h5"), "--image-size", "75"])
    assert "weights file not found" in line


def test_output_directory_not_empty(capsys, tmp_path, digits_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("precious")
    line = _error_line(capsys, ["train", str(digits_dir / "test"), "--out", str(tmp_path / "o"),
                                "--weights", "none", "--image-size", "75"])
    assert "not empty" in line and "--overwrite" in line
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"


def test_dataset_bad_holdout(capsys, tmp_path):
    # A number out of its range is a usage error: argparse's exit status 2 and one line naming the option.
    with pytest.raises(SystemExit) as exit_info:
        main(["dataset", "digits", str(tmp_path / "d"), "--holdout", "0"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "--holdout" in line and "Received: 0.0" in line
    assert not (tmp_path / "d").exists()


def test_augment_flip_needs_augment(capsys, tmp_path, digits_dir):
    line = _error_line(capsys, ["train", str(digits_dir / "test"), "--out", str(tmp_path / "o"),
                                "--weights", "none", "--image-size", "75", "--augment-flip"])
    assert "needs augment" in line


def test_evaluate_missing_bundle(capsys, tmp_path, digits_dir):
    line = _error_line(capsys, ["evaluate", str(tmp_path / "nobundle"), str(digits_dir / "test")])
    assert "bundle directory not found" in line


def test_real_cli_prints_one_error_line_without_traceback(tmp_path):
    # train loads TensorFlow first: its C++ start-up lines (absl, CUDA stubs) are hidden unless --verbose.
    out = run_cli("train", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--weights", "none",
                  "--image-size", "75")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"[edgeclf] loading data from {tmp_path / 'missing'} at 75x75",
                                                f"error: data directory not found. Received: {tmp_path / 'missing'}"]
    verbose = run_cli("train", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--verbose")
    assert verbose.returncode == 1 and verbose.stderr.strip().splitlines()[-1] == out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_cli_train_and_evaluate(tmp_path, noncontiguous_dir):
    out = run_cli("train", str(noncontiguous_dir), "--out", str(tmp_path / "b"), "--weights", "none",
                  "--image-size", "75", "--epochs-frozen", "2", "--epochs-finetune", "0",
                  timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phase 1" in out.stderr  # progress is shown
    out = run_cli("evaluate", str(tmp_path / "b"), str(noncontiguous_dir), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"accuracy"' in out.stdout


def test_export_unknown_format(capsys, tmp_path):
    line = _error_line(capsys, ["export", str(tmp_path), "--format", "onnx,coreml"])
    assert "['coreml']" in line and "onnx-int8" in line


@pytest.mark.slow
def test_cli_trains_another_backbone_at_hxw_without_feature_cache_and_evaluates_with_a_report(
        tmp_path, noncontiguous_dir):
    """README options through the real command line on a small backbone: ``--backbone``, an
    ``HxW`` size, ``--no-feature-cache``, then ``evaluate --report``."""
    import json

    bundle = tmp_path / "b"
    out = run_cli("train", str(noncontiguous_dir), "--out", str(bundle), "--weights", "none",
                  "--backbone", "mobilenet_v3_small", "--image-size", "64x96", "--epochs-frozen", "1",
                  "--epochs-finetune", "1", "--no-feature-cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["backbone"]["name"] == "mobilenet_v3_small"
    assert (meta["input"]["height"], meta["input"]["width"]) == (64, 96)
    frozen, finetune = meta["training"]["phases"]
    assert frozen["feature_cache"] is False and frozen["epochs_run"] == 1 and finetune["epochs_run"] == 1

    out = run_cli("evaluate", str(bundle), str(noncontiguous_dir), "--report", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["confusion_matrix"]["labels"] == [-2, 3, 10]
    assert sum(map(sum, saved["confusion_matrix"]["matrix"])) == saved["n"]
    assert f"accuracy={saved['accuracy']:.4f}" in out.stdout and "label   -2:" in out.stdout
    assert (tmp_path / "report" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "abs_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(saved["abs_error"]["counts"]) == saved["n"] and saved["decoding"] == "argmax"
    out = run_cli("evaluate", str(bundle), str(noncontiguous_dir), "--decode", "median", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["decoding"] == "median"


def test_cli_strict_refuses_an_unreadable_image_that_is_otherwise_skipped(tmp_path, noncontiguous_dir, tiny_bundle,
                                                                         capsys):
    """``--strict`` turns a skipped unreadable image into one error line naming it, before any
    training or evaluation; without it ``evaluate`` goes on and says what it skipped."""
    import json

    data = tmp_path / "data"
    shutil.copytree(noncontiguous_dir, data)
    (data / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for argv in (["train", str(data), "--out", str(tmp_path / "o"), "--weights", "none", "--image-size", "75",
                  "--strict"],
                 ["evaluate", str(tiny_bundle.path), str(data), "--strict"]):
        line = _error_line(capsys, argv)
        assert "broken.png" in line, line
    assert not (tmp_path / "o").exists()

    assert main(["evaluate", str(tiny_bundle.path), str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [Path(s["source"]).name for s in metrics["skipped_images"]] == ["broken.png"]
    assert metrics["n"] == sum(1 for _ in data.rglob("*.png")) - 1
