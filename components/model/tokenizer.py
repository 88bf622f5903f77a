"""Tokenizers: raw bytes, byte-level BPE trained offline with the `tokenizers` library, or a
pretrained model's own Hugging Face tokenizer (kind "hf", HFTokenizer, with its chat template).

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

from tokenizers import Tokenizer as HFTokenizerLib
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

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation (a pretrained model's tokenizer may name several)."""
        return (self.eos_id,)

    def until_eos(self, ids: Iterable[int]) -> list[int]:
        """`ids` up to (not including) the first of `eos_ids`."""
        out, stops = [], set(self.eos_ids)
        for i in ids:
            if i in stops:
                break
            out.append(i)
        return out

    def prompt_ids(self, text: str) -> list[int]:
        """How a problem or question is put to the model: for a model trained here, as the base stage
        saw it, the text then a newline; a pretrained model's tokenizer applies its chat template."""
        return self.encode(f"{text}\n")

    def pair_ids(self, prompt: str, response: str) -> tuple[list[int], int]:
        """A (prompt, response) pair as one sequence of ids ending in eos, and where the response
        starts (0 when the prompt's ids are not a prefix of the whole: then every token is trained)."""
        head = self.prompt_ids(prompt)
        full = self.encode(f"{prompt}\n{response}") + [self.eos_id]
        return full, len(head) if full[:len(head)] == head else 0

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

    def __init__(self, tokenizer: HFTokenizerLib):
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
        tok = HFTokenizerLib(models.BPE())
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
        return cls(HFTokenizerLib.from_file(str(Path(folder) / VOCAB_FILE)))


HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "generation_config.json", "config.json")
"""The files of a Hugging Face checkpoint besides its weights that an imported model keeps (those
present) in tokenizer/, and so hands on through every stage: the tokenizer, its chat template, the
generation settings, and config.json (what `distillery model export-hf` writes back)."""


class HFTokenizer(Tokenizer):
    """A pretrained model's own tokenizer: its tokenizer.json run by the `tokenizers` library, its
    special tokens and chat template from tokenizer_config.json (or chat_template.jinja), and the
    end-of-sequence ids of tokenizer_config.json and generation_config.json.

    `encode` adds no special tokens but recognises the ones written in the text, as transformers'
    tokenizers do: a chat-templated prompt holds its control tokens as text. `chat` renders the chat
    template (a sandboxed Jinja environment, as transformers' apply_chat_template)."""

    kind = "hf"

    def __init__(self, tokenizer: HFTokenizerLib, config: dict, generation: dict | None = None):
        self._tok, self.config = tokenizer, config
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = _template(config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        eos = [tokenizer.token_to_id(self.eos_token)] if self.eos_token else []
        gen_eos = (generation or {}).get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self._eos_ids = tuple(dict.fromkeys(i for i in eos if isinstance(i, int)))
        if not self._eos_ids:
            raise ValueError("tokenizer_config.json names no eos_token (and generation_config.json no eos_token_id)")
        self.eos_id = self._eos_ids[0]
        pad = _token_text(config.get("pad_token"))
        pad_id = tokenizer.token_to_id(pad) if pad else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.add_bos = bool(config.get("add_bos_token")) and self.bos_token is not None
        self.bos_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self._files: dict[str, str] = {}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered over `messages` ({"role", "content"} dicts)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def prompt_ids(self, text: str) -> list[int]:
        """Ids of a user's question as the model expects it: chat-templated (one user turn, the
        assistant's turn opened) where the tokenizer has a template, else the text after BOS where
        the tokenizer adds one."""
        if self.chat_template:
            return self.encode(self.chat([{"role": "user", "content": text}]))
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + self.encode(text)

    def pair_ids(self, prompt: str, response: str) -> tuple[list[int], int]:
        """The prompt as `prompt_ids` puts it, then the response and the model's eos (the end of an
        assistant turn in a chat template, e.g. <|im_end|>)."""
        head = self.prompt_ids(prompt)
        return head + self.encode(response) + [self.eos_id], len(head)

    def _vocab_json(self) -> str:
        return self._files.get(VOCAB_FILE) or self._tok.to_str(pretty=False)  # the original bytes when read

    def save(self, folder: str | Path) -> Path:
        folder = super().save(folder)
        self.save_hf(folder)
        return folder

    def file(self, name: str) -> str | None:
        """The text of one of the checkpoint's files kept with the tokenizer (HF_FILES), if present."""
        return self._files.get(name)

    def keep_file(self, name: str, text: str) -> None:
        """Keep one more of the checkpoint's files (HF_FILES) with the tokenizer, saved with it."""
        if name not in HF_FILES:
            raise ValueError(f"{name}: not one of the files a tokenizer keeps ({', '.join(HF_FILES)})")
        self._files[name] = text

    def save_hf(self, folder: str | Path) -> None:
        """The Hugging Face files only (tokenizer.json, tokenizer_config.json, ...), as they were read."""
        folder = Path(folder)
        files = {VOCAB_FILE: self._vocab_json(), "tokenizer_config.json": json.dumps(self.config, indent=2),
                 **{k: v for k, v in self._files.items() if k != VOCAB_FILE}}
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> HFTokenizer:
        folder = Path(folder)
        files = {name: (folder / name).read_text(encoding="utf-8") for name in HF_FILES if (folder / name).is_file()}
        return cls.from_files(files, str(folder))

    @classmethod
    def from_files(cls, files: dict[str, str], where: str) -> HFTokenizer:
        """From the texts of a Hugging Face tokenizer's files (HF_FILES, by name); `where` names them in errors."""
        if VOCAB_FILE not in files:
            raise ValueError(f"{where}: no {VOCAB_FILE} (a Hugging Face fast tokenizer is needed; "
                             f"sentencepiece .model files are not read)")
        try:
            tok = HFTokenizerLib.from_str(files[VOCAB_FILE])
        except Exception as err:  # the library raises its own Exception type
            raise ValueError(f"{where}/{VOCAB_FILE}: not a tokenizers file: {str(err)[:200]}") from None
        config = _json(files.get("tokenizer_config.json", "{}"), f"{where}/tokenizer_config.json")
        if "chat_template.jinja" in files and not config.get("chat_template"):
            config["chat_template"] = files["chat_template.jinja"]
        generation = _json(files.get("generation_config.json", "{}"), f"{where}/generation_config.json")
        out = cls(tok, config, generation)
        out._files = dict(files)
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as byte-level BPE vocabularies spell them."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def as_hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """The Hugging Face form of one of our tokenizers, with the same ids: a byte tokenizer becomes a
    byte-level BPE without merges (byte b is id b), a BPE one keeps its tokenizer.json."""
    from tokenizers import AddedToken

    if isinstance(tok, ByteTokenizer):
        lib = HFTokenizerLib(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
        lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        lib.decoder = decoders.ByteLevel()
        lib.add_special_tokens([AddedToken(EOS, special=True), AddedToken(PAD, special=True)])
        text = lib.to_str()
    elif isinstance(tok, BPETokenizer):
        text = tok._vocab_json()
    else:
        raise ValueError(f"no Hugging Face form for a {tok.kind!r} tokenizer")
    config = {"eos_token": EOS, "pad_token": PAD, "tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": 1 << 30}
    return HFTokenizer.from_files({VOCAB_FILE: text, "tokenizer_config.json": json.dumps(config, indent=2)}, "tokenizer")


def _json(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return value


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template(value) -> str | None:
    """The default chat template (a list of named ones is allowed, as in transformers)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, **specials: str) -> str:
    """Render a chat template as transformers does: a sandboxed, immutable Jinja environment with
    trim_blocks and lstrip_blocks, the loop-controls extension, `raise_exception`, `strftime_now`
    and a `tojson` that keeps non-ASCII text."""
    import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            tools=None, documents=None, **specials)


KINDS: dict[str, type[Tokenizer]] = {"byte": ByteTokenizer, "bpe": BPETokenizer, "hf": HFTokenizer}


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
