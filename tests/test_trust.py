"""Calibrated confidence, familiarity and conformal intervals (edgeclf.trust, edgeclf.trust_file,
export.trust_fit) against hand-computed values, and the trust file's refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeclf.bundle import Bundle
from edgeclf.errors import BundleError, InvalidInputError
from edgeclf.probe import foreign_probe
from edgeclf.trust import (Familiarity, conformal_quantile, expected_calibration_error, interval_scores, intervals,
                           p_values, scaled_probabilities)
from edgeclf.trust_file import (TRUST_FILE, Trust, embedding_block, embedding_offset, load_trust, offset_record,
                                write_trust)
from edgeclf.export.familiarity_choice import choose_block, photo_crops
from edgeclf.export.trust_fit import fit_familiarity, fit_temperature, nll, with_calibration

LABELS = [3, 4, 5]


def test_temperature_minimises_the_nll_of_a_tiny_logit_set():
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [4.0, 0.0, 0.0]])
    truth = np.array([0, 1, 2, 1])  # one confident mistake: the best temperature is above 1
    # NLL(T) = log(e^(4/T) + 2) - 3/4 x 4/T: its minimum, e^(4/T) = 6, is T = 4 / log 6 = 2.232.
    t = fit_temperature(logits, truth)
    assert t == pytest.approx(4 / math.log(6), rel=1e-3)
    assert nll(logits, truth, t) < nll(logits, truth, 1.0)


def test_conformal_quantile_takes_the_finite_sample_rank():
    scores = np.arange(1, 20, dtype=float)  # n = 19
    assert conformal_quantile(scores, 0.9) == 18.0  # ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(scores, 0.5) == 10.0  # ceil(20 * 0.5) = 10
    assert conformal_quantile(scores[:5], 0.9) == math.inf  # ceil(6 * 0.9) = 6 > 5: nothing can promise it
    with pytest.raises(InvalidInputError, match="coverage"):
        conformal_quantile(scores, 1.0)


def test_p_values_count_calibration_scores_at_least_as_high():
    calibration = np.array([1.0, 2.0, 2.0, 5.0])
    assert p_values(np.array([0.5, 2.0, 4.0, 9.0]), calibration).tolist() == [1.0, 0.8, 0.4, 0.2]


def test_interval_spans_the_labels_above_the_bar_and_what_lies_between():
    p = np.array([[0.50, 0.05, 0.45],   # 0 and 2 pass 0.4: the range takes 1 in between
                  [0.10, 0.80, 0.10],   # only 1
                  [0.30, 0.35, 0.35]])  # none passes: the chosen (most probable, first) class alone
    spans = intervals(p, threshold=0.6)
    assert spans.tolist() == [[0, 2], [1, 1], [1, 1]]
    assert intervals(p, math.inf).tolist() == [[0, 2]] * 3
    # The true class is held up to the bar min(best at or below it, best at or above it), the most
    # probable class counting as 1: row 0 holds 2 up to 0.45, row 1 its most probable class at any
    # bar, row 2 holds 0 up to 0.30 (its own probability).
    assert interval_scores(p, np.array([2, 1, 0])).tolist() == pytest.approx([0.55, 0.0, 0.7])
    # A gap: 0 and 2 are likely, 1 is not. The range holds 1 as soon as it holds 0 and 2 (bar 0.45).
    gap = np.array([[0.50, 0.05, 0.45]])
    assert interval_scores(gap, np.array([1])).tolist() == pytest.approx([0.55])
    assert intervals(gap, 0.55).tolist() == [[0, 2]] and intervals(gap, 0.5).tolist() == [[0, 0]]
    # The decoded label joins the range when it is not the most probable (median decoding).
    assert intervals(p[1:2], 0.0, np.array([2])).tolist() == [[1, 2]]


def test_interval_coverage_holds_on_exchangeable_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 2
    p = scaled_probabilities(logits)
    truth = np.array([rng.choice(5, p=row) for row in p])  # labels drawn from the model: exchangeable
    threshold = conformal_quantile(interval_scores(p[:1000], truth[:1000]), 0.9)
    spans = intervals(p[1000:], threshold)
    covered = np.mean((spans[:, 0] <= truth[1000:]) & (truth[1000:] <= spans[:, 1]))
    assert 0.88 <= covered <= 0.92  # 0.902: the ranges themselves are calibrated, not the sets


def test_ece_by_hand():
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    truth = np.array([0, 1, 0, 0])
    # bin (0.867, 0.933]: confidence 0.9, accuracy 0.5; bin (0.533, 0.6]: confidence 0.6, accuracy 1.0
    assert expected_calibration_error(p, truth) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def _familiarity(rank: int, dim: int = 6, seed: int = 0) -> tuple[Familiarity, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim))
    index = rng.integers(0, 3, 300)
    x += index[:, None] * 3.0
    return fit_familiarity(x, index, 3, rank=rank), x


def test_full_rank_score_is_the_mahalanobis_distance_by_numpy_solve():
    model, x = _familiarity(rank=6)
    covariance = (model.basis * model.eigenvalues) @ model.basis.T
    queries = x[:7] + 0.5
    expected = np.min([np.einsum("nd,nd->n", queries - m, np.linalg.solve(covariance, (queries - m).T).T)
                       for m in model.means], axis=0)
    assert model.scores(queries) == pytest.approx(expected, rel=1e-4)


def test_low_rank_score_gives_the_remaining_directions_one_variance():
    model, x = _familiarity(rank=2)
    full, _ = _familiarity(rank=6)
    values, vectors = np.linalg.eigh((full.basis * full.eigenvalues) @ full.basis.T)
    kept = np.r_[np.full(4, values[:4].mean()), values[4:]]
    covariance = (vectors * kept) @ vectors.T
    queries = x[:5] - 1.0
    expected = np.min([np.einsum("nd,nd->n", queries - m, np.linalg.solve(covariance, (queries - m).T).T)
                       for m in model.means], axis=0)
    assert model.scores(queries) == pytest.approx(expected, rel=1e-3)


def test_familiarity_refuses_embeddings_of_another_width():
    model, _ = _familiarity(rank=2)
    with pytest.raises(InvalidInputError, match=r"\[N, 6\].*shape=\(2, 5\)"):
        model.scores(np.zeros((2, 5)))


def test_export_keeps_the_block_that_flags_the_foreign_frames():
    rng = np.random.default_rng(0)
    index = rng.integers(0, 3, 400)  # the classes of 400 images, 300 training and 100 held out

    def block(dim: int, foreign_at: float) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the images, of 60 foreign frames) in one block of ``dim`` features."""
        return rng.normal(size=(400, dim)) + index[:, None] * 3.0, rng.normal(size=(60, dim)) + foreign_at

    # "early": the foreign frames lie among the model's own images; "late": far from them.
    (early, foreign_e), (late, foreign_l) = block(4, 3.0), block(8, 40.0)
    training, heldout = {"early": early[:300], "late": late[:300]}, {"early": early[300:], "late": late[300:]}
    chosen, model, table = choose_block(("early", "late"), training, index[:300], 3, heldout,
                                        {"far frames": {"early": foreign_e, "late": foreign_l}})
    assert chosen == "late" and model.dimension == 8 and len(model.calibration) == 100
    assert table["late"]["foreign"]["far frames"] == {"flagged": 1.0, "auroc": 1.0}
    assert table["early"]["foreign"]["far frames"]["flagged"] < 0.5 and table["early"]["dimension"] == 4
    # Both flag everything: the earlier (narrower, cheaper) block.
    chosen, _, _ = choose_block(("early", "late"), training, index[:300], 3, heldout,
                                {"far frames": {"early": foreign_e + 60, "late": foreign_l}})
    assert chosen == "early"


def test_the_embedding_block_is_read_from_the_trust_record():
    assert embedding_block({"familiarity": {"block": "mixed0", "embedding": "global average pool of mixed0"}}) == "mixed0"
    # Records written before export chose the block only described it.
    assert embedding_block({"familiarity": {"embedding": "global average pool of mixed7"}}) == "mixed7"
    assert embedding_block({"familiarity": {"embedding": "the head's input (global average pool of the backbone)"}}) \
        is None
    assert embedding_block(None) is None and embedding_block({"temperature": 2.0}) is None


def test_photo_crops_are_real_photographs_at_the_model_size():
    crops = photo_crops(6, (20, 24), seed=1)
    assert crops.shape == (6, 20, 24, 3) and crops.dtype == np.uint8
    assert (photo_crops(6, (20, 24), seed=1) == crops).all() and not (photo_crops(6, (20, 24), seed=2) == crops).all()
    assert min(crop.std() for crop in crops) > 3  # texture, not flat frames


def test_probe_frames_are_noise_and_constants():
    probe = foreign_probe(8, 9, count=8)
    assert set(probe) == {"uniform noise", "constant frame"}
    constant = probe["constant frame"]
    assert constant.shape == (8, 8, 9, 3) and constant.dtype == np.uint8
    assert (constant[0] == 0).all() and (constant[1] == 255).all()
    assert all(len(np.unique(frame.reshape(-1, 3), axis=0)) == 1 for frame in constant)
    assert probe["uniform noise"].std() > 60


@pytest.fixture
def trust_bundle(tmp_path) -> tuple[Path, Trust]:
    """A bundle without a model holding a trust file written by export's own writer."""
    path = tmp_path / "bundle"
    path.mkdir()
    meta = {"format": "edgeclf-bundle/1", "labels": LABELS, "backbone": {"name": "mobilenet_v3_small"},
            "input": {"height": 8, "width": 8, "channels": 3}, "preprocessing": {}}
    (path / "bundle.json").write_text(json.dumps(meta))
    model, x = _familiarity(rank=3)
    model = with_calibration(model, x[:50])
    trust = Trust(1.7, model, np.sort(np.random.default_rng(1).uniform(size=50)), model.scores(x[50:60]),
                  {"temperature": 1.7})
    write_trust(path, trust)
    return path, trust


def test_trust_file_round_trips(trust_bundle):
    path, written = trust_bundle
    read = load_trust(Bundle.load(path))
    assert read.temperature == 1.7
    assert read.record["file"] == TRUST_FILE and read.record["size_bytes"] == (path / TRUST_FILE).stat().st_size
    probe = np.random.default_rng(2).normal(size=(4, 6))
    assert read.familiarity.scores(probe) == pytest.approx(written.familiarity.scores(probe), rel=1e-5)


def _rewrite(path: Path, **arrays) -> None:
    """Replace members of trust.npz and record the new file's size and sha256 (a consistent forgery)."""
    import hashlib

    with np.load(path / TRUST_FILE) as npz:
        members = {k: npz[k] for k in npz.files}
    members.update(arrays)
    np.savez(path / TRUST_FILE, **members)
    meta = json.loads((path / "bundle.json").read_text())
    data = (path / TRUST_FILE).read_bytes()
    meta["trust"].update(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / "bundle.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("forge, match", [
    (lambda p: _rewrite(p, means=np.zeros((4, 6), np.float32)), r"does not fit this model.*means float32 \[4, 6\]"),
    (lambda p: _rewrite(p, basis=np.zeros((5, 3), np.float32)), r"does not fit this model"),
    (lambda p: _rewrite(p, eigenvalues=np.array([1.0, np.nan, 2.0], np.float32)), r"NaN, infinite or not positive"),
    (lambda p: _rewrite(p, residual=np.float64(0.0)), r"not positive"),
])
def test_a_forged_trust_file_is_refused_in_one_line(trust_bundle, forge, match):
    path, _ = trust_bundle
    forge(path)
    with pytest.raises(BundleError, match=match) as info:
        load_trust(Bundle.load(path))
    assert "\n" not in str(info.value)


def test_a_trust_file_swapped_in_from_another_bundle_is_refused(trust_bundle, tmp_path):
    path, trust = trust_bundle
    other = tmp_path / "other"
    shutil.copytree(path, other)
    model, x = _familiarity(rank=3, seed=5)
    write_trust(other, Trust(2.0, with_calibration(model, x[:50]), trust.interval_calibration,
                             trust.reference_scores, {"temperature": 2.0}))
    shutil.copy(other / TRUST_FILE, path / TRUST_FILE)
    with pytest.raises(BundleError, match="differs from the trust file export wrote"):
        load_trust(Bundle.load(path))


def test_a_bundle_without_a_trust_file_reads_as_none(trust_bundle):
    path, _ = trust_bundle
    meta = json.loads((path / "bundle.json").read_text())
    del meta["trust"]
    (path / "bundle.json").write_text(json.dumps(meta))
    assert load_trust(Bundle.load(path)) is None


def test_predictions_carry_trust_and_a_bundle_without_it_says_so_in_one_line(tiny_exported, digits_dir, tmp_path):
    from edgeclf.runtime import Predictor

    bundle, _ = tiny_exported
    test_files = sorted((digits_dir / "test").rglob("*.png"))[:6]
    with Predictor.load(bundle.path, "onnx") as predictor:
        predictions = predictor.predict([str(f) for f in test_files])
        raw = predictor.logits([str(f) for f in test_files])
        assert predictor.scores_familiarity and "familiarity" in predictor.describe()["trust"]
    t = bundle.meta["trust"]["temperature"]
    for p, row in zip(predictions, raw, strict=True):
        assert p.familiar is not None and 0 < p.p_value <= 1
        assert p.interval[0] <= p.label <= p.interval[1] and p.coverage == 0.9
        assert p.confidence == pytest.approx(scaled_probabilities(row[None], t)[0].max(), rel=1e-5)
    copy = tmp_path / "old"
    shutil.copytree(bundle.path, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    del meta["trust"]
    (copy / "bundle.json").write_text(json.dumps(meta))
    with Predictor.load(copy, "onnx") as predictor:
        old = predictor.predict(str(test_files[0]))
        line = predictor.describe()["trust"]
    assert old.familiar is None and old.interval is None and "\n" not in line and "re-export" in line
    assert old.label == predictions[0].label


def test_an_artifacts_embedding_offset_is_the_paired_mean_shift_and_a_damaged_one_is_refused(trust_bundle):
    _, trust = trust_bundle
    rng = np.random.default_rng(3)
    keras = rng.normal(size=(200, trust.familiarity.dimension))
    shift = rng.normal(scale=0.1, size=trust.familiarity.dimension)
    found = offset_record(keras + shift + rng.normal(scale=1e-3, size=keras.shape), keras)
    assert found["images"] == 200 and np.allclose(found["values"], shift, atol=1e-3)
    assert found["median_shift_of_spread"] == pytest.approx(np.median(np.abs(shift) / keras.std(axis=0)), rel=0.05)
    np.testing.assert_allclose(embedding_offset({"embedding_offset": found}, trust), shift, atol=1e-3)
    assert embedding_offset({}, trust) is None and embedding_offset({"embedding_offset": found}, None) is None
    for values in (found["values"][:-1], [float("nan")] * len(shift), "x", None):
        with pytest.raises(BundleError, match="embedding_offset must be"):
            embedding_offset({"embedding_offset": {**found, "values": values}}, trust)


def test_int8_artifacts_carry_their_embedding_offset_and_the_predictor_removes_it(tiny_exported, digits_dir):
    """Export measures each INT8 artifact's offset on training images; every consumer of the embedding
    (predict, verify's checks, serve) gets it less that offset, in Keras' space."""
    from edgeclf.runtime import Predictor
    from edgeclf.runtime.backends.base import run_in_chunks
    from edgeclf.runtime.inputs import to_batch

    bundle, records = tiny_exported
    int8 = [r for r in records if r["format"].endswith("int8") and r.get("validation", {}).get("checks")]
    assert int8 and all(len(r["embedding_offset"]["values"]) == bundle.meta["trust"]["familiarity"]["dimension"]
                        for r in int8)
    assert not any("embedding_offset" in r for r in records if not r["format"].endswith("int8"))
    batch = to_batch([str(f) for f in sorted((digits_dir / "test").rglob("*.png"))[:8]], bundle.image_size)
    with Predictor.load(bundle.path, int8[0]["format"]) as predictor:
        raw = run_in_chunks(predictor.backend, batch, 8, ("embedding",))["embedding"]
        np.testing.assert_allclose(predictor.infer_outputs(batch)[1], raw - np.asarray(
            int8[0]["embedding_offset"]["values"], np.float32), rtol=1e-6)
        np.testing.assert_array_equal(predictor.embeddings(batch), predictor.infer_outputs(batch)[1])
