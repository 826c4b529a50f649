"""Metrics from summed per-example statistics: known values on hand-made predictions, and sums over batches."""

import math

import numpy as np
import pytest
import torch

from lily.train.metrics import make_metric


def score(name: str, predictions, targets, num_classes: int = 2, batches: int = 1) -> float:
    """The metric over the whole split, its statistics summed over `batches` chunks as evaluation does."""
    metric = make_metric(name, num_classes)
    predictions, targets = torch.from_numpy(np.asarray(predictions)), torch.from_numpy(np.asarray(targets))
    chunks = zip(predictions.chunk(batches), targets.chunk(batches), strict=True)
    return metric.value(sum(metric.stats(p, t).sum(dim=0) for p, t in chunks))


def test_accuracy():
    assert score("accuracy", [1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_binary_mcc_known_value():
    # tp=3 tn=2 fp=1 fn=0: (3*2 - 1*0) / sqrt(4 * 3 * 2 * 3) = 6 / sqrt(72)
    predictions, targets = [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]
    assert score("mcc", predictions, targets) == pytest.approx(6 / math.sqrt(72))
    assert score("mcc", predictions, targets, batches=3) == pytest.approx(6 / math.sqrt(72))


def test_mcc_limits():
    assert score("mcc", [0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert score("mcc", [1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert score("mcc", [1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant prediction: 0, as sklearn defines it


def test_multiclass_mcc_matches_the_covariance_form():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    predictions = np.where(rng.random(200) < 0.6, targets, rng.integers(0, 3, 200))
    # MCC = cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) over the one-hot indicator matrices
    x, y = np.eye(3)[predictions], np.eye(3)[targets]
    x, y = x - x.mean(0), y - y.mean(0)
    expected = (x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())
    assert score("mcc", predictions.tolist(), targets.tolist(), num_classes=3, batches=7) == pytest.approx(expected)


def test_f1_of_the_positive_class_and_macro():
    # class 1: tp=2 fp=1 fn=1 -> 2*2 / (4 + 1 + 1)
    assert score("f1", [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(4 / 6)
    # three classes: per-class F1 1, 2/3, 0 -> mean 5/9
    assert score("f1", [0, 1, 1, 0], [0, 1, 2, 0], num_classes=3) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_pearson_matches_numpy_over_batches():
    rng = np.random.default_rng(1)
    targets = rng.uniform(0, 5, 300)
    predictions = targets + rng.normal(0, 1, 300)
    expected = np.corrcoef(predictions, targets)[0, 1]
    assert score("pearson", predictions.tolist(), targets.tolist(), batches=9) == pytest.approx(expected, abs=1e-12)
    assert score("pearson", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0  # a constant output has no correlation
