"""A CNN whose rank-1 copy crashes at its third training step: for the failing-worker test.

Loaded by the `train` command through `model._target_=failing_model.RankFailingCNN` with this
folder on PYTHONPATH.
"""

from __future__ import annotations

import os

from trainer.models.cnn import CNN


class RankFailingCNN(CNN):
    calls = 0

    def forward(self, images):
        if self.training and os.environ.get("RANK") == "1":
            RankFailingCNN.calls += 1
            if RankFailingCNN.calls == 3:
                raise RuntimeError("deliberate failure on rank 1")
        return super().forward(images)
