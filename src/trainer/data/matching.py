"""Other data for a trained model: `evaluate run_dir=RUN data.path=OTHER`. The other data must
mean to the model what the run's data meant: the same classes in the same order and the same
image shape, or text whose every character is in the run's vocabulary (ids are then renumbered
to the run's; other tokenizers encode the other text themselves, being the run's own)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from trainer.data import DataModule, DataSpec, TokenSplit
from trainer.data.tokenize import char_table
from trainer.errors import UserError, listed


def matched(other: DataModule, run: DataSpec, changed: dict[str, Any]) -> DataModule:
    """`other`, ready for the run's model, or a UserError saying what differs."""
    given = " ".join(f"data.{key}={value}" for key, value in changed.items())
    if other.spec.kind != run.kind:
        raise UserError(f"{given} is {other.spec.kind} data; the run trained on {run.kind} data")
    if run.kind == "image":
        _check_images(other.spec, run, given)
        return other
    if other.spec.block_size > run.block_size:
        raise UserError(f"data.block_size={other.spec.block_size} is longer than the model's "
                        f"context of {run.block_size} tokens")
    if run.tokenizer is None or run.tokenizer.name != "char":
        return other  # encoded with the run's own tokenizer: the same ids
    return _renumbered(other, run, given)


def _check_images(spec: DataSpec, run: DataSpec, given: str) -> None:
    if spec.classes != run.classes:
        missing = [c for c in run.classes if c not in spec.classes]
        extra = [c for c in spec.classes if c not in run.classes]
        why = (f"it lacks {listed(missing)}" if missing else "") + \
            ("; " if missing and extra else "") + (f"it has {listed(extra)} besides" if extra
                                                   else "")
        raise UserError(f"{given} does not have the run's classes ({why or 'another order'}): "
                        f"the model was trained on {listed(run.classes)}")
    if spec.in_shape != run.in_shape:
        raise UserError(f"{given} gives images of shape {list(spec.in_shape)}; the model takes "
                        f"{list(run.in_shape)}: keep the run's data.image_size and grayscale")


def _renumbered(other: DataModule, run: DataSpec, given: str) -> DataModule:
    """The other text's character ids mapped to the run's; a character the run never saw is an
    error (the model has no id for it)."""
    table = char_table(other.spec.tokenizer.chars, run.tokenizer.chars, given,
                       "the run's vocabulary").astype(np.int64)

    def split(tokens: TokenSplit) -> TokenSplit:
        ids = tokens.tokens.cpu().numpy() if isinstance(tokens.tokens, torch.Tensor) \
            else np.asarray(tokens.tokens)
        return TokenSplit(torch.from_numpy(table[ids]), tokens.block_size)

    spec = dataclasses.replace(run, name=other.spec.name, block_size=other.spec.block_size)
    return DataModule(spec, split(other.train), split(other.val), split(other.test),
                      other.batch_size)
