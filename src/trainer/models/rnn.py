from __future__ import annotations

import torch
from torch import Tensor, nn


class RNN(nn.Module):
    """An LSTM in one of two roles, chosen by the data it is sized for.

    - images (`in_shape`, `num_classes`): each row of pixels is one time step; the last step's
      hidden state is classified.
    - text (`vocab_size`): characters are embedded and every step predicts the next character.
    """

    def __init__(self, in_shape: tuple[int, int, int] | None = None, num_classes: int = 0,
                 vocab_size: int = 0, block_size: int = 0, width: int = 128, depth: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if vocab_size:
            self.embed: nn.Module = nn.Embedding(vocab_size, width)
            input_size, outputs = width, vocab_size
        elif in_shape is not None:
            channels, _, row = in_shape
            input_size, outputs = channels * row, num_classes  # one row of pixels per step
        else:
            raise ValueError("RNN needs in_shape and num_classes (images) or vocab_size (text)")
        self.per_step = bool(vocab_size)
        self.context = block_size  # the training context, used when sampling text
        self.lstm = nn.LSTM(input_size, width, depth, batch_first=True,
                            dropout=dropout if depth > 1 else 0.0)
        self.head = nn.Linear(width, outputs)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.per_step:
            steps, _ = self.lstm(self.embed(inputs))
            return self.head(steps)  # (B, T, vocab)
        rows = inputs.permute(0, 2, 1, 3).flatten(2)  # (B, H, C*W): one row per step
        steps, _ = self.lstm(rows)
        return self.head(steps[:, -1])  # (B, classes)

    @torch.no_grad()
    def decode(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None
               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Text: the logits after the last of `tokens` (B, T) and the LSTM's state after them,
        which the next call carries on from: each new token costs one step."""
        steps, state = self.lstm(self.embed(tokens), state)
        return self.head(steps[:, -1]), state
