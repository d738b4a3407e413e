from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data import Split
from trainer.tasks import Task, as_count, mean_of


class Classification(Task):
    """Cross-entropy on class labels; reports loss and accuracy. Training may smooth the targets
    (`label_smoothing`, as Inception v3 and airbench do); val/ and test/loss stay the plain
    cross-entropy, so runs with and without smoothing compare."""

    monitor = ("val/acc", "max")

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

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
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, {"acc": accuracy}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        logits = model(images).float()
        return {"loss": F.cross_entropy(logits, labels, reduction="sum"),
                "acc": (logits.argmax(-1) == labels).sum().float(),
                "count": as_count(len(labels), logits)}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return mean_of(totals, "loss", "acc")
