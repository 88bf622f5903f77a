"""Model folders the registry refuses, with nothing written: pickle payloads (a real
torch.save file), symlinks leaving the folder, device files, broken safetensors, bad reports."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from registry_helpers import snapshot

from components.registry import RegistryError
from components.registry.artifact import inspect_folder, model_digest
from components.registry.config import RegistryConfig


def refused(registry, folder: Path, match: str, **kwargs) -> None:
    before = snapshot(registry.root)
    with pytest.raises(RegistryError, match=match):
        registry.register(folder, "lm", **kwargs)
    assert snapshot(registry.root) == before
    scratch = registry.root / ".git" / "distillery-tmp"
    assert not scratch.exists() or not any(scratch.iterdir())


def test_torch_save_renamed_to_safetensors_is_refused(registry, model_factory):
    folder = model_factory()
    torch.save({"w": torch.zeros(2, 2)}, folder / "model.safetensors")
    refused(registry, folder, r"model\.safetensors: is a pickle payload \(a torch\.save zip archive holding .*data\.pkl")


def test_legacy_torch_save_is_refused(registry, model_factory):
    folder = model_factory()
    torch.save({"w": torch.zeros(2)}, folder / "model.safetensors", _use_new_zipfile_serialization=False)
    refused(registry, folder, r"model\.safetensors: is a pickle payload \(protocol 2")


def test_pkl_beside_the_model_is_refused(registry, model_factory):
    folder = model_factory()
    (folder / "extra.pkl").write_bytes(pickle.dumps({"a": 1}))
    refused(registry, folder, r"extra\.pkl: \.pkl is a pickle-based format")


def test_pickle_bytes_under_an_innocent_name_are_refused(registry, model_factory):
    folder = model_factory()
    (folder / "tokenizer" / "merges.txt").write_bytes(pickle.dumps(["x"], protocol=4))
    refused(registry, folder, r"tokenizer/merges\.txt: is a pickle payload \(protocol 4")


def test_pytorch_bin_and_unknown_types_are_refused(registry, model_factory):
    folder = model_factory()
    (folder / "pytorch_model.bin").write_bytes(b"\x00" * 16)
    refused(registry, folder, r"pytorch_model\.bin: \.bin is a pickle-based format")
    (folder / "pytorch_model.bin").unlink()
    (folder / "run.sh").write_text("rm -rf /")
    refused(registry, folder, r"run\.sh: file type '\.sh' is not accepted")


def test_symlink_leaving_the_folder_is_refused(registry, model_factory, tmp_path):
    folder = model_factory()
    (folder / "tokenizer" / "tokenizer.json").unlink()
    os.symlink("/etc/passwd", folder / "tokenizer" / "tokenizer.json")
    refused(registry, folder, r"tokenizer/tokenizer\.json: is a symlink leaving the model folder")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    os.symlink(os.path.relpath(secret, folder / "tokenizer"), folder / "tokenizer" / "tokenizer.json")
    refused(registry, folder, r"leaving the model folder")


def test_symlink_to_a_folder_and_dangling_symlinks_are_refused(registry, model_factory):
    folder = model_factory()
    os.symlink("/", folder / "root")
    refused(registry, folder, r"root: is a symlink leaving")
    (folder / "root").unlink()
    os.symlink("tokenizer", folder / "tok2")
    refused(registry, folder, r"tok2: is a symlink to a folder")
    (folder / "tok2").unlink()
    os.symlink("nowhere.json", folder / "gone.json")
    refused(registry, folder, r"gone\.json: is a dangling symlink")


def test_an_inner_file_symlink_is_stored_as_a_file(registry, model_factory):
    folder = model_factory()
    os.symlink("../model.json", folder / "tokenizer" / "config.json")
    r = registry.register(folder, "lm")
    stored = r.path / "tokenizer" / "config.json"
    assert not stored.is_symlink() and stored.read_text() == (folder / "model.json").read_text()


def test_fifo_is_refused(registry, model_factory):
    folder = model_factory()
    os.mkfifo(folder / "pipe.json")
    refused(registry, folder, r"pipe\.json: is not a regular file")


def test_broken_safetensors_and_json_are_refused(registry, model_factory):
    folder = model_factory()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-3])
    refused(registry, folder, r"model\.safetensors: is not a valid safetensors file")
    (folder / "model.safetensors").write_bytes(data)
    (folder / "model.json").write_text("{not json")
    refused(registry, folder, r"model\.json: is not valid JSON")


def test_missing_parts_are_named(registry, model_factory):
    folder = model_factory()
    shutil.rmtree(folder / "tokenizer")
    refused(registry, folder, r"tokenizer: missing or empty")
    folder = model_factory()
    (folder / "model.safetensors").unlink()
    refused(registry, folder, r"model\.safetensors: missing")
    refused(registry, folder.parent / "nope", r"nope: is not a model folder")


def test_reports_are_checked(registry, model_factory):
    folder = model_factory()
    (folder / "check.json").unlink()
    refused(registry, folder, r"check\.json: missing; registering needs the serve\.check report")
    folder = model_factory(check={"passed": "yes"})
    refused(registry, folder, r"check\.json: field 'passed' must be true or false")
    folder = model_factory()
    (folder / "metrics.json").write_text('{"accuracy": NaN}')
    refused(registry, folder, r"metrics\.json: field 'accuracy' is nan")
    refused(registry, model_factory(), r"version 'latest'", version="latest")
    before = snapshot(registry.root)
    with pytest.raises(RegistryError, match=r"name '\.\./x'"):
        registry.register(model_factory(), "../x")
    assert snapshot(registry.root) == before


def test_digest_covers_names_and_contents_not_reports(model_factory):
    a, b = model_factory(seed=1), model_factory(seed=1, metrics={"accuracy": 0.9})
    assert model_digest(a)[0] == model_digest(b)[0]
    (b / "tokenizer" / "tokenizer.json").rename(b / "tokenizer" / "tok.json")
    assert model_digest(a)[0] != model_digest(b)[0]
    assert inspect_folder(a, RegistryConfig()) == sorted(
        ["check.json", "metrics.json", "model.json", "model.safetensors", "tokenizer/tokenizer.json",
         "tokenizer/tokenizer_meta.json"])
    assert json.loads((a / "model.json").read_text())["n_layer"] == 1


def test_an_imported_models_chat_template_is_accepted_and_checked_as_text(registry, model_factory):
    folder = model_factory()
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (folder / "tokenizer" / "chat_template.jinja").write_text(template)  # what an HF import keeps
    assert "tokenizer/chat_template.jinja" in inspect_folder(folder, RegistryConfig())
    (folder / "tokenizer" / "chat_template.jinja").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    refused(registry, folder, r"tokenizer/chat_template\.jinja: is a pickle payload \(protocol 0")
    (folder / "tokenizer" / "chat_template.jinja").write_bytes(b"{% \xff %}")
    refused(registry, folder, r"tokenizer/chat_template\.jinja: is not UTF-8 text")
