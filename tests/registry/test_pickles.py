"""Pickle payloads in every protocol under every accepted name are refused (components/registry/
pickles.py); what the walk accepts, CPython's two unpicklers cannot load or import from; real
tokenizer, text, JSON and safetensors files still pass."""

from __future__ import annotations

import collections
import datetime
import fractions
import functools
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from registry_helpers import make_model, snapshot

from components.registry import ArtifactRefused, RegistryError
from components.registry import pickles
from components.registry.artifact import inspect_folder
from components.registry.config import RegistryConfig
from components.registry.pickles import OPS, scan, scan_file

CFG = RegistryConfig()
PICKLED = r"is a pickle payload \(protocol \d, [A-Z_0-9]+ at byte \d+ "


class Plain:
    """A class of this module: pickled by reference (GLOBAL / STACK_GLOBAL tests.registry...)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Plain) and other.value == self.value


REFERENCES = [os.system, os.getcwd, len, print, collections.OrderedDict(a=1), datetime.date(2020, 1, 2),
              fractions.Fraction(1, 3), complex(1, 2), functools.partial(print, 1), range(3), bytearray(b"x"),
              Plain(1), Plain, shutil.rmtree, collections.Counter("ab"), frozenset({1})]

plain_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)
objects = st.recursive(
    plain_data | st.sampled_from(REFERENCES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
names = st.one_of(
    st.sampled_from(["model.json", "model.safetensors", "tokenizer/tokenizer.json", "tokenizer/vocab.txt",
                     "tokenizer/merges.txt", "README.md", "tokenizer/spm.model"]),
    st.builds(lambda d, stem, suffix: f"{d}{stem}{suffix}", st.sampled_from(["", "tokenizer/", "extra/deep/"]),
              st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True), st.sampled_from(CFG.allowed_suffixes)))


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("clean") / "model", seed=7)


def test_genops_alone_would_let_a_protocol_0_pickle_through():
    """Why the walk does not use pickletools.genops: both unpicklers read INT's line with base 0."""
    payload = b"I0x10\ncos\ngetcwd\n)R."
    with pytest.raises(ValueError, match="invalid literal"):
        list(pickletools.genops(payload))
    assert pickle.loads(payload) == os.getcwd() == pickle._loads(payload)  # it ran os.getcwd()
    assert str(scan(payload)) == "protocol 0, GLOBAL at byte 6 imports os.getcwd"


def test_the_protocol_0_example_under_a_text_name(clean_model):
    path = clean_model / "tokenizer" / "vocab.txt"
    path.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    try:
        with pytest.raises(ArtifactRefused) as err:
            inspect_folder(clean_model, CFG)
    finally:
        path.unlink()
    assert str(err.value) == ("tokenizer/vocab.txt: is a pickle payload (protocol 0, GLOBAL at byte 0 imports "
                              "os.system); only safetensors, JSON and text are accepted")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=objects, protocol=st.integers(0, 5), name=names)
def test_pickles_of_anything_in_every_protocol_under_any_accepted_name_are_refused(clean_model, obj, protocol, name):
    try:
        data = pickle.dumps(obj, protocol=protocol)
    except (pickle.PicklingError, TypeError, AttributeError):
        assume(False)
    path = clean_model / name
    before = path.read_bytes() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    try:
        with pytest.raises(ArtifactRefused, match=rf"^{re.escape(name)}: {PICKLED}"):
            inspect_folder(clean_model, CFG)
    finally:
        if before is None:
            path.unlink()
        else:
            path.write_bytes(before)
    inspect_folder(clean_model, CFG)  # restored: the clean folder passes


@pytest.mark.parametrize("protocol", range(6))
def test_register_refuses_every_protocol_and_changes_nothing(registry, model_factory, protocol):
    folder = model_factory()
    (folder / "tokenizer" / "merges.txt").write_bytes(pickle.dumps([Plain(1)], protocol=protocol))
    before = snapshot(registry.root)
    with pytest.raises(RegistryError, match=rf"tokenizer/merges\.txt: {PICKLED}imports [\w.]+\.\w+\);"):
        registry.register(folder, "lm")
    assert snapshot(registry.root) == before
    assert registry.register(model_factory(), "lm").version == "v0.0.1"


# ---- soundness against the real unpicklers ----------------------------------------------------

class Reached(Exception):
    """find_class or persistent_load was called."""


def recording(base):
    class Unpickler(base):
        def find_class(self, module, name):
            raise Reached(f"find_class({module!r}, {name!r})")

        def persistent_load(self, pid):
            raise Reached(f"persistent_load({pid!r})")

    return Unpickler


UNPICKLERS = (recording(pickle.Unpickler), recording(pickle._Unpickler))
READERS = (io.BytesIO, lambda data: io.BufferedReader(io.BytesIO(data), 16))
"""The C unpickler reads a file with peek (BufferedReader) differently from one without (BytesIO)."""
LINES = [b"0\n", b"1\n", b"00\n", b"0x10\n", b"-1\n", b"1.5\n", b"1L\n", b"'a'\n", b"os\n", b"getcwd\n", b"\n",
         b"o\xffs\n", b"\xc3\xa9\n", b"zz\n", b""]
CODES = sorted(OPS)


@st.composite
def opcode_streams(draw) -> bytes:
    """Opcode streams, mostly well framed, with small counts and memo indices (a real unpickler
    allocates a memo as large as the index and a buffer as large as a count)."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 14))):
        if draw(st.integers(0, 19)) == 0:
            out.append(draw(st.integers(0, 255)))
            continue
        code = draw(st.sampled_from(CODES) | st.sampled_from(b"()N.012aelt}]dsuKgphqQXIbRociP\x93\x94\x8c\x85\x86"))
        op = OPS[code]
        out.append(code)
        if op.arg is None:
            continue
        if op.arg >= 0:
            out += draw(st.sampled_from([0, 1, 2, 3, 0x2E, 0x63])).to_bytes(op.arg, "little") if op.arg else b""
        elif op.arg == pickletools.UP_TO_NEWLINE:
            out += draw(st.sampled_from(LINES))
            if op.name in ("GLOBAL", "INST"):
                out += draw(st.sampled_from(LINES))
        else:
            width = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                     pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}[op.arg]
            count = draw(st.integers(0, 8))
            out += count.to_bytes(width, "little") + draw(st.binary(min_size=0, max_size=count))
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(data=opcode_streams())
def test_what_the_walk_accepts_no_unpickler_loads_or_imports_from(data):
    """Accepted means: the C and the pure-Python unpickler both raise, and neither called
    find_class or persistent_load on the way."""
    if scan(data) is not None:
        return
    for unpickler in UNPICKLERS:
        for reader in READERS:
            try:
                value = unpickler(reader(data)).load()
            except Reached as reached:
                raise AssertionError(f"{data!r}: accepted, but {unpickler.__mro__[1].__module__} reached {reached}")
            except Exception:
                continue
            raise AssertionError(f"{data!r}: accepted, but {unpickler.__mro__[1].__module__} loaded {value!r}")


@pytest.mark.parametrize("data, reason", [
    (b"\x80\x02}q\x00.", "ends a complete pickle"),
    (b"(e.", None),  # APPENDS with nothing below its MARK: both unpicklers raise
    (b"]((e.", "ends a complete pickle"),  # the list is below another MARK: the walk stops tracking
    (b"](N(e.", "ends a complete pickle"),  # the C unpickler returns None here (nothing to append)
    (b"N(0.", "ends a complete pickle"),  # POP on an empty frame pops the MARK
    (b"\x8c\x02os\x8c\x06getcwd\x93.", "imports os.getcwd"),
    (b"\x93", None),  # STACK_GLOBAL with an empty stack (NumPy's .npy magic starts so)
    (b"\x82\x05", "imports extension code 5 of copyreg"),
    (b"P1\n", "calls the loader's persistent_load"),
    (b"P\xff\n", None),  # persistent ids must be ASCII: both unpicklers raise before calling it
    (b"cos\nsys\xfftem\n", None),  # GLOBAL's names must be UTF-8 ...
    (b"c\xc3\xa9\nx\n", "imports ?.x"),  # ... and may be any UTF-8
    (b"(i\xc3\xa9\nx\n", None),  # INST's must be ASCII
    (b"X\xff\xff\xff\x7fcos\nsystem\n", None),  # a count past the end of the file
    (b"\x8e" + (1 << 60).to_bytes(8, "little") + b"cos\nsystem\n", None),  # never allocated
    (b"T\xff\xff\xff\xffcos\nsystem\n", None),  # BINSTRING's negative count
    (b"\x95" + (1 << 62).to_bytes(8, "little") + b"cos\nsystem\n", "imports os.system"),  # frames are framing
    (b"gx\ncos\nsystem\n", None),  # GET from an empty memo
    # J's argument runs past a 2-byte frame: read from a file, the C unpickler takes it from after
    # the frame (BINGET there is skipped and it loads an int); walked linearly, BINGET stops it
    (b"\x95\x02" + bytes(7) + b"JE\xef\x9c\x19h.", "reads across the end of the frame ending at byte 11"),
])
def test_walk_cases(data, reason):
    found = scan(data)
    assert (found and found.what) == reason


def test_a_frame_read_two_ways_is_refused():
    data = b"\x95\x02" + bytes(7) + b"JE\xef\x9c\x19h."
    assert pickle.Unpickler(io.BytesIO(data)).load() == 0x68199CEF  # what the walk must not miss
    with pytest.raises(pickle.UnpicklingError, match="Memo value not found"):
        pickle.loads(data)
    assert scan(data).opcode == "BININT"
    for protocol in (4, 5):  # real frames end between opcodes
        assert scan(pickle.dumps(list(range(30_000)), protocol=protocol)).opcode == "STOP"


def test_a_long_walk_is_refused_unread_to_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(pickles, "MAX_OPCODES", 1000)
    path = tmp_path / "x.txt"
    path.write_bytes(b"N" * 5000)
    found = scan_file(path)
    assert found.opcode == "NONE" and "unbroken stream of 1,000 opcodes" in found.what
    (tmp_path / "empty.txt").touch()
    assert scan_file(tmp_path / "empty.txt") is None


# ---- real files still pass ---------------------------------------------------------------------

def test_text_json_and_tokenizer_files_pass(tmp_path):
    for text in ("docs/\n", "ability\nable\n", "[PAD]\n[UNK]\n", "#version: 0.2\nĠ t\n", '{"a": 1}', "[1, 2]",
                 "---\nlicense: mit\n---\n# Model card\n", "Ġ t\ni n\n", "good\ncat\n", "\n", ".gitignore\n"):
        (tmp_path / "f.txt").write_text(text, encoding="utf-8")
        assert scan_file(tmp_path / "f.txt") is None, text


def test_the_repos_tokenizers_and_transformers_files_pass(tmp_path):
    from components.model.tokenizer import BPETokenizer, ByteTokenizer, as_hf_tokenizer

    corpus = ["the cat sat on the mat", "numbers 12 + 30 = 42", "import os; os.system('x')"] * 20
    bpe = BPETokenizer.train(corpus, vocab_size=300, min_frequency=1)
    bpe.save(tmp_path / "bpe")
    ByteTokenizer().save(tmp_path / "byte")
    (tmp_path / "hf").mkdir()
    as_hf_tokenizer(bpe).save_hf(tmp_path / "hf")
    transformers = pytest.importorskip("transformers")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "the", "##s"])}
    (tmp_path / "bert_vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(tmp_path / "bert_vocab.txt")).save_pretrained(tmp_path / "bert")
    gpt2_vocab = {"<|endoftext|>": 0, "c": 1, "a": 2, "t": 3, "ca": 4, "cat": 5, "Ġ": 6}
    (tmp_path / "vocab.json").write_text(json.dumps(gpt2_vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t\n")
    transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(
        tmp_path / "gpt2")
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json")).save_pretrained(
        tmp_path / "fast")
    files = {str(p.relative_to(tmp_path)): p for p in tmp_path.rglob("*") if p.suffix in CFG.allowed_suffixes}
    assert len(files) >= 12
    assert {rel: scan_file(p) for rel, p in files.items()} == dict.fromkeys(files)


def safetensors_with(tmp_path: Path, want) -> Path:
    """A real safetensors file (random weights) whose walk gives `want(found, first_byte)`, found
    by padding its metadata; laid out as the safetensors library writes it (checked: it opens)."""
    weights = np.random.default_rng(0).standard_normal((16, 8), dtype=np.float32).tobytes()
    path = tmp_path / "model.safetensors"
    for pad in range(50_000):
        header = json.dumps({"__metadata__": {"pad": "x" * pad},
                             "wte.weight": {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, len(weights)]}},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        data = len(header).to_bytes(8, "little") + header + weights
        if want(scan(data), data[0]):
            path.write_bytes(data)
            return path
    raise AssertionError("no such header length found")


def test_safetensors_whose_length_bytes_spell_opcodes(tmp_path):
    """The 8 length bytes are the first opcodes an unpickler reads; a STOP of plain data there is
    still a safetensors file, a persistent id is refused with a hint."""
    folder = make_model(tmp_path / "m", 1)
    weights = folder / "model.safetensors"
    path = safetensors_with(tmp_path, lambda found, first: found is not None and found.opcode == "STOP")
    shutil.copy(path, weights)
    assert "model.safetensors" in inspect_folder(folder, CFG)
    path = safetensors_with(tmp_path, lambda found, first: found is None and first == ord("P"))
    shutil.copy(path, weights)
    assert "model.safetensors" in inspect_folder(folder, CFG)  # e.g. 'P' followed by non-ASCII bytes
    zeros = tmp_path / "z.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()
    header += b" " * (0x0A50 - len(header))  # length bytes b"P\n": PERSID with the persistent id ""
    zeros.write_bytes(len(header).to_bytes(8, "little") + header + bytes(256))
    shutil.copy(zeros, weights)
    with pytest.raises(ArtifactRefused, match=r"model\.safetensors: is a pickle payload \(protocol 0, PERSID at "
                                              r"byte 0 calls the loader's persistent_load\).*change __metadata__"):
        inspect_folder(folder, CFG)


@pytest.mark.parametrize("compress", ["zlib", "gzip", "bz2", "xz", "lzma"])
def test_joblib_compressed_pickles_under_accepted_names_are_refused(tmp_path, compress):
    """joblib.load inflates by content, whatever the name; sentencepiece's .model is not parsed."""
    joblib = pytest.importorskip("joblib")
    folder = make_model(tmp_path / "m", 1)
    joblib.dump([Plain(1)], folder / "tokenizer" / "spm.model", compress=(compress, 3))
    assert joblib.load(folder / "tokenizer" / "spm.model") == [Plain(1)]
    with pytest.raises(ArtifactRefused, match=rf"tokenizer/spm\.model: is {compress}-compressed data"):
        inspect_folder(folder, CFG)


def test_text_that_starts_like_a_zlib_header_passes(tmp_path):
    folder = make_model(tmp_path / "m", 1)
    (folder / "tokenizer" / "notes.txt").write_text("x^ marks the spot\nx} too\n")
    assert "tokenizer/notes.txt" in inspect_folder(folder, CFG)


def test_npy_and_tar_under_accepted_names_are_refused(tmp_path):
    folder = make_model(tmp_path / "m", 1)
    np.save(folder / "tokenizer" / "x.npy", np.array([Plain(1)], dtype=object), allow_pickle=True)
    (folder / "tokenizer" / "x.npy").rename(folder / "tokenizer" / "spm.model")
    with pytest.raises(ArtifactRefused, match=r"tokenizer/spm\.model: is a NumPy \.npy array"):
        inspect_folder(folder, CFG)
    (folder / "tokenizer" / "spm.model").unlink()
    with tarfile.open(folder / "notes.md", "w") as tf:
        info = tarfile.TarInfo("pickle")
        data = pickle.dumps(1, protocol=2)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ArtifactRefused, match=r"notes\.md: is a tar archive"):
        inspect_folder(folder, CFG)
