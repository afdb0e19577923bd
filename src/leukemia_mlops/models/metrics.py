"""Classification metrics as torchmetrics objects, so that they sync correctly under DDP."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryRecall,
    BinarySpecificity,
    MulticlassF1Score,
    MulticlassRecall,
)

#: The metric the checkpoints, early stopping and sweeps follow (the C-NMC challenge metric).
MONITOR = "val/f1_weighted"


class ClassificationMetrics(nn.Module):
    """Weighted F1, accuracy, balanced accuracy, sensitivity, specificity and AUROC of one stage.

    Sensitivity is the recall of ALL (blasts), specificity the recall of HEM; balanced accuracy
    is their mean (macro recall over the two classes).
    """

    def __init__(self, stage: str, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold
        self.from_probs = MetricCollection(
            {
                "accuracy": BinaryAccuracy(threshold),
                "sensitivity": BinaryRecall(threshold),
                "specificity": BinarySpecificity(threshold),
                "auroc": BinaryAUROC(),
            },
            prefix=f"{stage}/",
        )
        self.from_labels = MetricCollection(
            {
                "f1_weighted": MulticlassF1Score(num_classes=2, average="weighted"),
                "balanced_accuracy": MulticlassRecall(num_classes=2, average="macro"),
            },
            prefix=f"{stage}/",
        )

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long()
        self.from_probs.update(probs, labels)
        self.from_labels.update((probs > self.threshold).long(), labels)

    def collections(self) -> tuple[MetricCollection, MetricCollection]:
        return self.from_probs, self.from_labels
