from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.errors import UserError

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNN(nn.Module):
    """An LSTM or a GRU (`cell`) in one of two roles, chosen by the data it is sized for.

    - images (`in_shape`, `num_classes`): each row of pixels is one time step; the final hidden
      state is classified (of both directions when `bidirectional`).
    - text (`vocab_size`): characters are embedded and every step predicts the next character.
    """

    def __init__(self, in_shape: tuple[int, int, int] | None = None, num_classes: int = 0,
                 vocab_size: int = 0, block_size: int = 0, width: int = 128, depth: int = 2,
                 dropout: float = 0.0, cell: str = "lstm", bidirectional: bool = False) -> None:
        super().__init__()
        if vocab_size:
            self.embed: nn.Module = nn.Embedding(vocab_size, width)
            input_size, outputs = width, vocab_size
        elif in_shape is not None:
            channels, _, row = in_shape
            input_size, outputs = channels * row, num_classes  # one row of pixels per step
        else:
            raise ValueError("RNN needs in_shape and num_classes (images) or vocab_size (text)")
        if vocab_size and bidirectional:
            raise UserError("model.bidirectional=true reads each text backwards too, so a "
                            "language model would see the characters it must predict: use it "
                            "to classify images, or set model.bidirectional=false")
        self.per_step = bool(vocab_size)
        self.context = block_size  # the training context, used when sampling text
        self.directions = 2 if bidirectional else 1
        # Dropout acts between stacked layers, on each layer's outputs but the last.
        self.rnn = CELLS[cell](input_size, width, depth, batch_first=True,
                               dropout=dropout if depth > 1 else 0.0, bidirectional=bidirectional)
        self.head = nn.Linear(width * self.directions, outputs)
        self._register_load_state_dict_pre_hook(_renamed_from_lstm)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.per_step:
            steps, _ = self.rnn(self.embed(inputs))
            return self.head(steps)  # (B, T, vocab)
        rows = inputs.permute(0, 2, 1, 3).flatten(2)  # (B, H, C*W): one row per step
        _, state = self.rnn(rows)
        hidden = state[0] if isinstance(state, tuple) else state  # an LSTM also has its cell
        last_layer = hidden[-self.directions:].transpose(0, 1).flatten(1)  # (B, directions*W)
        return self.head(last_layer)  # (B, classes)

    @torch.no_grad()
    def decode(self, tokens: Tensor, state: Tensor | tuple[Tensor, Tensor] | None = None
               ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """Text: the logits after the last of `tokens` (B, T) and the recurrent state after
        them, which the next call carries on from: each new token costs one step."""
        steps, state = self.rnn(self.embed(tokens), state)
        return self.head(steps[:, -1]), state


def _renamed_from_lstm(state: dict, prefix: str, *args: object) -> None:
    """Checkpoints from before `cell` named the recurrent layers `lstm`: load them as `rnn`."""
    for key in [k for k in state if k.startswith(prefix + "lstm.")]:
        state[prefix + "rnn." + key[len(prefix) + 5:]] = state.pop(key)
