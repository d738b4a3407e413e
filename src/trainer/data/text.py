"""Text: tiny-shakespeare or any UTF-8 file, tokenized once (data/token_cache.py) into contiguous
train / val / test token streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.data import DataModule, DataSpec, TokenSplit
from trainer.data.token_cache import Cached, load_or_build
from trainer.data.tokenize import CharTokenizer, char_table, parse_tokenizer
from trainer.errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
# A split of fewer tokens is copied out of the memory map into a tensor (int32: 64 MB at most),
# so it moves to the GPU whole and batches by indexing there; larger ones read pages per batch.
KIND = "text"  # every source here (data.configured_kind)
IN_MEMORY_TOKENS = 1 << 24


def text(path: str, block_size: int = 64, batch_size: int = 64, val_fraction: float = 0.05,
         test_fraction: float = 0.05, seed: int = 0, tokenizer: str = "char",
         vocab_size: int = 512, vocabulary: str | None = None,
         name: str | None = None) -> DataModule:
    """Any UTF-8 file, tokenized by `tokenizer`: char (its set of characters), bpe (a byte-level
    BPE of `vocab_size` tokens trained on the train split) or the path of a tokenizer.json.
    `vocabulary` (char): the characters, in id order, of another run's tokenizer to encode the
    text in instead of its own (init_from= sets it, so the source's embedding fits).

    The splits are contiguous (train first, then val, then test) so no test window overlaps
    training text; `seed` is accepted for a uniform data interface and does not change them.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data.path={path!r} is not a file: give a UTF-8 text file")
    if file.stat().st_size == 0:
        raise UserError(f"data.path={path!r} is empty: give a UTF-8 text file with some text")
    cached = load_or_build(file, parse_tokenizer(tokenizer, vocab_size), val_fraction,
                           test_fraction)
    _check_long_enough(path, cached, block_size)
    splits = cached.splits
    own = cached.tokenizer
    if vocabulary is not None:
        if not isinstance(own, CharTokenizer):
            raise UserError(f"data.vocabulary applies to data.tokenizer=char, not {tokenizer}: "
                            "set it to null")
        table = char_table(own.chars, vocabulary, f"data.path={path!r}", "data.vocabulary")
        # Renumbered, a split too large to copy (IN_MEMORY_TOKENS) is still held: 2 bytes a token.
        splits, own = [table[tokens] for tokens in splits], CharTokenizer(vocabulary)
    spec = DataSpec(kind="text", name=name or file.stem, tokenizer=own, block_size=block_size)
    train, val, test = (TokenSplit(_held(tokens), block_size) for tokens in splits)
    return DataModule(spec, train, val, test, batch_size)


def _check_long_enough(path: str, cached: Cached, block_size: int) -> None:
    for split, tokens in zip(("train", "val", "test"), cached.splits, strict=True):
        if len(tokens) <= block_size:
            unit = "characters" if cached.tokenizer.name == "char" else "tokens"
            raise UserError(f"data.path={path!r} is too short for data.block_size={block_size}: "
                            f"its {split} split has {len(tokens)} {unit} "
                            f"({sum(cached.characters)} characters in all) and needs more than "
                            f"{block_size}; give a longer file or lower data.block_size")


def _held(tokens: np.ndarray) -> torch.Tensor | np.ndarray:
    """A small split as a tensor (see IN_MEMORY_TOKENS), a large one as its memory map."""
    if len(tokens) < IN_MEMORY_TOKENS:
        return torch.from_numpy(tokens.astype(np.int32))
    return tokens


def shakespeare(path: str | None = None, root: str = "./data", download: bool = True,
                block_size: int = 64, batch_size: int = 64, val_fraction: float = 0.05,
                test_fraction: float = 0.05, seed: int = 0, tokenizer: str = "char",
                vocab_size: int = 512, vocabulary: str | None = None) -> DataModule:
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
    return text(path, block_size, batch_size, val_fraction, test_fraction, seed,
                tokenizer=tokenizer, vocab_size=vocab_size, vocabulary=vocabulary,
                name="shakespeare")
