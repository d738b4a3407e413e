from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from trainer.tasks import Task, as_count, mean_of


class Classification(Task):
    """Cross-entropy on class labels; reports loss and accuracy."""

    monitor = ("val/acc", "max")

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      stage: int) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        logits = model(images)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits, labels), {"acc": accuracy}

    def eval_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        logits = model(images).float()
        return {"loss": F.cross_entropy(logits, labels, reduction="sum"),
                "acc": (logits.argmax(-1) == labels).sum().float(),
                "count": as_count(len(labels), logits)}

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return mean_of(totals, "loss", "acc")
