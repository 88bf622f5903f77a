"""Tokenizers: raw bytes, or byte-level BPE trained offline with the `tokenizers` library.

Both write a folder of JSON only, never a pickle:

    tokenizer.json        the vocabulary (for BPE, the `tokenizers` library's own file)
    tokenizer_meta.json   {"kind": "byte" | "bpe", "vocab_size", "eos_id", "pad_id"}

and `load_tokenizer(folder)` reads the meta file to pick the class. Special tokens are <eos> and
<pad>; `decode` drops them, and text that spells "<eos>" is encoded as plain text, never as the
special id, so encode/decode round-trips any Python string of valid Unicode exactly.

    tok = BPETokenizer.train(texts, vocab_size=512)
    tok.save("out/tokenizer"); tok = load_tokenizer("out/tokenizer")
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS, PAD = "<eos>", "<pad>"
VOCAB_FILE, META_FILE = "tokenizer.json", "tokenizer_meta.json"


class Tokenizer(abc.ABC):
    """What the model steps use: text <-> ids, the special ids, a JSON folder on disk."""

    kind: str = ""
    vocab_size: int
    eos_id: int
    pad_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special ids are dropped."""

    @abc.abstractmethod
    def _vocab_json(self) -> dict | str:
        """The vocabulary as written to tokenizer.json."""

    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_meta.json into `folder` (created); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = self._vocab_json()
        text = vocab if isinstance(vocab, str) else json.dumps(vocab, indent=1, sort_keys=True)
        (folder / VOCAB_FILE).write_text(text, encoding="utf-8")
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return folder

    @classmethod
    @abc.abstractmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        """Read a folder written by `save`."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; <eos> is 256, <pad> is 257."""

    kind = "byte"

    def __init__(self):
        self.eos_id, self.pad_id = 256, 257
        self.vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes that are not valid UTF-8 (a model's output may hold some) become U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def _vocab_json(self) -> dict:
        return {"type": "byte", "bytes": 256, "special_tokens": {EOS: self.eos_id, PAD: self.pad_id}}

    @classmethod
    def load(cls, folder: str | Path) -> ByteTokenizer:
        vocab = json.loads((Path(folder) / VOCAB_FILE).read_text(encoding="utf-8"))
        tok = cls()
        if vocab != tok._vocab_json():
            raise ValueError(f"{Path(folder) / VOCAB_FILE}: not the byte tokenizer this code writes: {vocab}")
        return tok


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization, no normalizer); <eos> and <pad> are ids 0 and 1."""

    kind = "bpe"

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # "<eos>" in text is text, not the special token
        self.vocab_size = tokenizer.get_vocab_size()
        eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
        if eos is None or pad is None:
            raise ValueError(f"BPE vocabulary lacks the special tokens {EOS} and {PAD}")
        self.eos_id, self.pad_id = eos, pad

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              split_digits: bool = False) -> BPETokenizer:
        """Learn merges from `texts` until `vocab_size` (256 bytes + 2 specials at least) or no pair
        is seen `min_frequency` times; a small corpus can give a smaller vocabulary. With
        `split_digits`, each digit is pre-split into its own piece, so no merge spans digits."""
        if vocab_size < 258:
            raise ValueError(f"vocab_size {vocab_size} is below 258 (256 bytes and 2 special tokens)")
        tok = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _vocab_json(self) -> str:
        return self._tok.to_str(pretty=True)

    @classmethod
    def load(cls, folder: str | Path) -> BPETokenizer:
        return cls(HFTokenizer.from_file(str(Path(folder) / VOCAB_FILE)))


KINDS: dict[str, type[Tokenizer]] = {"byte": ByteTokenizer, "bpe": BPETokenizer}


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer saved in `folder`, of the kind its tokenizer_meta.json names."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{folder / META_FILE}: unknown tokenizer kind {kind!r}; known: {', '.join(KINDS)}")
    tok = KINDS[kind].load(folder)
    saved = (meta.get("vocab_size"), meta.get("eos_id"), meta.get("pad_id"))
    if saved != (tok.vocab_size, tok.eos_id, tok.pad_id):
        raise ValueError(f"{folder / META_FILE}: {saved} does not match the vocabulary {VOCAB_FILE}")
    return tok
