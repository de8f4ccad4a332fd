"""Decoding the ordered integers: argmax, and the median that minimises the expected absolute error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeclf.errors import InvalidInputError
from edgeclf.decoding import decode_indices, median_indices, median_margins
from tests.conftest import run_cli


@pytest.mark.parametrize("probabilities, median", [
    ([0.0, 0.0, 1.0, 0.0], 2),  # one-hot: the class itself
    ([0.5, 0.5], 0),  # a tie: cumulative exactly one half at class 0, the lower median
    ([0.25, 0.25, 0.25, 0.25], 1),  # uniform over four: half reached at class 1
    ([0.45, 0.10, 0.45], 1),  # bimodal: the middle class, which argmax never picks
    ([0.4, 0.0, 0.0, 0.0, 0.6], 4),  # half not reached until the last class
    ([0.3, 0.19999999999, 0.5], 1),  # rounding just below one half still counts as a tie
])
def test_the_median_is_the_first_class_whose_cumulative_probability_reaches_one_half(probabilities, median):
    assert median_indices(np.array([probabilities])).tolist() == [median]


def test_the_median_minimises_the_expected_absolute_error():
    rng = np.random.default_rng(0)
    values = np.array([-2, 3, 10, 11, 30])  # not contiguous: the distance is between the integers
    probabilities = rng.dirichlet(np.ones(len(values)) * 0.7, size=500)
    expected_error = np.abs(values[None, :, None] - values[None, None, :])  # [1, guess, truth]
    cost = (expected_error * probabilities[:, None, :]).sum(axis=2)  # [N, guess]
    chosen = cost[np.arange(500), median_indices(probabilities)]
    assert np.allclose(chosen, cost.min(axis=1))
    assert (cost[np.arange(500), decode_indices(probabilities, "argmax")] >= chosen - 1e-12).all()


def test_an_unknown_decoding_is_refused():
    with pytest.raises(InvalidInputError, match="decoding must be one of argmax, median. Received: 'mean'"):
        decode_indices(np.ones((1, 3)) / 3, "mean")


@pytest.mark.parametrize("probabilities, margin", [
    ([0.2, 0.2, 0.6], np.log(0.6 / 0.4)),  # median 2, the last class: only "not below it" can fail
    ([0.1, 0.8, 0.1], np.log(0.9 / 0.1)),  # median 1: P(<= 1) and P(>= 1) are both 0.9
    ([0.5, 0.5, 0.0], 0.0),  # a tie: P(<= 0) is exactly one half, nothing decides it
    ([0.3, 0.3, 0.4], min(np.log(0.6 / 0.4), np.log(0.7 / 0.3))),
])
def test_the_median_margin_is_the_log_odds_of_the_nearer_side(probabilities, margin):
    logits = np.log(np.maximum(np.array([probabilities]), 1e-300))
    assert median_margins(logits)[0] == pytest.approx(margin, abs=1e-9)


def test_logits_moved_by_less_than_half_the_median_margin_keep_the_median():
    """The guarantee the INT8 gate's decided margin rests on holds for the median as for top-1."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3000, 7)) * 3
    moved = logits + rng.uniform(-0.25, 0.25, logits.shape)  # every logit by at most 0.25
    median = median_indices(np.exp(logits))
    flipped = median != median_indices(np.exp(moved))
    assert flipped.any()  # the test can fail
    assert not (flipped & (median_margins(logits) >= 0.5)).any()


def test_verify_decode_median_checks_the_median_answers_apart_from_argmax(tiny_exported, tmp_path):
    import shutil

    from edgeclf.bundle import Bundle
    from edgeclf.runtime import verify
    from edgeclf.runtime.fingerprint import machine_key

    bundle = shutil.copytree(tiny_exported[0].path, tmp_path / "bundle")
    report = verify(bundle, "onnx", allow_small_set=True, decoding="median")
    result = report.results["onnx+median"]
    assert result["passed"] and result["decoding"] == "median"
    assert result["median"]["agreement"] == 1.0 and result["median"]["mae"] == result["median"]["mae_keras"]
    assert [c["check"] for c in result["checks"] if c["check"].startswith("median")] == [
        "median agreement", "median accuracy drop"]
    stored = Bundle.load(bundle).meta["verified"]["machines"][machine_key()]["results"]
    assert stored["onnx+median"]["passed"] and "median" not in stored["onnx"]  # auto reads the argmax results
    out = run_cli("verify", str(bundle), "--backend", "onnx-int8", "--decode", "median", "--allow-small-set",
                  "--no-record")
    assert out.returncode == 0, out.stderr
    assert "onnx-int8+median median agreement, margin >=" in out.stdout and "decoded by median" in out.stdout
    bad = run_cli("verify", str(bundle), "--decode", "mean")
    assert bad.returncode == 2 and "invalid choice: 'mean'" in bad.stderr.strip().splitlines()[-1]


def test_serve_answers_the_label_decoded_as_told(tiny_exported):
    """Both served models' label output comes from the Predictor's decoding (the logits are the same)."""
    from edgeclf.runtime import Predictor
    from edgeclf.serve.server import ServeOptions, _Models

    logits = np.array([[2.0, 0.0, 1.9], [0.1, 3.0, 0.2], [1.0, 0.9, 0.95]], dtype=np.float32)
    answers = {}
    for decoding in ("argmax", "median"):
        with Predictor.load(tiny_exported[0].path, "onnx", decoding=decoding) as predictor:
            answers[decoding] = _Models(predictor, "edgeclf", "unused").outputs(logits)["label"][:, 0].tolist()
    table = np.asarray(tiny_exported[0].labels)
    assert answers["argmax"] == table[[0, 1, 0]].tolist()
    assert answers["median"] == table[median_indices(np.exp(logits))].tolist() == table[[1, 1, 1]].tolist()
    with pytest.raises(InvalidInputError, match="decoding must be one of argmax, median. Received: 'mean'"):
        ServeOptions(decoding="mean")


def test_predict_decode_median_agrees_with_the_predictor(tiny_exported, digits_dir):
    from edgeclf.runtime import Predictor

    bundle = tiny_exported[0].path
    images = sorted((digits_dir / "test").rglob("*.png"))[:40]
    with Predictor.load(bundle, "onnx", decoding="median") as predictor:
        expected = [p.label for p in predictor.predict_batch([str(i) for i in images])]
        logits = predictor.logits([str(i) for i in images])
        table = np.asarray(predictor.labels)
    out = run_cli("predict", str(bundle), *map(str, images), "--backend", "onnx", "--decode", "median", "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["label"] for line in out.stdout.splitlines()] == expected
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert expected == table[median_indices(probabilities / probabilities.sum(axis=1, keepdims=True))].tolist()
    bad = run_cli("predict", str(bundle), str(images[0]), "--decode", "mean")
    assert bad.returncode == 2 and "invalid choice: 'mean'" in bad.stderr.strip().splitlines()[-1]


def test_the_error_distribution_counts_integer_distances():
    from edgeclf.train.metrics import classification_metrics

    metrics = classification_metrics([-2, 3, 10, 10, 3], [-2, 10, 3, 11, 4], [-2, 3, 4, 10, 11])
    # |error|: 0, 7, 7, 1, 1 -> bins 0: 1, 1: 2, 2: 0, >=3: 2
    assert metrics["abs_error"]["counts"] == [1, 2, 0, 2] and metrics["off_by_2_or_more"] == pytest.approx(0.4)
    assert metrics["abs_error"]["bins"] == ["0", "1", "2", ">=3"]
