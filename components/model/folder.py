"""Model folders, read and written in one place: every stage, the server and the tests use this.

    save_model(tmp, state, cfg, tokenizer)                  # model.safetensors (fp32), model.json, tokenizer/
    cfg, state, tok = load_pretrained("runs/base/model")   # a float folder, checked against model.json
    model, tok = load_model("runs/quantize/model")          # float or INT8 (quantization.json), ready to run

A float folder: model.json (ModelConfig), model.safetensors (fp32; a tied head stored once) and
tokenizer/. An INT8 folder adds quantization.json, and its model.safetensors holds the int8
weights and scales of components/model/int8.py. Weights come from safetensors only: nothing is
unpickled. A folder that does not match its model.json is refused with the file and the tensors
named.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from components.config import ConfigError, from_dict
from components.data.load import DataError
from components.model.config import ModelConfig
from components.model.int8 import FORMAT, quantizable, swap_modules
from components.model.model import Transformer, model_rope_tables
from components.model.tokenizer import load_tokenizer


class ModelFolderError(DataError):
    """A model folder that is missing a file or holds something else."""


class HFImportError(ModelFolderError):
    """A checkpoint that cannot be imported (hf.py, gguf_file.py): the message names the file and what is wrong."""


def load_pretrained(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    """(config, fp32 state dict, tokenizer) of a model folder written by a training stage."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "quantization.json").exists():
        raise ModelFolderError(f"{folder}: an INT8-quantized model folder; stages train from a float model "
                               f"folder (quantize the result instead)")
    for name in ("model.json", "model.safetensors", "tokenizer"):
        if not (folder / name).exists():
            hint = (f"a Hugging Face folder: import it first, distillery model import {folder} --out DIR"
                    if (folder / "config.json").is_file() else "give a stage's model/ output, e.g. runs/base/model")
            raise ModelFolderError(f"{folder}: not a model folder (no {name}); {hint}")
    try:
        cfg = from_dict(ModelConfig, json.loads((folder / "model.json").read_text(encoding="utf-8")), "model.json")
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise ModelFolderError(f"{folder / 'model.json'}: {err}") from None
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: not a readable safetensors file: {err}") from None
    expected = expected_state(cfg)
    if cfg.tie_embeddings:  # tied weights are stored once, under either name
        for a, b in (("lm_head.weight", "wte.weight"), ("wte.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: does not match model.json "
                               f"(missing {missing[:3]}, wrong shape {wrong[:3]})")
    tok = read_tokenizer(folder, cfg)
    return cfg, {k: v.float() for k, v in state.items() if k in expected}, tok


def read_tokenizer(folder: Path, cfg: ModelConfig):
    """The tokenizer/ of a model folder, checked against model.json: a pretrained model's own
    tokenizer may have fewer ids than the embedding has rows (Qwen2 pads its embedding), never more."""
    try:
        tok = load_tokenizer(folder / "tokenizer")
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{folder / 'tokenizer'}: {err}") from None
    fits = tok.vocab_size <= cfg.vocab_size if tok.kind == "hf" else tok.vocab_size == cfg.vocab_size
    if not fits:
        raise ModelFolderError(f"{folder}: the tokenizer has {tok.vocab_size} ids but model.json says "
                               f"vocab_size {cfg.vocab_size}")
    return tok


def load_model(folder: str | os.PathLike) -> tuple[Transformer, object]:
    """(model in eval mode, tokenizer) of a model folder; an INT8 folder (quantization.json, written
    by compress.quantize) comes back with its quantized modules swapped in."""
    if (Path(folder) / "quantization.json").exists():
        return load_quantized(folder)
    cfg, state, tok = load_pretrained(folder)
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval(), tok


def expected_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The names, shapes and dtypes of a model's state dict, as tensors without storage (meta)."""
    with torch.device("meta"):
        return Transformer(cfg).state_dict()


def save_model(folder: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: Any) -> Transformer:
    """model.safetensors (fp32, tied weights stored once), model.json and tokenizer/ into `folder`
    (the caller makes it atomic); the fp32 model it wrote, holding `state`'s fp32 tensors themselves
    (no copy: a large imported model is in memory once)."""
    from safetensors.torch import save_model as save_weights

    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        fp32 = Transformer(cfg)
    fp32.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    if cfg.tie_embeddings:
        fp32.lm_head.weight = fp32.wte.weight
    fp32.rope_cos, fp32.rope_sin = model_rope_tables(cfg)
    for module in fp32.modules():  # other buffers that are not saved (MoE's last load): zeros, on the CPU
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros_like(buf, device="cpu"))
    save_weights(fp32, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    tokenizer.save(folder / "tokenizer")
    return fp32


def save_quantized(model: Transformer, spec: dict, tokenizer, folder: Path) -> None:
    """model.safetensors (int8 + scales + float norms), model.json, quantization.json, tokenizer/
    into `folder` (the caller makes it atomic)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "model.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n", encoding="utf-8")
    (folder / "quantization.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(folder / "tokenizer")


def load_quantized(folder: str | os.PathLike) -> tuple[Transformer, object]:
    """(INT8 model in eval mode, tokenizer) of a folder written by `save_quantized`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        spec = json.loads((folder / "quantization.json").read_text(encoding="utf-8"))
        cfg = from_dict(ModelConfig, json.loads((folder / "model.json").read_text(encoding="utf-8")), "model.json")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise ModelFolderError(f"{folder}: unreadable quantized model folder: {err}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("modules"), list):
        raise ModelFolderError(f"{folder / 'quantization.json'}: not a {FORMAT} spec")
    model = Transformer(cfg)
    unknown = sorted(set(spec["modules"]) - set(quantizable(model)))
    if unknown:
        raise ModelFolderError(f"{folder / 'quantization.json'}: modules {unknown[:3]} are not quantizable "
                               f"linears of this model.json")
    swap_modules(model, spec["modules"], bool(spec.get("embedding")), spec.get("kv_cache") == "int8")
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: not a readable safetensors file: {err}") from None
    expected = model.state_dict()
    bad = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape
                 or state[k].dtype != expected[k].dtype)
    extra = sorted(set(state) - set(expected))
    if bad or extra:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: does not match quantization.json "
                               f"(missing or wrong {bad[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state)
    tok = read_tokenizer(folder, cfg)
    return model.eval(), tok
