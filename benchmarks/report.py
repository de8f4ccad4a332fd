"""Writing benchmark results: JSON, a Markdown table, a PNG chart, and the bundle's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeclf.benchmarks.harness import AUXILIARY
from edgeclf.bundle import update_bundle
from edgeclf.fsio import atomic_path, atomic_write_bytes, atomic_write_json


def _f(value: Any, fmt: str, empty: str = "") -> str:
    return empty if value is None else format(value, fmt)


def _fp32_layers(row: dict[str, Any]) -> str:
    """"0/123": an INT8 artifact's layers kept in FP32 of its quantizable ones."""
    return f"{row['fp32_layers']}/{row['quantizable_layers']}" if "quantizable_layers" in row else ""


def markdown_table(result: dict[str, Any]) -> str:
    env = result["environment"]
    h, w = result["image_size"]
    lines = [
        f"{env['cpu']} ({env['cores']} cores; {', '.join(env['cpu_flags']) or 'no AVX-512/VNNI/AMX'}), "
        f"{'GPU ' + env['gpu_compute_capability'] if env['gpu_compute_capability'] else 'no GPU'}; "
        f"{h}x{w} input; accuracy on {result['heldout_images']} held-out images (the bundle's verification set).",
        "",
        "| name | precision | batch | p50 ms | p99 ms | images/s | Predictor p50 ms | overhead | familiarity | "
        "x model.predict | x ORT FP32 | x own FP32 | FP32 layers | accuracy | agreement | MB | load s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | | {r['batch']} | failed: {r['error'][:80]} |" + " |" * 13)
            continue
        overhead = _f(r.get("overhead_pct"), "+.1f")
        lines.append(
            f"| {r['name']} | {r.get('precision') or ''} | {r['batch']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['throughput_ips']:.1f} | {_f(r.get('predictor_p50_ms'), '.2f')} | "
            f"{overhead + '%' if overhead else ''} | {_f(r.get('familiarity_pct'), '.1f', '')}"
            f"{'%' if r.get('familiarity_pct') is not None else ''} | {_f(r.get('speedup_vs_predict'), '.1f')} | "
            f"{_f(r.get('speedup_vs_onnx_fp32'), '.2f')} | {_f(r.get('speedup_vs_backend_fp32'), '.2f')} | "
            f"{_fp32_layers(r)} | {_f(r.get('accuracy'), '.4f')} | "
            f"{_f(r.get('agreement'), '.4f')} | {_f(r.get('size_mb'), '.1f')} | {_f(r.get('load_s'), '.2f')} |"
        )
    return "\n".join(lines) + "\n" + end_to_end_table(result)


def end_to_end_table(result: dict[str, Any]) -> str:
    """The whole path from a camera picture, per artifact at batch 1, and the folder row."""
    whole = result.get("end_to_end")
    if not whole or not whole.get("rows"):
        return ""
    first = next((r for r in whole["rows"] if r["status"] == "ok"), whole["rows"][0])
    jw, jh = first.get("jpeg_size") or ("?", "?")
    fw, fh = first.get("frame_size") or ("?", "?")
    lines = ["", f"End to end at batch 1, `Predictor.predict` to the integer: from a {jw}x{jh} JPEG file, a PNG "
             f"of the same picture, a {fw}x{fh} uint8 array ({whole.get('pictures', '')}). x model: over the "
             f"backend's own call on a ready frame, timed interleaved with it.", "",
             "| name | model ms | JPEG ms | x model | decode ms | resize ms | PNG ms | x model | frame ms | x model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in whole["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} |" + " |" * 8)
            continue
        lines.append(f"| {r['name']} | {r['model_p50_ms']:.2f} | {r['jpeg_p50_ms']:.1f} | {r['jpeg_x_model']:.2f} | "
                     f"{r['decode_p50_ms']:.1f} | {r['resize_p50_ms']:.1f} | {r['png_p50_ms']:.1f} | "
                     f"{r['png_x_model']:.2f} | {r['frame_p50_ms']:.1f} | {r['frame_x_model']:.2f} |")
    folder = whole.get("folder")
    if folder:
        lines += ["", f"`Predictor.predict` over {folder['images']} camera JPEGs as one list ({folder['name']}, batch "
                      f"{folder['batch']}, {folder['decode_threads']} decode threads): {folder['images_per_s']:.1f} "
                      f"images/s, {100 * folder['share_of_model']:.0f}% of the backend's "
                      f"{folder['model_images_per_s']:.1f} images/s on ready frames at that batch."]
    return "\n".join(lines) + "\n"


def save_chart(result: dict[str, Any], path: Path, batch: int = 1) -> None:
    """Latency per contestant at ``batch`` (p50 bar, p99 whisker), accuracy beside.

    Raises:
        ImportError: matplotlib is not installed (a device install has no need of it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["batch"] == batch and r["status"] == "ok" and r["name"] not in AUXILIARY]
    rows.sort(key=lambda r: r["p50_ms"])
    names = [r["name"] for r in rows]
    fig, (ax_lat, ax_acc) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True,
                                         gridspec_kw={"width_ratios": [3, 1]})
    p50 = [r["p50_ms"] for r in rows]
    p99 = [r["p99_ms"] for r in rows]
    ax_lat.barh(names, p50, color="#4C72B0", label="p50")
    ax_lat.errorbar(p99, names, fmt="|", color="black", markersize=12, label="p99")
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel(f"latency per call, ms (batch {batch}, log scale)")
    ax_lat.legend(loc="lower right")
    ax_lat.invert_yaxis()
    ax_acc.barh(names, [100 * (r.get("accuracy") or 0) for r in rows], color="#55A868")
    low = min((100 * (r.get("accuracy") or 0) for r in rows), default=0)
    ax_acc.set_xlim(max(0, low - 5), 100)
    ax_acc.set_xlabel("held-out accuracy, %")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def store_run(meta: dict[str, Any], run: dict[str, Any]) -> None:
    """Keep ``run`` in bundle.json under its machine's key, beside other machines' latest runs."""
    key = run["environment"]["machine"]["key"]
    benchmarks = meta.get("benchmarks") or {}
    machines = benchmarks.get("machines") or {}  # a bundle from before machine keys keeps none
    machines[key] = run
    meta["benchmarks"] = {"latest": key, "machines": machines}


def write_results(result: dict[str, Any], out_dir: Path, bundle_path: Path | None = None) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in ``out_dir``; the rows also go into bundle.json, under
    this machine's key (see :mod:`edgeclf.runtime.fingerprint`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "chart": out_dir / "bench.png"}
    atomic_write_json(paths["json"], result)
    atomic_write_bytes(paths["markdown"], markdown_table(result).encode("utf-8"))
    try:
        save_chart(result, paths["chart"], batch=min(r["batch"] for r in result["rows"]))
    except ImportError:
        del paths["chart"]  # no matplotlib on a device install: the JSON and the table say it all
    if bundle_path is not None:
        with update_bundle(bundle_path) as bundle:  # locked: a concurrent export keeps its records
            store_run(bundle.meta, {k: result[k] for k in ("created", "environment", "config", "rows")})
    return paths
