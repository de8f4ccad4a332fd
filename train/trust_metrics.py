"""What the bundle's trust file gives on labelled images: evaluate's calibration, interval and familiarity figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeclf.trust import (DEFAULT_ALPHA, DEFAULT_COVERAGE, conformal_quantile, expected_calibration_error,
                           intervals, reliability, scaled_probabilities)
from edgeclf.trust_file import Trust

#: The false-alarm settings reported: the default and a looser one.
ALPHAS = (DEFAULT_ALPHA, 0.05)
BINS = 15


def trust_metrics(trust: Trust, logits: np.ndarray, embedding: np.ndarray, true_index: np.ndarray,
                  coverage: float = DEFAULT_COVERAGE) -> dict[str, Any]:
    """ECE before and after the temperature, the intervals' coverage and mean width, and the share
    of these (familiar, by assumption) images flagged unfamiliar at each setting of ALPHAS."""
    raw, calibrated = scaled_probabilities(logits), scaled_probabilities(logits, trust.temperature)
    spans = intervals(calibrated, conformal_quantile(trust.interval_calibration, coverage))
    inside = (spans[:, 0] <= true_index) & (true_index <= spans[:, 1])
    p = trust.familiarity.p_values(embedding)
    return {
        "images": int(len(logits)), "temperature": trust.temperature,
        "ece_15_bins": {"before": expected_calibration_error(raw, true_index, BINS),
                        "after": expected_calibration_error(calibrated, true_index, BINS)},
        "interval": {"coverage_asked": coverage, "coverage_reached": float(inside.mean()),
                     "mean_labels_spanned": float((spans[:, 1] - spans[:, 0] + 1).mean()),
                     "single_label_share": float((spans[:, 0] == spans[:, 1]).mean())},
        "false_alarms": {f"{alpha:g}": float(np.mean(p <= alpha)) for alpha in ALPHAS},
    }


def save_reliability_png(logits: np.ndarray, true_index: np.ndarray, temperature: float, path: str | Path) -> None:
    """Accuracy against confidence in 15 bins, before and after the temperature, to a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeclf.fsio import atomic_path

    fig, ax = plt.subplots(figsize=(4.5, 4))
    try:
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=1, label="perfect calibration")
        for t, name, colour in ((1.0, "raw logits", "#c05050"), (temperature, f"temperature {temperature:.2f}",
                                                                   "#4a7ab5")):
            p = scaled_probabilities(logits, t)
            confidence, accuracy, _ = reliability(p, true_index, BINS)
            ax.plot(confidence, accuracy, marker="o", color=colour,
                    label=f"{name}: ECE {expected_calibration_error(p, true_index, BINS):.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability, {len(logits)} images")
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
