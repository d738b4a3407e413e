"""Character-level text: tiny-shakespeare or any UTF-8 file, in contiguous train/val/test."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.data import DataModule, DataSpec, TokenSplit
from trainer.errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"


def text(path: str, block_size: int = 64, batch_size: int = 64, val_fraction: float = 0.05,
         test_fraction: float = 0.05, seed: int = 0, name: str | None = None) -> DataModule:
    """Any UTF-8 file; the vocabulary is its set of characters.

    The splits are contiguous (train first, then val, then test) so no test window overlaps
    training text; `seed` is accepted for a uniform data interface and does not change them.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data.path={path!r} is not a file: give a UTF-8 text file")
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"data.path={path!r} is not UTF-8 text ({error.reason} at byte "
                        f"{error.start})") from None
    vocab = "".join(sorted(set(content)))
    lookup = {char: i for i, char in enumerate(vocab)}
    tokens = torch.tensor([lookup[c] for c in content], dtype=torch.long)
    n_test, n_val = int(len(tokens) * test_fraction), int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val - n_test
    pieces = tokens.split([n_train, n_val, n_test])
    if min(len(p) for p in pieces) <= block_size:
        raise UserError(f"data.path={path!r} is too short ({len(tokens)} characters) for "
                        f"data.block_size={block_size}: each split needs more than one block")
    spec = DataSpec(kind="text", name=name or file.stem, vocab=vocab, block_size=block_size)
    train, val, test = (TokenSplit(p, block_size) for p in pieces)
    return DataModule(spec, train, val, test, batch_size)


def shakespeare(path: str | None = None, root: str = "./data", download: bool = True,
                block_size: int = 64, batch_size: int = 64, val_fraction: float = 0.05,
                test_fraction: float = 0.05, seed: int = 0) -> DataModule:
    """tiny-shakespeare from `path`, or from `root`, downloading and checksumming it once."""
    if path is None:
        folder = Path(root) / "shakespeare"
        file = folder / "input.txt"
        if not file.is_file():
            if not download:
                raise UserError(f"data=shakespeare: {file} is absent and data.download=false; "
                                "set data.path=FILE to a local copy")
            from torchvision.datasets.utils import download_url

            try:
                download_url(SHAKESPEARE_URL, str(folder), "input.txt", md5=SHAKESPEARE_MD5)
            except (OSError, RuntimeError) as error:
                raise UserError(f"data=shakespeare: could not download it ({error}); "
                                f"put a copy at {file} or set data.path=FILE") from None
        path = str(file)
    return text(path, block_size, batch_size, val_fraction, test_fraction, seed, "shakespeare")
