from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data import DataSpec, Split
from trainer.errors import UserError
from trainer.tables import aligned
from trainer.tasks.base import Task, as_count, mean_of

# Above this many classes no confusion matrix is summed (its size grows as the square).
MAX_CONFUSION_CLASSES = 1000


class Classification(Task):
    """Cross-entropy on class labels; reports loss and accuracy. Training may smooth the targets
    (`label_smoothing`, as Inception v3 and airbench do); val/ and test/loss stay the plain
    cross-entropy, so runs with and without smoothing compare."""

    monitor = ("val/acc", "max")

    def __init__(self, classes: Sequence[str], label_smoothing: float = 0.0,
                 class_weights: str | None = None) -> None:
        self.classes = classes
        self.label_smoothing = label_smoothing
        self.balanced = class_weights == "balanced"
        self.class_weights: Tensor | None = None  # balanced: set from the training labels

    def fit_loss_to_data(self, train: Split, device: torch.device) -> None:
        """trainer.class_weights=balanced: each class's training loss weighted by N / (C * n_c),
        as scikit-learn's "balanced", so that every class weighs as much in all as the others
        whatever its share of the training images."""
        if not self.balanced:
            return
        labels = getattr(train, "labels", None)
        if labels is None:
            raise UserError("trainer.class_weights=balanced needs the training split's labels "
                            "before the first step, which a streamed data set reads only as it "
                            "goes: load it whole (data.streaming=false)")
        labels = torch.as_tensor(labels).cpu()
        counts = torch.bincount(labels[labels >= 0], minlength=len(self.classes))  # -1: unreadable
        weights = counts.sum() / (len(counts) * counts.clamp(min=1).float())
        self.class_weights = weights.to(device)
        low, high = weights.argmin().item(), weights.argmax().item()
        self.note = (f"class weights (balanced): from {weights[low]:.3g} for {self.classes[low]}, "
                     f"the most frequent class, to {weights[high]:.3g} for "
                     f"{self.classes[high]}, the rarest")

    def fit_to_data(self, model: nn.Module, train: Split) -> None:
        """A CNN's whitening layer, from the first training images (up to 5,000, or fewer of
        larger images: about four million patch positions), the same on every rank."""
        whitening = getattr(model, "whitening", None)
        if whitening is None:
            return
        _, height, width = train.batch(torch.arange(1))[0].shape[1:]
        count = min(len(train), 5000, max(64, 2**22 // (height * width)))
        whitening.fit(train.batch(torch.arange(count))[0])

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        logits = model(images)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        loss = F.cross_entropy(logits, labels, weight=self.class_weights,
                               label_smoothing=self.label_smoothing)
        return loss, {"acc": accuracy}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        logits = model(images).float()
        predicted = logits.argmax(-1)
        sums = {"loss": F.cross_entropy(logits, labels, reduction="sum"),
                "acc": (predicted == labels).sum().float(),
                "count": as_count(len(labels), logits)}
        classes = logits.shape[-1]
        if classes <= MAX_CONFUSION_CLASSES:  # rows: the true class; columns: the predicted
            sums["confusion"] = torch.bincount(labels * classes + predicted,
                                               minlength=classes**2).view(classes, classes)
        return sums

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return mean_of(totals, "loss", "acc")

    def report(self, totals: dict[str, Any], spec: DataSpec) -> str | None:
        confusion = totals.get("confusion")
        return None if confusion is None else per_class_table(confusion.long(), spec.classes)


def per_class_table(confusion: Tensor, classes: Sequence[str], rows: int = 20) -> str:
    """Each class's accuracy (the share of its images classified right) and what the rest were
    taken for, worst first (`rows` of them); below, the whole confusion matrix when it is small
    enough to read."""
    images = confusion.sum(1).tolist()
    share = [int(confusion[c, c]) / max(n, 1) for c, n in enumerate(images)]
    table = [["class", "images", "accuracy", "most often taken for"]]
    for label in sorted(range(len(classes)), key=lambda c: (images[c] == 0, share[c], c))[:rows]:
        wrong = confusion[label].clone()
        wrong[label] = 0
        taken = [f"{classes[c]} ({int(wrong[c])})" for c in wrong.argsort(descending=True)[:3]
                 if wrong[c] > 0]
        table.append([classes[label], str(images[label]),
                      f"{share[label]:.1%}" if images[label] else "-", ", ".join(taken)])
    text = aligned(table, right={1, 2})
    if len(classes) > rows:
        text += f"\n... and {len(classes) - rows} more classes, each at {table[-1][2]} or above"
    if len(classes) <= 12:
        matrix = [["true \\ predicted", *classes]]
        matrix += [[name, *map(str, confusion[i].tolist())] for i, name in enumerate(classes)]
        text += "\n\n" + aligned(matrix, right=range(1, len(classes) + 1))
    return text
