"""What the next stage does first to the model a stage hands on: grow it, freeze part of it.

    cfg, state, tok = load_pretrained("runs/base/model")   # components/model/folder.py
    cfg, state = deepen(cfg, state, 2)                     # progressive growth: 2 more blocks
    freeze_below(model, top=2)                              # fine-tune: only the top 2 blocks train
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from components.model import ModelConfig, Transformer

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
