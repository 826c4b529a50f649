"""Evaluation metrics as sums of per-example statistics, so that they add up over batches and processes.

Each metric turns (predictions, targets) into an (examples x k) tensor whose column sums over a whole
split determine the metric exactly; `value` turns those sums into the number reported.

accuracy   share of correct predictions
mcc        Matthews correlation from the confusion matrix (multi-class form; GLUE's CoLA metric)
f1         F1 of class 1 for two classes (GLUE's MRPC/QQP), else the macro average over classes
pearson    Pearson correlation of a regression output with its target (GLUE's STS-B)
"""

from __future__ import annotations

import math

import torch

CLASSIFICATION = ("accuracy", "mcc", "f1")
REGRESSION = ("pearson",)


class Metric:
    """A metric computed from summed per-example statistics (higher is better)."""

    name = ""

    def stats(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, totals: torch.Tensor) -> float:
        raise NotImplementedError


class Accuracy(Metric):
    name = "accuracy"

    def stats(self, predictions, targets):
        correct = (predictions == targets).double()
        return torch.stack([correct, torch.ones_like(correct)], dim=1)

    def value(self, totals):
        return (totals[0] / totals[1]).item()


class ConfusionMetric(Metric):
    """A metric of the confusion matrix (true class x predicted class), summed as one-hot rows."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def stats(self, predictions, targets):
        cells = targets.long() * self.num_classes + predictions.long()
        return torch.nn.functional.one_hot(cells, self.num_classes**2).double()

    def value(self, totals):
        return self.of_confusion(totals.double().view(self.num_classes, self.num_classes).cpu())

    def of_confusion(self, confusion: torch.Tensor) -> float:
        raise NotImplementedError


class MCC(ConfusionMetric):
    name = "mcc"

    def of_confusion(self, confusion):
        """Gorodkin's multi-class form (the binary MCC for two classes); 0 when a margin is constant."""
        total, correct = confusion.sum(), confusion.trace()
        true, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
        denominator = math.sqrt((total**2 - predicted @ predicted) * (total**2 - true @ true))
        return 0.0 if denominator == 0 else ((correct * total - true @ predicted) / denominator).item()


class F1(ConfusionMetric):
    name = "f1"

    def of_confusion(self, confusion):
        """F1 of class 1 (the positive class) for two classes, else the mean F1 over classes; 0 for an empty class."""
        hits = confusion.diagonal()
        claimed = confusion.sum(dim=0) + confusion.sum(dim=1)  # 2 tp + fp + fn
        per_class = torch.where(claimed > 0, 2 * hits / claimed.clamp(min=1), torch.zeros_like(hits))
        return per_class[1].item() if self.num_classes == 2 else per_class.mean().item()


class Pearson(Metric):
    name = "pearson"

    def stats(self, predictions, targets):
        x, y = predictions.double().flatten(), targets.double().flatten()
        return torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y], dim=1)

    def value(self, totals):
        n, sx, sy, sxx, syy, sxy = totals.double().tolist()
        spread = (n * sxx - sx * sx) * (n * syy - sy * sy)
        return 0.0 if spread <= 0 else (n * sxy - sx * sy) / math.sqrt(spread)


def make_metric(name: str, num_classes: int) -> Metric:
    """The metric called `name` for a task with `num_classes` classes (0 for regression)."""
    if name == "accuracy":
        return Accuracy()
    if name == "pearson":
        return Pearson()
    return {"mcc": MCC, "f1": F1}[name](num_classes)
