"""A picture of the INT8 per-layer error report: the layers ranked by the error their
quantization adds, and which ones each INT8 artifact keeps in FP32."""

from __future__ import annotations

from pathlib import Path

from edgeclf.fsio import atomic_path

#: The INT8 artifacts with a per-layer report, and how the plot marks the layers each keeps in FP32.
MARKERS = {"onnx-int8": ("o", "tab:red"), "openvino-int8": ("s", "tab:green")}


def plot_layer_errors(records: list[dict], path: Path, top: int = 30) -> Path | None:
    """Bar chart of the ``top`` layers' added noise-to-signal ratio (log scale), worst at the top,
    with a marker beside each layer an INT8 artifact kept in FP32. Written atomically to ``path``.

    Returns:
        ``path``, or None when no record carries a per-layer report.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {r["format"]: r["quantization"] for r in records if "layers" in (r.get("quantization") or {})}
    if not reports:
        return None
    layers = next(iter(reports.values()))["layers"][:top]  # the ranking is shared by the searches
    names = [layer["node"] for layer in layers]
    errors = [max(layer["added_nsr"], 1e-9) for layer in layers]  # log scale: a layer may add none
    fig, ax = plt.subplots(figsize=(9, max(4.0, 0.28 * len(names) + 1.5)))
    try:
        rows = range(len(names))
        ax.barh(rows, errors, color="tab:blue", alpha=0.7, label="added NSR (FP32 vs INT8)")
        ax.set_xscale("log")
        ax.set_yticks(rows, [n[-38:] for n in names], fontsize=7)
        ax.invert_yaxis()
        for fmt, report in reports.items():
            marker, color = MARKERS.get(fmt, ("^", "tab:gray"))
            kept = set(report["kept_fp32"])
            rows_kept = [i for i, n in enumerate(names) if n in kept]
            ax.scatter([max(errors) * 2.5] * len(rows_kept), rows_kept, marker=marker, color=color,
                       label=f"{fmt}: kept in FP32 ({report['kept_fp32_layers']} layers in all)")
        ax.set_xlabel("noise-to-signal ratio INT8 adds at the layer (log)")
        ax.set_title("INT8 per-layer error, worst first")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
