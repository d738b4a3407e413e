"""Text data: windows, tokenizers and the token cache."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import Terminal, compose_train
from trainer.data import token_cache, tokenize
from trainer.data.text import text
from trainer.errors import UserError
from trainer.run.loop import train
from trainer.tasks.language_model import LanguageModel


@pytest.fixture(autouse=True)
def own_cache_home(tmp_path_factory, monkeypatch):
    """The fallback cache (and a cache found there first) is this test's, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))


def test_text_windows_predict_the_next_character(text_file):
    data = text(str(text_file), block_size=8)
    inputs, targets = data.train.batch(torch.tensor([0, 1]))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    decoded = data.spec.tokenizer.decode(inputs[0].tolist())
    assert text_file.read_text(encoding="utf-8").startswith(decoded)
    assert "✓" in data.spec.tokenizer.decode(list(range(data.spec.vocab_size)))


def all_tokens(data) -> list[int]:
    return [t for split in (data.train, data.val, data.test) for t in split.tokens.tolist()]


def cache_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("meta.json"))


def test_char_tokens_are_the_characters_as_before(text_file):
    content = text_file.read_text(encoding="utf-8")
    data = text(str(text_file), block_size=8, val_fraction=0.1, test_fraction=0.2)
    vocab = "".join(sorted(set(content)))  # what text() did before the cache
    assert data.spec.tokenizer.decode(list(range(data.spec.vocab_size))) == vocab
    assert all_tokens(data) == [vocab.index(c) for c in content]
    n_test, n_val = int(len(content) * 0.2), int(len(content) * 0.1)
    lengths = [len(s.tokens) for s in (data.train, data.val, data.test)]
    assert lengths == [len(content) - n_val - n_test, n_val, n_test]
    assert data.spec.tokenizer.encode("héllo") == [vocab.index(c) for c in "héllo"]


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_chunk_boundaries_do_not_change_the_tokens(tmp_path, text_file, monkeypatch, tokenizer):
    whole = text(str(text_file), block_size=8, tokenizer=tokenizer, vocab_size=300)
    copy = tmp_path / "copy" / "corpus.txt"
    copy.parent.mkdir()
    shutil.copy(text_file, copy)
    monkeypatch.setattr(tokenize, "CHUNK_BYTES", 7)  # cuts through "é" and "✓" too
    chunked = text(str(copy), block_size=8, tokenizer=tokenizer, vocab_size=300)
    if tokenizer == "char":
        assert all_tokens(chunked) == all_tokens(whole)
    decode = chunked.spec.tokenizer.decode
    assert decode(all_tokens(chunked)) == text_file.read_text(encoding="utf-8")


def test_utf8_pieces_end_on_character_boundaries(tmp_path):
    path = tmp_path / "mixed.txt"
    content = "aé✓😀b" * 5
    path.write_text(content, encoding="utf-8")
    for size in range(1, 9):
        pieces = list(tokenize.utf8_pieces(path, size))
        assert "".join(piece.decode("utf-8") for _, piece in pieces) == content
        assert [offset for offset, _ in pieces] == list(
            np.cumsum([0] + [len(piece) for _, piece in pieces[:-1]]))


def test_the_second_call_memory_maps_the_cache(text_file):
    first = text(str(text_file), block_size=8)
    [folder] = cache_folders(text_file.parent / ".trainer-cache")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    second = text(str(text_file), block_size=8)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    assert all_tokens(second) == all_tokens(first)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format"] == token_cache.FORMAT and meta["dtype"] == "uint16"
    assert meta["tokenizer"]["name"] == "char" and sum(meta["splits"].values()) == len(
        all_tokens(first))


def test_an_edited_file_gets_a_new_cache_and_the_old_one_goes(text_file):
    text(str(text_file), block_size=8)
    [old] = cache_folders(text_file.parent / ".trainer-cache")
    text_file.write_text(text_file.read_text(encoding="utf-8") + "Zebras!\n", encoding="utf-8")
    data = text(str(text_file), block_size=8)
    assert data.spec.tokenizer.decode(all_tokens(data)).endswith("Zebras!\n")
    [new] = cache_folders(text_file.parent / ".trainer-cache")
    assert new != old


def test_a_cache_of_an_older_format_is_rebuilt(text_file, caplog):
    first = text(str(text_file), block_size=8)
    [folder] = cache_folders(text_file.parent / ".trainer-cache")
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": token_cache.FORMAT - 1}))
    stale = (folder / "tokens.bin").stat().st_ino
    with caplog.at_level(logging.INFO, logger="trainer"):
        second = text(str(text_file), block_size=8)
    assert any("rebuilding the token cache" in r.getMessage() and "format" in r.getMessage()
               for r in caplog.records)
    assert (folder / "tokens.bin").stat().st_ino != stale
    assert json.loads((folder / "meta.json").read_text())["format"] == token_cache.FORMAT
    assert all_tokens(second) == all_tokens(first)


def test_a_cache_that_does_not_match_its_meta_is_rebuilt(text_file, caplog):
    text(str(text_file), block_size=8)
    [folder] = cache_folders(text_file.parent / ".trainer-cache")
    (folder / "tokens.bin").write_bytes(b"\0\0")  # truncated
    with caplog.at_level(logging.INFO, logger="trainer"):
        data = text(str(text_file), block_size=8)
    assert any("not the size" in r.getMessage() for r in caplog.records)
    assert data.spec.tokenizer.decode(all_tokens(data)) == text_file.read_text(encoding="utf-8")


def test_processes_that_start_together_tokenize_once(text_file, caplog):
    results: list = [None, None]

    def load(i: int) -> None:
        results[i] = text(str(text_file), block_size=8, tokenizer="bpe", vocab_size=300)

    with caplog.at_level(logging.INFO, logger="trainer"):
        threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum("tokenized" in r.getMessage() for r in caplog.records) == 1
    assert all_tokens(results[0]) == all_tokens(results[1])


def test_a_read_only_data_folder_caches_in_xdg_cache_home(text_file, tmp_path_factory,
                                                          monkeypatch):
    xdg = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    text_file.parent.chmod(0o555)  # honoured even by root: a folder marked read-only is left be
    try:
        data = text(str(text_file), block_size=8)
        again = text(str(text_file), block_size=8)
    finally:
        text_file.parent.chmod(0o755)
    assert not (text_file.parent / ".trainer-cache").exists()
    [folder] = cache_folders(xdg / "trainer")
    assert folder.name.startswith("corpus.txt.char.")
    assert all_tokens(again) == all_tokens(data)


def test_a_given_vocabulary_numbers_the_characters_as_it_does(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("abcab" * 40, encoding="utf-8")
    own = text(str(path), block_size=4)
    given = text(str(path), block_size=4, vocabulary="xcba")
    assert own.spec.tokenizer.chars == "abc" and given.spec.tokenizer.chars == "xcba"
    assert given.train.tokens[:5].tolist() == [3, 2, 1, 3, 2]  # a, b, c in "xcba"
    assert given.spec.tokenizer.decode(given.train.tokens[:5].tolist()) == "abcab"
    with pytest.raises(UserError, match="has characters data.vocabulary lacks: 'c'"):
        text(str(path), block_size=4, vocabulary="ab")
    with pytest.raises(UserError, match="data.vocabulary applies to data.tokenizer=char"):
        text(str(path), block_size=4, tokenizer="bpe", vocab_size=256, vocabulary="abc")


def test_bpe_trains_on_the_train_split_only_and_round_trips(tmp_path):
    path = tmp_path / "corpus.txt"
    train_part = "the cat sat on the mat, naïvely.\n" * 60
    held_out = "zwq jkw 😀 zwq jkw\n" * 40  # letters the train split lacks
    path.write_text(train_part + held_out, encoding="utf-8")
    fraction = len(held_out) / (len(train_part) + len(held_out)) / 2
    data = text(str(path), block_size=8, tokenizer="bpe", vocab_size=300,
                val_fraction=fraction, test_fraction=fraction)
    tokenizer = data.spec.tokenizer
    assert tokenizer.name == "bpe" and 256 < tokenizer.vocab_size <= 300
    merged = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    assert any("cat" in token for token in merged)
    assert not any(len(token) > 1 and set(token) & set("jkqwz") for token in merged)
    assert tokenizer.decode(all_tokens(data)) == path.read_text(encoding="utf-8")
    sample = "Ünïcode ✓ 東京 and the mat\n"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert tokenizer.token_bytes()[all_tokens(data)].sum() == path.stat().st_size
    assert len(data.train.tokens) < len(train_part)  # merges shorten the stream


def test_a_tokenizer_json_gives_the_tokens_of_the_bpe_it_saved(text_file, tmp_path):
    bpe = text(str(text_file), block_size=8, tokenizer="bpe", vocab_size=300)
    [saved] = (text_file.parent / ".trainer-cache").rglob("tokenizer.json")
    model = tmp_path / "my-model"
    model.mkdir()
    shutil.copy(saved, model / "tokenizer.json")
    for value in (model / "tokenizer.json", model):  # the file, or a model folder holding it
        data = text(str(text_file), block_size=8, tokenizer=str(value), vocab_size=7)
        assert data.spec.tokenizer.name == str(model / "tokenizer.json")
        assert data.spec.vocab_size == bpe.spec.vocab_size
        assert all_tokens(data) == all_tokens(bpe)


def eval_metrics(data) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    task = LanguageModel()
    cfg = OmegaConf.create({"_target_": "trainer.models.transformer.Transformer", "width": 16,
                            "depth": 1, "heads": 2})
    torch.manual_seed(0)
    model = task.build_model(cfg, data.spec)
    with torch.no_grad():
        sums = task.eval_step(model, data.val.batch(torch.arange(len(data.val))))
    return task.metrics({k: float(v) for k, v in sums.items()}), sums


def test_bits_per_byte_is_loss_over_ln2_for_ascii_characters(tmp_path):
    path = tmp_path / "ascii.txt"
    path.write_text("to be or not to be, that is the question.\n" * 20, encoding="utf-8")
    metrics, sums = eval_metrics(text(str(path), block_size=8))
    assert sums["bytes"] == sums["count"]
    assert metrics["bpb"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-6)
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))


def test_bits_per_byte_counts_the_utf8_bytes_of_the_targets(tmp_path):
    path = tmp_path / "accents.txt"
    path.write_text("café naïve ✓ über 東京\n" * 40, encoding="utf-8")
    data = text(str(path), block_size=8, tokenizer="bpe", vocab_size=280)
    metrics, sums = eval_metrics(data)
    targets = data.val.batch(torch.arange(len(data.val)))[1]
    expected = len(data.spec.tokenizer.decode(targets.flatten().tolist()).encode("utf-8"))
    assert sums["bytes"] == expected > sums["count"]
    assert metrics["bpb"] == pytest.approx(
        metrics["loss"] / math.log(2) * float(sums["count"] / sums["bytes"]), rel=1e-6)


def write(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(("content", "kwargs", "message"), [
    (b"", {}, "is empty"),
    (b"hello world\n" * 50 + b"\xff oops", {}, "not UTF-8 text (invalid start byte at byte 600)"),
    (b"hello\n" * 3, {}, "is too short for data.block_size=64: its train split has 18 "
                        "characters (18 characters in all)"),
    (b"hello world\n" * 100, {"block_size": 64}, "its val split has 60 characters"),
    (b"hello world\n" * 50, {"tokenizer": "word"},
     "data.tokenizer='word' is not accepted: choose char, bpe, or a path to a tokenizer.json"),
    (b"hello world\n" * 50, {"tokenizer": "missing/tokenizer.json"},
     "data.tokenizer='missing/tokenizer.json' does not exist"),
    (b"hello world\n" * 50, {"tokenizer": "/"}, "data.tokenizer='/' is a folder without a "
                                             "tokenizer.json"),
    (b"hello world\n" * 50, {"tokenizer": "bpe", "vocab_size": 100},
     "data.vocab_size=100 is out of range for data.tokenizer=bpe: it must be between 256"),
])
def test_bad_text_data_is_one_clear_line(tmp_path, content, kwargs, message):
    with pytest.raises(UserError, match=None) as error:
        text(write(tmp_path, content), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_file_that_is_not_a_tokenizer_is_one_clear_line(tmp_path):
    fake = tmp_path / "tokenizer.json"
    fake.write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError) as error:
        text(write(tmp_path, b"hello world\n" * 50), tokenizer=str(fake))
    assert f"data.tokenizer='{fake}' is not a tokenizer file" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_bad_byte_after_the_first_chunk_is_named_by_its_file_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize, "CHUNK_BYTES", 64)
    with pytest.raises(UserError, match="at byte 1001"):
        text(write(tmp_path, "é".encode() * 500 + b"x\xc3("), tokenizer="bpe")


def test_a_bpe_language_model_trains_end_to_end_and_reports_bits_per_byte(text_file, tmp_path):
    cfg = compose_train("debug=fast", "logger=none", "model=transformer", "data=text",
                        f"data.path={text_file}", "data.tokenizer=bpe", "data.vocab_size=300",
                        "data.block_size=16")
    metrics = train(cfg, tmp_path / "run")
    assert {"test/loss", "test/ppl", "test/bpb", "val/bpb"} <= set(metrics)
    assert math.isfinite(metrics["test/bpb"]) and metrics["test/bpb"] > 0
    assert os.path.exists(tmp_path / "run" / "metrics.json")


def test_more_characters_than_uint16_ids_are_stored_as_uint32(tmp_path):
    chars = "".join(chr(c) for c in range(0x20, 0x20 + 70_000) if not 0xD800 <= c < 0xE000)
    path = tmp_path / "wide.txt"
    path.write_text(chars[::-1] * 2, encoding="utf-8")  # first seen in reverse: renumbered
    data = text(str(path), block_size=8)
    assert data.spec.vocab_size == len(chars) > 1 << 16
    assert data.spec.tokenizer.decode(list(range(data.spec.vocab_size))) == chars
    assert all_tokens(data)[:3] == [len(chars) - 1, len(chars) - 2, len(chars) - 3]
    [meta] = (tmp_path / ".trainer-cache").rglob("meta.json")
    assert json.loads(meta.read_text())["dtype"] == "uint32"


def test_a_resumed_run_on_a_memory_mapped_bpe_corpus_equals_the_uninterrupted_one(
        text_file, tmp_path, monkeypatch):
    from trainer.data import text as text_module

    monkeypatch.setattr(text_module, "IN_MEMORY_TOKENS", 0)  # every split stays a memory map
    mapped = text(str(text_file), block_size=16, tokenizer="bpe", vocab_size=300)
    assert isinstance(mapped.train.tokens, np.memmap)
    common = ["debug=fast", "logger=none", "model=transformer", "model.dropout=0.2",
              "data=text", f"data.path={text_file}", "data.tokenizer=bpe",
              "data.vocab_size=300", "data.block_size=16", "trainer.val_every=4"]
    full = train(compose_train(*common, "trainer.max_steps=10"), tmp_path / "full")
    half = tmp_path / "half"
    train(compose_train(*common, "trainer.max_steps=5"), half)
    saved = torch.load(half / "checkpoints" / "last.pt", weights_only=True)
    cfg = OmegaConf.create(saved["config"])
    cfg.trainer.max_steps, cfg.resume = 10, str(half)
    assert train(cfg, half) == full
    weights = [torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
               for run in (tmp_path / "full", half)]
    assert all(torch.equal(weights[0][k], v) for k, v in weights[1].items())


@pytest.mark.parametrize("name", ["transformer", "rotary", "rnn", "gru"])
def test_sampling_with_a_cache_gives_the_logits_of_the_whole_forward(name):
    """The transformer's key-value cache and the LSTM's carried state: one position per token,
    the same numbers as running the model over everything again."""
    from trainer.models.rnn import RNN
    from trainer.models.transformer import Transformer

    torch.manual_seed(0)
    build = {"transformer": lambda: Transformer(vocab_size=20, block_size=16, width=16, depth=2,
                                                heads=2),
             "rotary": lambda: Transformer(vocab_size=20, block_size=16, width=16, depth=2,
                                           heads=2, rotary=True, tie_embeddings=True),
             "rnn": lambda: RNN(vocab_size=20, block_size=16, width=16, depth=2),
             "gru": lambda: RNN(vocab_size=20, block_size=16, width=16, depth=2, cell="gru")}
    model = build[name]().eval()
    tokens = torch.randint(0, 20, (2, 12))
    with torch.no_grad():
        whole = model(tokens)  # (B, T, vocab): every position at once
    logits, state = model.decode(tokens[:, :5])
    torch.testing.assert_close(logits, whole[:, 4], rtol=1e-5, atol=1e-5)
    for position in range(5, 12):
        logits, state = model.decode(tokens[:, position:position + 1], state)
        torch.testing.assert_close(logits, whole[:, position], rtol=1e-5, atol=1e-5)


def test_generate_is_seeded_runs_past_the_context_and_stops_on_time():
    from trainer.models.transformer import Transformer
    from trainer.tasks.language_model import generate

    torch.manual_seed(0)
    model = Transformer(vocab_size=20, block_size=8, width=16, depth=1, heads=2)
    prompt = torch.tensor([1, 2, 3])
    first = generate(model, prompt, 30, seed=7)
    assert len(first) == 33 and torch.equal(first[:3], prompt)  # 30 tokens, past 8 of context
    assert torch.equal(generate(model, prompt, 30, seed=7), first)
    assert not torch.equal(generate(model, prompt, 30, seed=8), first)
    assert len(generate(model, prompt, 30, seed=7, seconds=0)) == 4  # time is up after one
    assert model.training  # as it was


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_each_pass_over_a_text_shows_its_progress_on_a_terminal_only(text_file, monkeypatch,
                                                                     tokenizer):
    """A large corpus takes minutes to hash and tokenize: each pass says what it does and how far
    it is, once it has run PROGRESS_DELAY (here at once)."""
    monkeypatch.setattr("trainer.logging.PROGRESS_DELAY", 0)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    text(str(text_file), block_size=8, tokenizer=tokenizer, vocab_size=300)
    drawn = "".join(terminal.drawn)
    passes = (["checking corpus.txt", "tokenizing corpus.txt"] + (
        ["reading corpus.txt", "training bpe on corpus.txt"] if tokenizer == "bpe" else []))
    for what in passes:
        assert f"{what}:" in drawn and "B/s" in drawn
    monkeypatch.undo()  # a log file, not a terminal: no bars, from the cache or afresh
    (text_file.parent / "other.txt").write_text(text_file.read_text())
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    monkeypatch.setattr("trainer.logging.PROGRESS_DELAY", 0)
    text(str(text_file.parent / "other.txt"), block_size=8, tokenizer=tokenizer, vocab_size=300)
    assert piped.getvalue() == ""
