"""Evaluation of an integer classifier: classification and integer-distance metrics.

Both views matter for integer answers: accuracy and macro precision/recall/F1 treat
labels as classes; MAE and RMSE of the predicted integers say how far off the wrong
answers are (predicting 6 for a 7 is better than predicting 0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def classification_metrics(
    true_values: np.ndarray, pred_values: np.ndarray, labels: Sequence[int]
) -> dict[str, Any]:
    """Metrics of predicted integers against true integers.

    Returns:
        A JSON-ready dict: ``n``, ``accuracy``, macro ``precision``/``recall``/``f1``,
        ``mae``, ``rmse``, ``per_class`` (scikit-learn's report, keyed by label) and
        ``confusion_matrix`` (``labels`` plus ``matrix`` with rows = true labels).
    """
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        mean_absolute_error,
        mean_squared_error,
        precision_recall_fscore_support,
    )

    y_true = np.asarray(true_values, dtype=np.int64)
    y_pred = np.asarray(pred_values, dtype=np.int64)
    labels = [int(v) for v in labels]
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=[str(v) for v in labels],
        output_dict=True, zero_division=0,
    )
    per_class = {
        str(v): {k: (int(x) if k == "support" else float(x)) for k, x in report[str(v)].items()}
        for v in labels
    }
    return {
        "n": int(y_true.size),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "rmse": float(math.sqrt(mean_squared_error(y_true, y_pred))),
        **error_distribution(y_true, y_pred),
        "per_class": per_class,
        "confusion_matrix": {
            "labels": labels,
            "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
    }


#: The |error| bins of :func:`error_distribution`: exact, off by 1, off by 2, off by 3 or more.
ERROR_BINS = ("0", "1", "2", ">=3")


def error_distribution(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """How far off the predicted integers are: the share of images at |error| 0, 1, 2 and >= 3
    (the difference of the integers themselves, so labels 3 and 10 are 7 apart), and the
    share off by two or more, the mistakes an ordinal loss and median decoding aim at."""
    error = np.abs(np.asarray(y_true, dtype=np.int64) - np.asarray(y_pred, dtype=np.int64))
    n = max(1, error.size)
    counts = [int((error == 0).sum()), int((error == 1).sum()), int((error == 2).sum()), int((error >= 3).sum())]
    return {"abs_error": {"bins": list(ERROR_BINS), "counts": counts, "shares": [c / n for c in counts]},
            "off_by_2_or_more": counts[2] / n + counts[3] / n}


def save_error_png(metrics: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Draw the |error| distribution (share of images per bin) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeclf.fsio import atomic_path

    distribution = metrics["abs_error"]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    try:
        bars = ax.bar(distribution["bins"], distribution["shares"], color="#4a7ab5")
        for bar, count in zip(bars, distribution["counts"], strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), str(count), ha="center", va="bottom",
                    fontsize=8)
        ax.set_xlabel("|predicted integer - true integer|")
        ax.set_ylabel("share of images")
        ax.set_ylim(0, 1.05)
        ax.set_title(title or f"off by 2 or more: {metrics['off_by_2_or_more']:.1%}")
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def format_metrics(metrics: dict[str, Any]) -> str:
    """One human-readable line of the headline figures."""
    return (
        f"n={metrics['n']}  accuracy={metrics['accuracy']:.4f}  precision={metrics['precision']:.4f}  "
        f"recall={metrics['recall']:.4f}  f1={metrics['f1']:.4f}  mae={metrics['mae']:.4f}  "
        f"rmse={metrics['rmse']:.4f}"
        + (f"  off_by_2+={metrics['off_by_2_or_more']:.4f}" if "off_by_2_or_more" in metrics else "")
    )


def save_confusion_png(confusion: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Draw the confusion matrix (counts, rows = true label) to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from edgeclf.fsio import atomic_path

    labels = confusion["labels"]
    matrix = np.asarray(confusion["matrix"])
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), [str(v) for v in labels])
        ax.set_yticks(range(len(labels)), [str(v) for v in labels])
        ax.set_xlabel("predicted integer")
        ax.set_ylabel("true integer")
        ax.set_title(title or "confusion matrix")
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                        color="white" if matrix[i, j] > threshold else "black", fontsize=8)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
