"""Byte and byte-level BPE tokenizers: exact round trips (property tests), training on real and
generated text, the vocabulary size, JSON-only save/load and the loader's checks."""

from __future__ import annotations

import functools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.model import BPETokenizer, ByteTokenizer, load_tokenizer
from components.model.tokenizer import META_FILE, VOCAB_FILE

SAMPLES = [
    "",
    "hello world",
    "  two  spaces\n\ttab",
    "naïve café ☕ 日本語 🙂👍🏽",
    "<eos> and <pad> as text",
    "\x00\x7f",
]


def generated_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Sentences from a small word list, some non-ASCII, so BPE has frequent pairs to merge."""
    rng = random.Random(seed)
    words = "the model reads data and learns to answer every question with care über café 数据 ✓".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


@functools.cache
def generated_bpe() -> BPETokenizer:
    return BPETokenizer.train(generated_corpus(), vocab_size=400)  # the corpus runs out of pairs near 330


def digit_corpus() -> list[str]:
    """Sentences full of numbers, so BPE without digit splitting merges digit pairs."""
    rng = random.Random(1)
    return [f"{w} {rng.randint(0, 999)} + {rng.randint(0, 99)} = {rng.randint(0, 9999)}." for w in
            generated_corpus(400)]


@functools.cache
def digit_bpe() -> BPETokenizer:
    return BPETokenizer.train(digit_corpus(), vocab_size=400, split_digits=True)


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, 105, tok.eos_id, tok.pad_id]) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 from a model does not raise


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_of_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_bpe_round_trip_of_any_unicode(text):
    tok = generated_bpe()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.eos_id not in ids
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_digit_split_bpe_round_trips_any_unicode(text):
    tok = digit_bpe()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=4), st.sampled_from(["", " ", "=", "x"]))
def test_digit_split_bpe_spells_numbers_one_digit_per_token(numbers, sep):
    tok = digit_bpe()
    text = sep.join(str(n) for n in numbers) + " apples"
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert "".join(pieces) == text
    for piece in pieces:  # a digit is always a token of its own
        assert not any(c.isdigit() for c in piece) or len(piece) == 1, pieces


def test_bpe_without_digit_splitting_merges_digits():
    """The contrast that gives the split its point: the same corpus, unsplit, learns digit pairs."""
    def multi_digit(tok):
        return [t for t in map(tok.decode, ([i] for i in range(tok.vocab_size))) if sum(map(str.isdigit, t)) > 1]
    assert multi_digit(BPETokenizer.train(digit_corpus(), vocab_size=400))
    assert not multi_digit(digit_bpe())


def test_bpe_trains_on_a_generated_corpus_and_compresses_it():
    tok = generated_bpe()
    assert 258 < tok.vocab_size <= 400
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    text = " ".join(generated_corpus(20, seed=1))  # unseen sentences of the same words
    assert len(tok.encode(text)) < 0.3 * len(text.encode())
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_bpe_on_tiny_shakespeare(shared_data, tmp_path):
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    text = path.read_bytes()[:20_000].decode("utf-8", errors="ignore")
    lines = text.splitlines(keepends=True)
    tok = BPETokenizer.train(lines, vocab_size=512)
    assert 258 < tok.vocab_size <= 512
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.5 * len(text.encode())  # about 2+ bytes per token at this size
    loaded = load_tokenizer(tok.save(tmp_path / "tok"))
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(text) == ids


@pytest.mark.parametrize("make", [ByteTokenizer, generated_bpe, digit_bpe], ids=["byte", "bpe", "bpe-digits"])
def test_save_load_is_json_only_and_equal(make, tmp_path):
    tok = make()
    folder = tok.save(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == [VOCAB_FILE, META_FILE]
    meta = json.loads((folder / META_FILE).read_text())
    json.loads((folder / VOCAB_FILE).read_text())  # plain JSON, no pickle
    assert meta == {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    loaded = load_tokenizer(folder)
    assert type(loaded) is type(tok)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (tok.vocab_size, tok.eos_id, tok.pad_id)
    for s in [*SAMPLES, "12 + 345 = 357"]:
        assert loaded.encode(s) == tok.encode(s)
    again = loaded.save(tmp_path / "again")
    assert (again / VOCAB_FILE).read_bytes() == (folder / VOCAB_FILE).read_bytes()


def test_bpe_vocab_size_is_a_ceiling_and_has_a_floor():
    small = BPETokenizer.train(generated_corpus(), vocab_size=270)
    assert small.vocab_size == 270
    with pytest.raises(ValueError, match="below 258"):
        BPETokenizer.train(generated_corpus(), vocab_size=100)


def test_load_tokenizer_refuses_unknown_or_inconsistent_folders(tmp_path):
    folder = ByteTokenizer().save(tmp_path / "tok")
    meta = json.loads((folder / META_FILE).read_text())
    (folder / META_FILE).write_text(json.dumps({**meta, "kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(folder)
    (folder / META_FILE).write_text(json.dumps({**meta, "vocab_size": 300}))
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(folder)
    bpe_folder = generated_bpe().save(tmp_path / "bpe")
    (bpe_folder / META_FILE).write_text(json.dumps({**meta}))  # says byte, holds a BPE vocabulary
    with pytest.raises(ValueError, match="not the byte tokenizer"):
        load_tokenizer(bpe_folder)
