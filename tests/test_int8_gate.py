"""The INT8 gate: decided images, the paired accuracy test, confidence bounds, the FP32-share
refusal, the CPU class INT8 is quantized for, and the BF16 yardstick of the decided margin.
Hand-computed cases; the export tests run the gate on real artifacts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgeclf.errors import InvalidInputError
from edgeclf.runtime.checks import Tolerance, compare, tolerance_for
from edgeclf.runtime.fidelity import (binomial_sf, clopper_pearson_lower, decided_agreement, margin_shift, margins,
                                      paired_accuracy_test)
from edgeclf.runtime.hardware import Hardware


def test_clopper_pearson_lower_bounds_match_hand_computed_values():
    # k = n: P(X >= n) = p^n = 0.05 at the bound.
    assert clopper_pearson_lower(256, 256) == pytest.approx(0.05 ** (1 / 256), abs=1e-9)
    assert clopper_pearson_lower(256, 256) < 0.99  # 256 images cannot show 0.99
    # k = n - 1: P(X >= n-1) = p^n + n p^(n-1) (1-p) = 0.05, solved here by hand-written Newton steps.
    n, p = 100, 0.97
    for _ in range(50):
        f = p ** n + n * p ** (n - 1) * (1 - p) - 0.05
        df = n * p ** (n - 1) + n * (n - 1) * p ** (n - 2) * (1 - p) - n * p ** (n - 1)
        p -= f / df
    assert clopper_pearson_lower(99, 100) == pytest.approx(p, abs=1e-9)
    assert clopper_pearson_lower(0, 10) == 0.0 and clopper_pearson_lower(5, 0) == 0.0


def test_binomial_tail_matches_hand_computed_values():
    assert binomial_sf(3, 4, 0.5) == pytest.approx(5 / 16)
    assert binomial_sf(0, 7, 0.3) == 1.0 and binomial_sf(8, 7, 0.3) == 0.0
    assert binomial_sf(10, 10, 0.75) == pytest.approx(0.75 ** 10)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 600), data=st.data())
def test_the_device_statistics_equal_scipys(n, data):
    """runtime/fidelity.py stays numpy-only for the device; here SciPy holds it to account."""
    from scipy.stats import beta, binom, binomtest

    k = data.draw(st.integers(0, n), label="k")
    p = data.draw(st.floats(0.001, 0.999), label="p")
    assert binomial_sf(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)
    # Clopper-Pearson's one-sided lower bound is the alpha quantile of Beta(k, n - k + 1).
    assert clopper_pearson_lower(k, n) == pytest.approx(beta.ppf(0.05, k, n - k + 1) if k else 0.0, abs=1e-9)
    lost = data.draw(st.integers(0, n), label="lost")
    won = data.draw(st.integers(0, n - lost), label="won")
    keras_right = np.r_[np.ones(lost, bool), np.zeros(won, bool), np.ones(n - lost - won, bool)]
    artifact_right = np.r_[np.zeros(lost, bool), np.ones(won, bool), np.ones(n - lost - won, bool)]
    result = paired_accuracy_test(keras_right, artifact_right, max_drop=0.005)
    if lost + won:
        p0 = min(1.0, (1.0 + n * 0.005 / (lost + won)) / 2)
        expected = binomtest(lost, lost + won, p0, alternative="greater").pvalue
        assert result["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("lost,won,significant", [
    (10, 0, False),  # p0 = (1 + 1000*0.005/10)/2 = 0.75; P(X >= 10) = 0.75^10 = 0.056
    (12, 0, True),  # p0 = (1 + 5/12)/2; P(X >= 12) = p0^12 = 0.016
    (30, 25, False),  # many discordant images both ways: a drop of 0.5 pt, not significantly more
])
def test_the_paired_test_fails_only_a_significant_drop_beyond_the_allowed_one(lost, won, significant):
    n = 1000
    keras = np.zeros(n, bool)
    artifact = np.zeros(n, bool)
    keras[:lost] = True  # Keras right, the artifact wrong
    artifact[lost:lost + won] = True  # the reverse
    keras[900:], artifact[900:] = True, True  # both right
    result = paired_accuracy_test(keras, artifact, 0.005, 0.05)
    assert (result["keras_right_artifact_wrong"], result["artifact_right_keras_wrong"]) == (lost, won)
    p0 = min(1.0, (1 + n * 0.005 / (lost + won)) / 2)
    expected = sum(math.comb(lost + won, j) * p0 ** j * (1 - p0) ** (lost + won - j)
                   for j in range(lost, lost + won + 1))
    assert result["p_value"] == pytest.approx(expected) and result["significant"] is significant
    assert result["drop"] == pytest.approx((lost - won) / n)


def test_margins_and_how_far_a_change_moves_them():
    reference = np.array([[5.0, 1.0, 0.5], [2.0, 2.1, 0.0]])
    assert margins(reference).tolist() == pytest.approx([4.0, 0.1])
    moved = reference + np.array([[-1.0, 1.0, 0.0], [0.0, -0.5, 0.2]])
    # Image 0: class 1 gains 1 and the top-1 loses 1: the gap closes by 2. Image 1 (top-1 is class 1,
    # which loses 0.5): class 0 closes by 0.5, class 2 by 0.7.
    assert margin_shift(reference, moved).tolist() == pytest.approx([2.0, 0.7])
    assert margin_shift(reference, reference + 3.0).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)  # a shift of every logit moves nothing


def test_agreement_counts_only_decided_images():
    reference = np.array([[9.0, 0.0], [0.0, 9.0], [1.0, 0.9], [0.95, 1.0]])
    flipped_near_ties = np.array([0, 1, 1, 0])
    result = decided_agreement(reference, flipped_near_ties, 1.0)
    assert (result["decided_images"], result["agreement"], result["decided_share"]) == (2, 1.0, 0.5)
    flipped_decided = np.array([1, 1, 0, 1])
    assert decided_agreement(reference, flipped_decided, 1.0)["agreement"] == 0.5


def _gate(margin: float | None) -> Tolerance:
    return Tolerance(rtol=None, atol=0.0, min_agreement=0.99, max_accuracy_drop=0.005, decided_margin=margin,
                     paired_alpha=0.05)


def test_compare_passes_an_artifact_that_flips_only_near_ties_and_fails_one_that_flips_decided_images():
    rng = np.random.default_rng(0)
    n, labels = 400, [3, 4, 5]
    reference = rng.normal(0, 1, (n, 3)).astype(np.float32)
    reference[np.arange(n), rng.integers(0, 3, n)] += 6.0  # decided images
    ties = np.arange(0, n, 10)  # a tenth are near-ties
    reference[ties] = [1.0, 0.98, -2.0]
    truth = np.asarray(labels)[reference.argmax(1)]
    truth[ties[1::2]] = labels[1]  # the near-ties are coin flips for Keras too: right on half of them
    near_ties_flipped = reference.copy()
    near_ties_flipped[ties] = [0.98, 1.0, -2.0]
    report = compare("int8", near_ties_flipped, np.asarray(labels)[near_ties_flipped.argmax(1)], reference, truth,
                     labels, _gate(0.5))
    assert report["top1_agreement"] == pytest.approx(0.9) and report["passed"], report["checks"]
    assert report["decided"]["decided_images"] == n - len(ties) and report["decided"]["agreement"] == 1.0
    # Where every image counts, the same artifact fails: the old gate chased near-ties.
    old = compare("int8", near_ties_flipped, np.asarray(labels)[near_ties_flipped.argmax(1)], reference, truth,
                  labels, Tolerance(None, 0.0, 0.99, 0.005))
    assert not old["passed"]
    decided_flipped = reference.copy()
    decided_flipped[1:40:2] = decided_flipped[1:40:2, ::-1]  # decided images answered otherwise (those not
    # topped by the middle class: about 13 of these 20)
    report = compare("int8", decided_flipped, np.asarray(labels)[decided_flipped.argmax(1)], reference, truth,
                     labels, _gate(0.5))
    assert not report["passed"]
    failed = {c["check"].split(",")[0] for c in report["checks"] if not c["passed"]}
    assert failed == {"top-1 agreement", "accuracy drop > 0.005 (p-value)"}
    assert 0 < report["top1_agreement_lower_95"] < report["top1_agreement"]


def test_a_recorded_gate_is_what_verify_checks_again():
    gate = _gate(1.25)
    from dataclasses import asdict

    assert tolerance_for("int8", {"validation": {"tolerance": asdict(gate)}}) == gate
    old = {"rtol": None, "atol": 0.0, "min_agreement": 0.99, "max_accuracy_drop": 0.005}  # an older bundle's record
    assert tolerance_for("int8", {"validation": {"tolerance": old}}) == Tolerance(**old)


def test_a_candidate_with_too_many_fp32_layers_is_refused():
    from edgeclf.export.int8_search import Int8Target, fp32_share_check

    target = Int8Target()
    assert target.most_fp32_layers(94) == 9 and target.most_fp32_layers(10) == 1
    assert fp32_share_check({"kept_fp32_layers": 9, "quantizable_layers": 94}, target)["passed"]
    refused = fp32_share_check({"kept_fp32_layers": 44, "quantizable_layers": 94}, target)
    assert not refused["passed"] and refused["value"] == pytest.approx(44 / 94)
    assert refused["check"] == "layers kept in FP32 (44 of 94)"
    for bad in ({"max_fp32_share": 1.5}, {"paired_alpha": 0.0}, {"max_seconds": float("nan")}):
        with pytest.raises(InvalidInputError, match="Received"):
            Int8Target(**bad)


def test_the_search_never_keeps_more_layers_than_the_cap(monkeypatch):
    """The doubling search is handed only the layers the cap allows: a model that would need 50
    of 100 layers in FP32 ends with at most 10, the target missed."""
    import time

    from edgeclf.export.int8_search import Int8Target, _search

    units = [[f"node{i}"] for i in range(100)]
    target = Int8Target()
    trials = [{"layers": 0, "passed": False, "agreement": 0.9, "accuracy_drop": 0.0}]

    def trial(keep, layers):
        return {"layers": layers, "passed": layers >= 50, "agreement": 0.9 + layers / 1000, "accuracy_drop": 0.0}

    best = _search("onnx-int8", trials, units[:target.most_fp32_layers(len(units))], trial, target,
                   time.perf_counter())
    assert best == 10 and max(t["layers"] for t in trials) == 10 and not any(t["passed"] for t in trials)


def _hardware(*flags: str) -> Hardware:
    return Hardware("ARM" if "asimd" in flags else "AuthenticAMD", "test CPU", frozenset(flags), 2, None)


@pytest.mark.parametrize("flags,int8_class,bf16", [
    (("avx2",), "avx2", False),  # u8 x s8 pairs summed in int16: 7-bit weights
    (("avx2", "avx512f", "avx512_vnni"), "vnni", False),
    (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "vnni", True),  # AMD Zen 4/5
    (("avx2", "avx512_vnni", "amx_bf16", "amx_int8", "avx512_bf16"), "vnni", True),  # Sapphire Rapids
    (("asimd", "asimddp"), "vnni", False),  # ARM with dot product
    # ARM without (a Raspberry Pi 4): no saturation, measured on an emulated Cortex-A72 (tests/arm_leg.py)
    (("asimd",), "vnni", False),
])
def test_the_cpu_class_int8_is_quantized_for(flags, int8_class, bf16):
    from edgeclf.export.exporter import ExportOptions

    hw = _hardware(*flags)
    assert hw.int8_class == int8_class and hw.bf16 is bf16
    assert ExportOptions().int8_class(hw) == int8_class  # export defaults to its own machine's class
    assert ExportOptions(int8_cpu="avx2").int8_class(hw) == "avx2"  # and can be told the other
    assert ExportOptions(int8_cpu="vnni").int8_class(hw) == "vnni"


def test_an_unknown_cpu_class_is_refused():
    from edgeclf.export.exporter import ExportOptions

    with pytest.raises(InvalidInputError, match=r"INT8 CPU class must be one of \['avx2', 'vnni'\].*Received: 'sse'"):
        ExportOptions(int8_cpu="sse")


def test_bf16_rounding_is_round_to_nearest_even():
    from edgeclf.export.int8_gate import round_to_bf16

    values = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -12, 3.14159, -2.71828], np.float32)
    # BF16 keeps 7 mantissa bits: 1 + 2^-8 is a tie (to even: 1.0), 1 + 3*2^-8 a tie to 1 + 2^-6.
    assert round_to_bf16(values).tolist() == [1.0, 1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7, 3.140625, -2.71875]


def test_the_bf16_emulation_moves_logits_a_little_and_keeps_the_graph_runnable(tiny_exported):
    """The yardstick of the decided margin, on the small model: BF16 moves the logits (it is a change
    of arithmetic) by far less than the logits' scale; the derived margin is scale x its quantile."""
    pytest.importorskip("onnxruntime")
    from edgeclf.export.int8_gate import MarginRule, bf16_logits, derive_margin
    from edgeclf.verification import load_verification_set

    bundle, _ = tiny_exported
    reference = load_verification_set(bundle)
    images, keras = reference.images[:64], reference.logits[:64]
    moved = bf16_logits(bundle.path / "model.onnx", images)
    change = np.abs(moved - keras)
    assert 0 < change.max() < 0.1 * np.abs(keras).max()
    record = derive_margin(bundle.path / "model.onnx", images, keras, MarginRule(quantile=0.9, scale=3.0, floor=0.0))
    assert record["margin"] == pytest.approx(3.0 * np.quantile(margin_shift(keras, moved), 0.9), rel=1e-6)
    assert record["decided_share"] == pytest.approx(np.mean(margins(keras) >= record["margin"]))
    # Never below the floor (log-odds of 1 by default): BF16 is no yardstick where logits are small.
    floored = derive_margin(bundle.path / "model.onnx", images, keras, MarginRule(quantile=0.9, scale=3.0,
                                                                                   floor=1e3))
    assert floored["margin"] == 1e3 and floored["floored"] and floored["from_bf16"] == pytest.approx(record["margin"])
    given = derive_margin(bundle.path / "model.onnx", images, keras, MarginRule(margin=0.25))
    assert given["margin"] == 0.25 and "bf16_shift" not in given
    for bad in ({"scale": 0.0}, {"floor": float("nan")}, {"margin": -1.0}, {"quantile": 1.5}):
        with pytest.raises(InvalidInputError, match="Received"):
            MarginRule(**bad)


def test_no_decided_image_shows_nothing_and_fails():
    reference = np.array([[1.0, 0.9], [0.5, 0.45]])  # every image a near-tie
    report = compare("int8", reference, np.array([3, 3]), reference, np.array([3, 3]), [3, 4], _gate(5.0))
    assert report["decided"]["decided_images"] == 0 and not report["passed"]


def test_an_int8_record_exported_without_validation_is_verified_by_the_gate_its_search_recorded():
    from dataclasses import asdict

    from edgeclf.export.int8_search import Int8Target

    record = {"validation": {"skipped": "validation switched off (--no-validate)"},
              "quantization": {"target": asdict(Int8Target()), "decided": {"margin": 1.5}}}
    assert tolerance_for("int8", record) == _gate(1.5)
    assert tolerance_for("int8", {"quantization": {"target": {"min_agreement": "x"}, "decided": {"margin": 1}}}) \
        == Tolerance(None, 0.0, 0.95, 0.02)  # a malformed record: the defaults


def test_an_arm_board_is_named_by_its_core_and_an_emulated_one_says_so():
    """On ARM the flags come from the auxiliary vector (what QEMU sets for the CPU it emulates); the name
    from /proc/cpuinfo, which under QEMU's user mode is the x86 host's and must not pass for a board's."""
    from edgeclf.runtime.hardware import _arm_model

    pi4 = {"processor": "0", "Features": "fp asimd evtstrm crc32 cpuid", "CPU implementer": "0x41",
           "CPU part": "0xd08", "Model": "Raspberry Pi 4 Model B Rev 1.4"}
    assert _arm_model(pi4) == "Raspberry Pi 4 Model B Rev 1.4: Cortex-A72 (Raspberry Pi 4)"
    host = {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC", "flags": "avx2 avx512_vnni"}
    assert _arm_model(host).startswith("AArch64 under emulation (QEMU; /proc/cpuinfo is the host's: AMD EPYC")
