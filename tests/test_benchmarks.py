"""The timing core: warm-up excluded, interleaving, and the statistics."""

from __future__ import annotations

import numpy as np
import pytest

from edgeclf.benchmarks.timing import Timing, time_interleaved
from edgeclf.errors import InvalidInputError
from tests.conftest import ManualClock
def test_warm_up_is_excluded_and_calls_are_interleaved():
    clock, calls = ManualClock(), []

    def fn(name, cost):
        def call():
            calls.append(name)
            # The first calls are slow (a cold cache): they must fall in the warm-up.
            clock.advance(1.0 if len(calls) <= 2 else cost)
        return call

    timings = time_interleaved({"a": fn("a", 0.001), "b": fn("b", 0.003)}, warmup_s=1.5, duration_s=0.04,
                               min_runs=3, clock=clock)
    assert calls[:4] == ["a", "b", "a", "b"]  # round-robin from the start
    np.testing.assert_allclose(timings["a"].samples_ms, 1.0)
    np.testing.assert_allclose(timings["b"].samples_ms, 3.0)
    assert timings["a"].runs == timings["b"].runs == 10  # 10 rounds of 4 ms reach 40 ms
    # Back to back, 1 ms calls of 8 images give 8,000 images/s; 3 ms calls, a third of that.
    assert timings["a"].throughput(8) == pytest.approx(8000) and timings["b"].throughput(8) == pytest.approx(8000 / 3)


def test_statistics_are_the_percentiles_of_the_samples():
    samples = np.arange(1, 101, dtype=float)  # 1..100 ms
    stats = Timing(samples).stats()
    assert stats["p50_ms"] == pytest.approx(50.5) and stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01) and stats["mean_ms"] == 50.5 and stats["min_ms"] == 1.0
    assert stats["runs"] == 100 and stats["total_ms"] == 5050.0


def test_run_limits_and_bad_settings():
    clock = ManualClock()
    timings = time_interleaved({"x": lambda: clock.advance(1.0)}, warmup_s=0, duration_s=1e9, min_runs=2,
                               max_runs=5, clock=clock)
    assert timings["x"].runs == 5
    with pytest.raises(InvalidInputError, match="nothing to time"):
        time_interleaved({})
    with pytest.raises(InvalidInputError, match="min_runs"):
        time_interleaved({"x": lambda: None}, min_runs=0)


@pytest.fixture()
def bench_bundle(tiny_exported, tmp_path):
    import shutil

    path = tmp_path / "bundle"
    shutil.copytree(tiny_exported[0].path, path, ignore=shutil.ignore_patterns("*.engine", "*.tflite"))
    return path


def test_bench_writes_well_formed_results_and_stores_them(bench_bundle, tmp_path):
    import json

    from edgeclf.benchmarks.harness import PREDICT, TF_FUNCTION, BenchConfig, run_bench
    from edgeclf.benchmarks.report import write_results
    from edgeclf.bundle import Bundle
    from edgeclf.runtime.selection import choose
    from edgeclf.runtime.hardware import detect
    from edgeclf.runtime.fingerprint import machine_key

    from edgeclf.benchmarks.end_to_end import camera_picture

    cameras = tmp_path / "cameras"  # the user's own pictures (--images): three small ones keep this fast
    cameras.mkdir()
    for i in range(3):
        camera_picture((640, 480), i).save(cameras / f"camera_{i}.jpg", quality=92)
    config = BenchConfig(artifacts=("onnx", "onnx-int8", "openvino-int8"), batches=(1, 4), duration_s=0.5,
                         warmup_s=0.2, min_runs=3, images=cameras, folder_images=3)
    result = run_bench(bench_bundle, config)
    paths = write_results(result, tmp_path / "out", bench_bundle)
    saved = json.loads(paths["json"].read_text())
    assert saved["rows"] == result["rows"] and saved["environment"]["cores"] >= 1
    assert {"onnxruntime", "numpy"} <= set(saved["environment"]["versions"])
    names = {(r["name"], r["batch"]) for r in saved["rows"]}
    p50_of = lambda name, batch: next(r["p50_ms"] for r in saved["rows"] if (r["name"], r["batch"]) == (name, batch))  # noqa: E731
    assert names == {(n, b) for n in ("onnx", "onnx-int8", "openvino-int8", PREDICT, TF_FUNCTION, "decode",
                                      "familiarity") for b in (1, 4)}
    for row in saved["rows"]:
        assert row["status"] == "ok" and row["runs"] >= 3
        assert row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"]
        # Every image of every timed call, over the time those calls took.
        assert row["throughput_ips"] * row["total_ms"] / 1e3 == pytest.approx(row["batch"] * row["runs"])
        assert row["total_ms"] == pytest.approx(row["mean_ms"] * row["runs"])
        if row["artifact"]:
            assert 0.9 <= row["agreement"] <= 1.0 and row["predictor_p50_ms"] > 0 and "speedup_vs_predict" in row
            # What scoring a reading's familiarity adds to this artifact's own call, at the same batch size.
            assert row["familiarity_pct"] == pytest.approx(
                100 * p50_of("familiarity", row["batch"]) / row["p50_ms"])
    # Each INT8 row: its speed-up over the FP32 artifact of its backend, and its layers kept in FP32.
    p50 = {(r["name"], r["batch"]): r["p50_ms"] for r in saved["rows"]}
    for row in (r for r in saved["rows"] if r["name"] == "onnx-int8"):
        assert row["speedup_vs_backend_fp32"] == pytest.approx(p50[("onnx", row["batch"])] / row["p50_ms"])
        assert 0 <= row["fp32_layers"] <= 0.1 * row["quantizable_layers"]
    # The whole path from a camera picture, per artifact, beside its own backend call.
    whole = saved["end_to_end"]
    assert [r["name"] for r in whole["rows"]] == ["onnx", "onnx-int8", "openvino-int8"]
    for row in whole["rows"]:
        assert row["status"] == "ok" and row["jpeg_size"] == [640, 480] and row["frame_size"] == [1920, 1080]
        assert row["jpeg_x_model"] == pytest.approx(row["jpeg_p50_ms"] / row["model_p50_ms"])
        assert row["decode_p50_ms"] > 0 and row["resize_p50_ms"] > 0 and row["png_p50_ms"] > 0
    fastest = min(whole["rows"], key=lambda r: r["model_p50_ms"])["name"]
    assert whole["folder"]["name"] == fastest and whole["folder"]["images"] == 3 and whole["folder"]["images_per_s"] > 0
    table = paths["markdown"].read_text()
    assert table.count("\n| onnx-int8 |") == 3 and "x model.predict" in table  # two batch sizes, end to end
    assert "End to end at batch 1" in table and "camera JPEGs as one list" in table
    assert "x own FP32 | FP32 layers" in table and "| overhead | familiarity |" in table
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from edgeclf.benchmarks.publish import render

    page = render(saved, "make benchmarks")
    assert "GMAC per image" in page and "| onnx-int8 |" in page and "`make benchmarks`" in page
    _benchmarks_page_keeps_one_section_per_machine(paths["json"], tmp_path / "docs")
    # backend="auto" now picks from these results.
    stored = Bundle.load(bench_bundle).meta["benchmarks"]
    assert stored["latest"] == machine_key() and stored["machines"][machine_key()]["rows"] == result["rows"]
    assert saved["environment"]["machine"]["cpu_flags"] == sorted(detect().cpu_flags)
    assert "benchmarks" in choose(bench_bundle, "auto", None, detect()).reason


def _benchmarks_page_keeps_one_section_per_machine(bench_json, docs):
    """BENCHMARKS.md: a run replaces its own kind of machine's section and keeps the others'."""
    import contextlib
    import io
    import json

    from edgeclf.benchmarks.publish import add_run, machine_slug, main

    kept = add_run(bench_json, docs)
    assert kept.name == f"bench_299.{machine_slug(json.loads(bench_json.read_text())['environment'])}.json"
    assert kept.with_suffix(".png").is_file()
    other = json.loads(kept.read_text())
    other["environment"] = {**other["environment"], "cpu": "Intel Xeon (test)",
                            "cpu_flags": ["amx_bf16", "avx512_vnni", "avx512f"]}
    other["created"] = "2000-01-01T00:00:00+00:00"
    (docs / f"bench_299.{machine_slug(other['environment'])}.json").write_text(json.dumps(other))
    assert add_run(bench_json, docs) == kept and len(list(docs.glob("bench_299.*.json"))) == 2
    page = io.StringIO()
    with contextlib.redirect_stdout(page):
        assert main(["--docs", str(docs)]) == 0
    headings = [line for line in page.getvalue().splitlines() if line.startswith("## ")]
    assert len(headings) == 2 and headings[1].startswith("## Intel Xeon (test), ")  # newest first
    assert "(amx_bf16, avx512_vnni, avx512f)" in headings[1] and page.getvalue().count("### The arithmetic floor") == 2


def test_a_backend_failing_mid_run_becomes_a_failed_row(bench_bundle, monkeypatch):
    import json
    from dataclasses import replace

    from edgeclf.benchmarks.harness import BenchConfig, run_bench
    from edgeclf.runtime import backends
    from edgeclf.runtime.backends.onnxruntime import OnnxRuntimeBackend

    class FailsAfterAFewCalls(OnnxRuntimeBackend):
        """Real onnxruntime inference that breaks down after 8 calls, as a device might."""

        calls = 0

        def infer(self, batch):
            FailsAfterAFewCalls.calls += 1
            if FailsAfterAFewCalls.calls > 8:
                raise RuntimeError("device lost")
            return super().infer(batch)

    import sys
    import types

    module = types.ModuleType("flaky_backend")
    module.FlakyBackend = FailsAfterAFewCalls
    monkeypatch.setitem(sys.modules, "flaky_backend", module)
    from edgeclf.formats import FORMATS

    monkeypatch.setitem(backends.BACKENDS, "flaky", backends.BackendInfo(
        "flaky", "flaky_backend:FlakyBackend", ("onnxruntime",), "cpu", ("onnxruntime",)))
    monkeypatch.setitem(FORMATS, "onnx-flaky", replace(FORMATS["onnx"], name="onnx-flaky", backend="flaky"))
    meta = json.loads((bench_bundle / "bundle.json").read_text())
    meta["artifacts"]["onnx-flaky"] = dict(meta["artifacts"]["onnx"], format="onnx-flaky")
    (bench_bundle / "bundle.json").write_text(json.dumps(meta))

    result = run_bench(bench_bundle, BenchConfig(artifacts=("onnx-flaky", "onnx-int8"), batches=(1,),
                                                 duration_s=0.5, warmup_s=0.2, min_runs=3, baselines=False))
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["onnx-flaky"]["status"] == "failed" and "device lost" in rows["onnx-flaky"]["error"]
    assert rows["onnx-int8"]["status"] == "ok" and rows["onnx-int8"]["runs"] >= 3


def test_mac_count_from_onnx_equals_the_keras_layers(exported):
    from edgeclf.benchmarks.macs import count_macs
    from edgeclf.train.evaluate import load_keras_model
    from edgeclf.train.model import backbone_of

    bundle, _ = exported
    model = load_keras_model(bundle)
    expected = 0
    for layer in [*backbone_of(model).layers, *model.layers]:
        if layer.__class__.__name__ == "Conv2D":
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in, _ = layer.kernel.shape
            expected += h * w * c_out * c_in * kh * kw
        elif layer.__class__.__name__ == "Dense":
            expected += layer.kernel.shape[0] * layer.kernel.shape[1]
    assert count_macs(bundle.path / "model.onnx") == expected


def test_switching_library_gets_an_untimed_settling_call_and_order_alternates():
    clock, calls = ManualClock(), []

    def fn(name):
        def call():
            calls.append(name)
            clock.advance(0.001)
        return call

    fns = {"a|raw": fn("a|raw"), "a|predictor": fn("a|predictor"), "b|raw": fn("b|raw")}
    time_interleaved(fns, warmup_s=0, duration_s=0, min_runs=2, max_runs=2, clock=clock,
                     group=lambda name: name.split("|")[0])
    timed_rounds = calls[3:]  # after one warm-up round
    # Round 1: settle a, time a|raw and a|predictor, settle b, time b; round 2 reverses a's pair.
    assert timed_rounds == ["a|raw", "a|raw", "a|predictor", "b|raw", "b|raw",
                            "a|predictor", "a|predictor", "a|raw", "b|raw", "b|raw"]


def test_bench_command_prints_the_table_and_writes_the_files(bench_bundle, tmp_path):
    """The README's ``edgeclf bench``: one table on stdout, JSON/Markdown/PNG under --out, and a
    bad batch size or artifact name refused in one line before anything is timed."""
    import json

    from tests.conftest import run_cli

    out = run_cli("bench", str(bench_bundle), "--backends", "onnx,openvino", "--batch", "1,2", "--duration", "0.5",
                  "--warmup", "0.2", "--no-baselines", "--no-end-to-end", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "End to end" not in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| onnx |", "| openvino |"))]
    assert len(rows) == 4  # two artifacts at two batch sizes
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    from edgeclf.runtime.hardware import detect

    # On a CPU with BF16 arithmetic (AMX, AVX512_BF16) OpenVINO is also timed in BF16 (the README's promise).
    names = ("onnx", "openvino", "decode", "familiarity") + (("openvino-bf16",) if detect().bf16 else ())
    assert {(r["name"], r["batch"]) for r in saved["rows"]} == {(n, b) for n in names for b in (1, 2)}
    assert (tmp_path / "out" / "bench.md").is_file() and (tmp_path / "out" / "bench.png").is_file()

    for bad, expected in ((("--batch", "0"), "--batch must be an integer >= 1"), (("--backends", "onnx,coreml"), "coreml")):
        out = run_cli("bench", str(bench_bundle), *bad, "--duration", "0.5")
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and expected in last and "Traceback" not in out.stderr


@pytest.mark.slow  # quantizes three INT8 models again
def test_int8_fallback_times_fp32_plain_and_exported_int8_per_runtime(bench_bundle):
    """``python -m edgeclf.benchmarks.int8_fallback``: one row per INT8 artifact beside its FP32
    sibling and a plain INT8 re-made with export's quantizer; nothing left in the bundle."""
    from edgeclf.benchmarks.int8_fallback import SIBLINGS, measure_fallback

    before = sorted(p.name for p in bench_bundle.iterdir())
    rows = measure_fallback(bench_bundle, duration_s=0.5)
    assert sorted(p.name for p in bench_bundle.iterdir()) == before
    assert [r["format"] for r in rows] == [f for f in SIBLINGS if f != "tflite-int8"]  # bench_bundle has no .tflite
    for row in rows:
        assert row["agreement_fp32"] == 1.0 and row["agreement_plain"] >= 0.9
        assert min(row["p50_ms_fp32"], row["p50_ms_plain"], row["p50_ms_exported"]) > 0
        if row["kept_fp32_layers"] == 0:  # the exported artifact is plain INT8
            assert row["agreement_exported"] == row["agreement_plain"] and row["speedup_kept"] == 1.0
