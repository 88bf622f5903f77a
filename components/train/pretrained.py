"""A trained stage's model folder, read back safely, and what the next stage does to it first.

    cfg, state, tok = load_pretrained("runs/base/model")   # model.json, model.safetensors, tokenizer/
    cfg, state = deepen(cfg, state, 2)                     # progressive growth: 2 more blocks
    freeze_below(model, top=2)                              # fine-tune: only the top 2 blocks train

Weights come from safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from components.config import ConfigError, from_dict
from components.data.load import DataError
from components.model import ModelConfig, Transformer, load_tokenizer


class ModelFolderError(DataError):
    """A model folder that is missing a file or holds something else."""


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
            raise ModelFolderError(f"{folder}: not a model folder (no {name}); give a stage's model/ output, "
                                   f"e.g. runs/base/model")
    try:
        cfg = from_dict(ModelConfig, json.loads((folder / "model.json").read_text(encoding="utf-8")), "model.json")
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise ModelFolderError(f"{folder / 'model.json'}: {err}") from None
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: not a readable safetensors file: {err}") from None
    expected = Transformer(cfg).state_dict()
    if cfg.tie_embeddings:  # tied weights are stored once, under either name
        for a, b in (("lm_head.weight", "wte.weight"), ("wte.weight", "lm_head.weight")):
            if a not in state and b in state:
                state[a] = state[b]
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or wrong:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: does not match model.json "
                               f"(missing {missing[:3]}, wrong shape {wrong[:3]})")
    tok = load_tokenizer(folder / "tokenizer")
    if tok.vocab_size != cfg.vocab_size:
        raise ModelFolderError(f"{folder}: the tokenizer has {tok.vocab_size} ids but model.json says "
                               f"vocab_size {cfg.vocab_size}")
    return cfg, {k: v.float() for k, v in state.items() if k in expected}, tok


def load_model(folder: str | os.PathLike) -> tuple[Transformer, object]:
    """(model in eval mode, tokenizer) of a model folder; an INT8 folder (quantization.json, written
    by compress.quantize) comes back with its quantized modules swapped in."""
    if (Path(folder) / "quantization.json").exists():
        from components.compress.quantize import load_quantized

        return load_quantized(folder)
    cfg, state, tok = load_pretrained(folder)
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model.eval(), tok


ZERO_AT_START = re.compile(r"\.(attn\.c_proj|ffn\.c_proj|ffn\.experts\.\d+\.c_proj|ffn\.shared\.c_proj)\.weight$")


def deepen(cfg: ModelConfig, state: dict[str, torch.Tensor], extra: int) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Progressive growth by depth: `extra` more blocks, spread evenly (old block j is followed by
    its copies). A copy starts with its output projections (attention and feed-forward c_proj) at
    zero, so it adds nothing to the residual stream: the deeper model computes exactly the same
    function, and training moves the copies away from identity (function-preserving growth,
    as in Net2Net / LLaMA Pro's block expansion)."""
    if extra <= 0:
        return cfg, state
    old, new = cfg.n_layer, cfg.n_layer + extra
    sources = [j for j in range(old) for _ in range((j + 1) * new // old - j * new // old)]  # len == new
    grown = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for i, j in enumerate(sources):
        first = i == 0 or sources[i - 1] != j
        for key, value in state.items():
            if key.startswith(f"blocks.{j}."):
                name = f"blocks.{i}." + key[len(f"blocks.{j}."):]
                grown[name] = value.clone() if first or not ZERO_AT_START.search(name) else torch.zeros_like(value)
    return ModelConfig(**{**asdict(cfg), "n_layer": new}), grown


def freeze_below(model: Transformer, top: int) -> None:
    """Leave only the top `top` blocks and the final norm trainable (top = 0: everything)."""
    if top <= 0:
        return
    keep = {f"blocks.{i}." for i in range(max(0, model.cfg.n_layer - top), model.cfg.n_layer)}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("ln_f.") or any(name.startswith(k) for k in keep))
