"""Tokenizers (char, a byte-level BPE trained on the corpus, a tokenizer.json) and reading a text
file in pieces: bytes -> code points -> token ids all happen in numpy (or in the tokenizers
library for BPE), never with a Python object per character. data/token_cache.py runs them once
per file and keeps the result.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from torch import Tensor
from tqdm import tqdm

from trainer.errors import UserError, listed
from trainer.logging import progress_bar
from trainer.ranks import env_rank

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # what one step of the first run reads; bounds its memory
BPE_VOCAB = (256, 1 << 20)  # one token per byte at least; more ids than this is a mistake
UNICODE = 0x110000
TOKENIZER_CHOICES = "char, bpe, or a path to a tokenizer.json file"


# ---------------------------------------------------------------------------------------------
# Tokenizers: small classes satisfying trainer.data.Tokenizer.


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of the file's characters."""

    name = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._index = {char: i for i, char in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[char] for char in text]
        except KeyError as error:
            raise UserError(f"the character {error.args[0]!r} is not in this char tokenizer's "
                            f"vocabulary (the {self.vocab_size} characters of its training "
                            "file)") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> Tensor:
        return torch.tensor([len(char.encode("utf-8")) for char in self.chars])


def char_table(chars: str, vocabulary: str, given: str, named: str) -> np.ndarray:
    """Ids of a char tokenizer over `chars` as ids of one over `vocabulary` (table[own] = theirs).
    A character `vocabulary` lacks is a UserError: "`given` has characters `named` lacks: ..."."""
    known = {char: i for i, char in enumerate(vocabulary)}
    unseen = [repr(char) for char in chars if char not in known]
    if unseen:
        raise UserError(f"{given} has characters {named} lacks: {listed(unseen)}; the model "
                        "has no id for them")
    dtype = np.uint16 if len(vocabulary) <= 1 << 16 else np.uint32
    return np.array([known[char] for char in chars], dtype=dtype)


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`: the trained byte-level BPE, or a tokenizer.json."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._bytes: Tensor | None = None

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS: a corpus is encoded in pieces that must join up into one stream.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        # The fast variant skips offsets, which nothing here uses; it runs on every core.
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_bytes(self) -> Tensor:
        """Exact for byte-level tokenizers (each symbol of a token is one byte); for others, the
        UTF-8 length of the token decoded alone. Special tokens stand for no text: 0."""
        if self._bytes is None:
            added = self.tokenizer.get_added_tokens_decoder()
            byte_level = type(self.tokenizer.decoder).__name__ == "ByteLevel"
            sizes = [_token_size(self.tokenizer, i, byte_level and i not in added)
                     for i in range(self.vocab_size)]
            self._bytes = torch.tensor(sizes)
        return self._bytes


def tokenizer_record(tokenizer: CharTokenizer | HFTokenizer) -> dict[str, str]:
    """A tokenizer as plain strings, for a checkpoint: the run's ids stay readable without the
    file it was built from."""
    if isinstance(tokenizer, CharTokenizer):
        return {"name": "char", "chars": tokenizer.chars}
    return {"name": tokenizer.name, "json": tokenizer.tokenizer.to_str()}


def tokenizer_from_record(record: dict[str, str]) -> CharTokenizer | HFTokenizer:
    if record["name"] == "char":
        return CharTokenizer(record["chars"])
    return HFTokenizer(tokenizers.Tokenizer.from_str(record["json"]), record["name"])


def _token_size(tokenizer: tokenizers.Tokenizer, i: int, byte_level: bool) -> int:
    token = tokenizer.id_to_token(i)
    if token is None:
        return 0
    if byte_level:  # GPT-2's byte-to-symbol alphabet: one symbol, one byte
        return len(token)
    return len(tokenizer.decode([i]).encode("utf-8"))  # special tokens decode to ""


def train_bpe(batches: Iterable[list[str]], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer, every byte in the alphabet, so any text encodes
    and decode(encode(x)) == x) of at most `vocab_size` tokens."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(batches, trainer)
    return tokenizer


@dataclass(frozen=True)
class Choice:
    """What `data.tokenizer` (and `data.vocab_size`) asked for."""

    kind: str  # char, bpe, json
    vocab_size: int = 0  # bpe
    loaded: HFTokenizer | None = None  # json: the tokenizer file, loaded
    digest: str = ""  # json: the sha256 of the tokenizer file

    @property
    def spec(self) -> str:
        """What the cache key holds: the tokenizer, down to what changes its ids."""
        return {"char": "char", "bpe": f"bpe{self.vocab_size}", "json": f"json-{self.digest}"}[
            self.kind]


def parse_tokenizer(value: str, vocab_size: int) -> Choice:
    """`data.tokenizer` -> a Choice, or a UserError naming what is accepted."""
    if value == "char":
        return Choice("char")
    if value == "bpe":
        low, high = BPE_VOCAB
        if not low <= vocab_size <= high:
            raise UserError(f"data.vocab_size={vocab_size} is out of range for "
                            f"data.tokenizer=bpe: it must be between {low} (one token per byte) "
                            f"and {high}")
        return Choice("bpe", vocab_size=vocab_size)
    path = Path(value).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():  # a Hugging Face model folder
        path = path / "tokenizer.json"
    if path.is_file():
        return Choice("json", loaded=load_tokenizer_file(path), digest=file_sha256(path))
    if path.is_dir():
        raise UserError(f"data.tokenizer={value!r} is a folder without a tokenizer.json: give "
                        "the path of a tokenizer.json file, or char or bpe")
    if value.endswith(".json") or os.sep in value:
        raise UserError(f"data.tokenizer={value!r} does not exist: give the path of a "
                        "tokenizer.json file, or char or bpe")
    raise UserError(f"data.tokenizer={value!r} is not accepted: choose {TOKENIZER_CHOICES}")


def load_tokenizer_file(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), str(path))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"data.tokenizer={str(path)!r} is not a tokenizer file ({reason}): give "
                        "a tokenizer.json saved by Hugging Face tokenizers") from None


# ---------------------------------------------------------------------------------------------
# Reading the file: chunks cut on character boundaries, never the whole text at once.


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, _bytes_read(path, f"checking {path.name}") as bar:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _bytes_read(path: Path, progress: str | None) -> tqdm:
    """A progress bar of the bytes of `path` read by a pass (`progress` says what it does), in
    the first process."""
    return progress_bar(path.stat().st_size, "B", progress or "", unit_scale=True,
                        shown=bool(progress) and env_rank() == 0)


def utf8_pieces(path: Path, size: int | None = None, progress: str | None = None
                ) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of the file in pieces of about `size` (CHUNK_BYTES), each ending on a
    character boundary (a multi-byte character cut by the read is carried into the next piece).
    `progress`: what the pass does, for a bar of bytes read on a terminal if it takes a while."""
    offset, carry = 0, b""
    with open(path, "rb") as f, _bytes_read(path, progress) as bar:
        while block := f.read(size or CHUNK_BYTES):
            bar.update(len(block))
            block = carry + block
            cut = len(block)
            for back in range(1, min(4, len(block)) + 1):  # a UTF-8 character is <= 4 bytes
                if block[-back] & 0xC0 != 0x80:  # not a continuation byte: a character starts
                    cut = len(block) - back if _incomplete(block[-back], back) else len(block)
                    break
            yield offset, block[:cut]
            offset, carry = offset + cut, block[cut:]
    if carry:
        yield offset, carry  # a truncated character at the end: decoding names its offset


def _incomplete(lead: int, have: int) -> bool:
    """Whether a character whose first byte is `lead` needs more than the `have` bytes read."""
    if lead >> 5 == 0b110:
        return have < 2
    if lead >> 4 == 0b1110:
        return have < 3
    return lead >> 3 == 0b11110 and have < 4


def decode(piece: bytes, offset: int, path: Path) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"data.path={str(path)!r} is not UTF-8 text ({error.reason} at byte "
                        f"{offset + error.start}): give a UTF-8 text file") from None


def code_points(piece: bytes, offset: int, path: Path) -> np.ndarray:
    """The piece's characters as code points: a zero-copy uint8 view when it is ASCII (the common
    case, and 4x less work), else uint32 through UTF-32."""
    if piece.isascii():
        return np.frombuffer(piece, dtype=np.uint8)
    return np.frombuffer(decode(piece, offset, path).encode("utf-32-le"), dtype=np.uint32)


def count_characters(path: Path) -> int:
    """The number of characters (where the splits fall), validating the UTF-8 on the way."""
    return sum(len(piece) if piece.isascii() else len(decode(piece, offset, path))
               for offset, piece in utf8_pieces(path, progress=f"reading {path.name}"))


def split_lengths(characters: int, val_fraction: float, test_fraction: float) -> list[int]:
    """Characters in train, val, test: the first (1 - val - test) of the file, then val, then
    test, so no evaluation window overlaps training text."""
    # Rounded down as before, but a product that misses an integer only by float error (a
    # fraction computed as size / total, as data/hf.py does) counts as that integer.
    n_test, n_val = (math.floor(characters * f + 1e-6) for f in (test_fraction, val_fraction))
    return [characters - n_val - n_test, n_val, n_test]


def split_texts(path: Path, lengths: list[int], progress: str | None = None
                ) -> Iterator[tuple[int, str]]:
    """The file's text in pieces, each tagged with its split (0 train, 1 val, 2 test)."""
    ends = list(itertools.accumulate(lengths))
    split = position = 0
    for offset, piece in utf8_pieces(path, progress=progress):
        text = decode(piece, offset, path)
        start = 0
        while start < len(text):
            while position >= ends[split]:
                split += 1
            take = min(len(text) - start, ends[split] - position)
            yield split, text[start : start + take]
            start, position = start + take, position + take


def line_batches(texts: Iterable[str], piece: int = 1 << 13, batch: int = 512
                 ) -> Iterator[list[str]]:
    """The texts re-cut into pieces of about `piece` characters that end after a newline (a line
    split in two would tokenize differently), `batch` pieces at a time for encode_batch."""
    carry = ""
    for text in texts:
        text = carry + text
        end = text.rfind("\n") + 1
        if end == 0 and len(text) < 16 * piece:  # no newline yet: wait for one, within reason
            carry = text
            continue
        end = end or len(text)
        carry = text[end:]
        yield from _batched(_cut_lines(text[:end], piece), batch)
    if carry:
        yield [carry]


def _cut_lines(text: str, piece: int) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        # After the first newline past `piece`; a text with no newline for long is cut anyway.
        end = text.find("\n", start + piece, start + 4 * piece) + 1 or start + piece
        pieces.append(text[start:end])
        start = end
    return pieces


def _batched(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
