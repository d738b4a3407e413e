"""The token cache: a text file is tokenized once (data/tokenize.py), its ids written to a raw
uint16/uint32 file that later runs memory-map and start from at once.

Cache layout (beside the data, or in $XDG_CACHE_HOME/trainer when the data's folder is read-only):

    .trainer-cache/<file name>.<tokenizer>.<key>/
        tokens.bin       the ids of train, val, test, concatenated (raw uint16, or uint32 past
                         65,536 tokens, in this machine's byte order)
        tokenizer.json   bpe only: the tokenizer trained on the train split
        meta.json        written last: format, source (path, size, sha256), tokenizer, fractions,
                         dtype and the token and character count of each split

<key> hashes the file's content, the tokenizer (bpe: its vocab_size; a tokenizer.json: its content)
and the split fractions, so an edited file gets a new cache; a cache of an older format, or whose
meta does not match, is rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from trainer.data import Tokenizer
from trainer.data.tokenize import (
    CHUNK_BYTES,
    UNICODE,
    CharTokenizer,
    Choice,
    HFTokenizer,
    code_points,
    count_characters,
    file_sha256,
    line_batches,
    split_lengths,
    split_texts,
    train_bpe,
    utf8_pieces,
)
from trainer.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of the cache changes: old caches are rebuilt



@dataclass
class Cached:
    tokenizer: Tokenizer
    splits: list[np.ndarray]  # train, val, test: read-only memory maps
    characters: list[int]
    folder: Path


def load_or_build(path: Path, choice: Choice, val_fraction: float, test_fraction: float
                  ) -> Cached:
    """The file's tokens from its cache, tokenizing it first when there is none (or a stale one)."""
    # The format is not part of the folder's name: a cache of an older format is rebuilt in place.
    key = {"source": file_sha256(path), "tokenizer": choice.spec,
           "fractions": [val_fraction, test_fraction]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{path.name}.{choice.spec.split('-')[0]}.{digest}"
    roots = cache_roots(path)
    for root in roots:  # a cache already there, even in a read-only folder, is used as it is
        folder = root / name
        if (folder / "meta.json").exists():
            cached = _load(folder, key, choice)
            if isinstance(cached, Cached):
                return cached
            log.info("rebuilding the token cache %s: %s", folder, cached)
    root = next((r for r in roots if _writable(r)), None)
    if root is None:
        raise UserError(f"cannot write the token cache for data.path={str(path)!r}: neither "
                        f"{roots[0]} nor {roots[-1]} is writable; set XDG_CACHE_HOME to a "
                        "writable folder")
    folder = root / name
    with _locked(folder):
        done = _load(folder, key, choice) if (folder / "meta.json").exists() else None
        if not isinstance(done, Cached):  # no other process built it while this one waited
            _build(path, choice, folder, key, val_fraction, test_fraction)
            _prune(root, path, key["source"])
            done = _load(folder, key, choice)
    assert isinstance(done, Cached), done  # it was just written
    return done


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One builder per cache at a time (sweep jobs, nodes sharing a file system): the others
    wait for it and then use its cache rather than tokenize the same file again."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; every write is still atomic
        yield
        return
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes
        yield


def user_cache() -> Path:
    """trainer's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainer"


def cache_roots(path: Path) -> list[Path]:
    return [path.parent / ".trainer-cache", user_cache()]


def _writable(root: Path) -> bool:
    existing = next(p for p in (root, *root.parents) if p.exists())
    if existing.stat().st_mode & 0o222 == 0:
        return False  # marked read-only; root could write there anyway, but should not
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{_unique()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def _load(folder: Path, key: dict[str, Any], choice: Choice) -> Cached | str:
    """The cache in `folder`, or why it cannot be used."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as error:
        return f"unreadable meta.json ({error})"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')} is not the current {FORMAT}"
    try:
        found = {"source": meta["source"]["sha256"], "tokenizer": meta["tokenizer"]["spec"],
                 "fractions": meta["fractions"]}
        lengths, dtype = list(meta["splits"].values()), np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as error:
        return f"meta.json lacks {error}"
    if found != key:
        return f"its meta {found} does not match {key}"
    tokens = folder / "tokens.bin"
    if not tokens.is_file() or tokens.stat().st_size != sum(lengths) * dtype.itemsize:
        return "tokens.bin is missing or not the size its meta.json says"
    if choice.kind == "bpe" and not (folder / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    tokenizer = _meta_tokenizer(meta["tokenizer"], folder, choice)
    stream = np.memmap(tokens, dtype=dtype, mode="r") if sum(lengths) else np.zeros(0, dtype)
    ends = list(itertools.accumulate(lengths))
    splits = [stream[end - n : end] for n, end in zip(lengths, ends, strict=True)]
    return Cached(tokenizer, splits, list(meta["characters"].values()), folder)


def _meta_tokenizer(meta: dict[str, Any], folder: Path, choice: Choice) -> Tokenizer:
    if choice.kind == "char":
        return CharTokenizer(meta["chars"])
    if choice.kind == "bpe":
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), "bpe")
    assert choice.loaded is not None
    return choice.loaded


def _build(path: Path, choice: Choice, folder: Path, key: dict[str, Any], val_fraction: float,
           test_fraction: float) -> None:
    """Tokenize the file into `folder`: tokens.bin (and tokenizer.json), then meta.json."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # no reader pairs an old meta with new tokens
    partial = folder / f"tokens.bin.partial-{_unique()}"
    try:
        if choice.kind == "char":  # one token per character: the splits fall where they may
            tokenizer, characters, dtype = _write_chars(path, partial)
            lengths = counts = split_lengths(characters, val_fraction, test_fraction)
        else:  # each split is tokenized on its own: find where they fall first
            lengths = split_lengths(count_characters(path), val_fraction, test_fraction)
            with open(partial, "wb") as out:
                tokenizer, counts, dtype = _write_hf(path, choice, lengths, folder, out)
        os.replace(partial, folder / "tokens.bin")
    finally:
        partial.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "source": {"path": str(path.resolve()), "bytes": path.stat().st_size,
                   "sha256": key["source"]},
        "tokenizer": {"spec": choice.spec, "name": tokenizer.name,
                      "vocab_size": tokenizer.vocab_size,
                      **({"chars": tokenizer.chars} if isinstance(tokenizer, CharTokenizer)
                         else {})},
        "fractions": key["fractions"],
        "dtype": np.dtype(dtype).name,
        "splits": dict(zip(("train", "val", "test"), counts, strict=True)),
        "characters": dict(zip(("train", "val", "test"), lengths, strict=True)),
    }
    _write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())
    seconds = time.perf_counter() - started
    log.info("tokenized %s with %s (%d tokens, %.0f MB/s) into %s", path, choice.spec,
             sum(counts), path.stat().st_size / 1e6 / max(seconds, 1e-9), folder)


def _unique() -> str:
    """A name no other process or thread writing the same folder uses at the same time."""
    return f"{os.getpid()}-{threading.get_ident()}"


def _dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class _TooManyCharacters(Exception):
    """More distinct characters than uint16 ids: the file is written again as uint32."""


def _write_chars(path: Path, target: Path) -> tuple[CharTokenizer, int, type]:
    """char in one pass over the file (decoding is most of the cost): ids in order of first
    appearance, then renumbered in place so that an id is the character's rank in the sorted
    vocabulary. Returns the tokenizer, the number of characters and the ids' dtype."""
    dtype: type = np.uint16
    try:
        first_seen = _write_first_seen(path, target, dtype)
    except _TooManyCharacters:
        dtype = np.uint32
        first_seen = _write_first_seen(path, target, dtype)
    tokenizer = CharTokenizer(np.sort(first_seen).tobytes().decode("utf-32-le"))
    rank = np.argsort(np.argsort(first_seen)).astype(dtype)  # first-seen id -> sorted id
    tokens = np.memmap(target, dtype=dtype, mode="r+")
    if not np.array_equal(rank, np.arange(len(rank))):
        for start in range(0, len(tokens), CHUNK_BYTES):  # a gather over uint16: cheap
            tokens[start : start + CHUNK_BYTES] = rank[tokens[start : start + CHUNK_BYTES]]
        tokens.flush()
    count = len(tokens)
    del tokens  # unmapped before the file is renamed
    return tokenizer, count, dtype


def _write_first_seen(path: Path, target: Path, dtype: type) -> np.ndarray:
    """Write each character's id, numbering characters as they first appear; returns their
    code points in that order."""
    unseen = np.iinfo(dtype).max  # never an id: at most `unseen` characters fit this dtype
    lookup = np.full(UNICODE, unseen, dtype=dtype)  # code point -> id
    order: list[np.ndarray] = []
    known = 0
    with open(target, "wb") as out:
        for offset, piece in utf8_pieces(path, progress=f"tokenizing {path.name}"):
            codes = code_points(piece, offset, path)
            ids = lookup[codes]  # one gather per chunk; ids come out in the file's dtype
            missing = ids == unseen
            if missing.any():  # new characters: the first chunk, then rarely
                mark = np.zeros(UNICODE, dtype=bool)
                mark[codes[missing]] = True  # a scatter, not a sort: O(chunk)
                new = np.flatnonzero(mark).astype(np.uint32)
                if known + len(new) > unseen:
                    raise _TooManyCharacters
                lookup[new] = np.arange(known, known + len(new))
                known += len(new)
                order.append(new)
                ids = lookup[codes]
            out.write(ids.tobytes())
    return np.concatenate(order)


def _write_hf(path: Path, choice: Choice, lengths: list[int], folder: Path, out: Any
              ) -> tuple[HFTokenizer, list[int], type]:
    """bpe: train on the train split (and save it); then encode each split on its own."""
    if choice.kind == "bpe":
        texts = split_texts(path, lengths, f"training {choice.kind} on {path.name}")
        train = itertools.takewhile(lambda piece: piece[0] == 0, texts)
        trained = train_bpe(line_batches(text for _, text in train), choice.vocab_size)
        texts.close()  # the pass stops at the end of the train split: its file and bar close now
        _write_atomic(folder / "tokenizer.json", trained.to_str().encode())
        tokenizer = HFTokenizer(trained, "bpe")
    else:
        assert choice.loaded is not None
        tokenizer = choice.loaded
    dtype, counts = _dtype(tokenizer.vocab_size), [0, 0, 0]
    texts = split_texts(path, lengths, f"tokenizing {path.name}")
    for split, pieces in itertools.groupby(texts, key=lambda p: p[0]):
        for batch in line_batches(text for _, text in pieces):
            for ids in tokenizer.encode_many(batch):
                out.write(np.asarray(ids, dtype=dtype).tobytes())
                counts[split] += len(ids)
    return tokenizer, counts, dtype


def _write_atomic(target: Path, data: bytes) -> None:
    partial = target.with_name(f"{target.name}.partial-{_unique()}")
    partial.write_bytes(data)
    os.replace(partial, target)


def _prune(root: Path, path: Path, source: str) -> None:
    """Remove this file's caches of earlier contents (same path, another hash): an edited
    corpus would otherwise leave a full copy of its tokens behind at every edit."""
    for folder in root.iterdir():
        if not folder.name.startswith(f"{path.name}."):
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text())
            stale = (meta["source"]["path"] == str(path.resolve())
                     and meta["source"]["sha256"] != source)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the token cache of an earlier version of %s: %s", path, folder)
