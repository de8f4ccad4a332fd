"""Evaluation metrics against values worked out by hand on a small fixed example."""

from __future__ import annotations

import math

import pytest

from edgeclf.train.metrics import classification_metrics


def test_metrics_of_a_small_example_match_the_hand_computed_values():
    # Labels -2, 3 and 10; two mistakes: a -2 read as 3 (off by 5) and a 10 read as -2 (off by 12).
    true = [-2, -2, 3, 3, 10, 10]
    pred = [-2, 3, 3, 3, 10, -2]
    m = classification_metrics(true, pred, [-2, 3, 10])
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["mae"] == pytest.approx((5 + 12) / 6)
    assert m["rmse"] == pytest.approx(math.sqrt((5 ** 2 + 12 ** 2) / 6))
    # Per class (precision, recall): -2 (1/2, 1/2), 3 (2/3, 2/2), 10 (1/1, 1/2); macro averages.
    assert m["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["3"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1-score": pytest.approx(0.8),
                                   "support": 2}
    assert m["confusion_matrix"] == {"labels": [-2, 3, 10], "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}


def test_a_label_never_seen_nor_predicted_counts_as_zero_not_an_error():
    m = classification_metrics([3, 4], [3, 4], [3, 4, 7])
    assert m["accuracy"] == 1.0 and m["mae"] == 0.0 and m["rmse"] == 0.0
    assert m["per_class"]["7"]["support"] == 0 and m["recall"] == pytest.approx(2 / 3)
