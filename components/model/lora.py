"""LoRA: low-rank adapters on the linear layers of the blocks, the base weights frozen, saved in
the PEFT layout (adapter_config.json + adapter_model.safetensors) that peft's
PeftModel.from_pretrained loads on the Hugging Face form of the same base model.

    add_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))   # in place; only adapters train
    state = merged_state(model)                  # W + alpha/r * B @ A: a plain Transformer state dict
    save_adapter(folder, model, base="runs/base/model")

Targets are named as Hugging Face's Llama names its linears (q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj), so the adapter maps one to one onto PEFT's: our fused q/k/v
projection `c_attn` carries one adapter per part (its own A and B each), exactly PEFT's three.
Initialisation as PEFT's default: A Kaiming-uniform, B zero, so training starts at the base model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.model.config import LORA_TARGETS as TARGETS
from components.model.model import MoE, Transformer

# our module (inside blocks.i) -> the Hugging Face names of its output parts
_MODULES = {"attn.c_attn": ("q_proj", "k_proj", "v_proj"), "attn.c_proj": ("o_proj",),
            "ffn.w_gate": ("gate_proj",), "ffn.w_up": ("up_proj",), "ffn.c_proj": ("down_proj",)}
_HF_PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class LoRALinear(nn.Linear):
    """An nn.Linear (its `weight` and `bias` kept, under the same names, frozen) plus, for each
    adapted part of its output rows, y_part += alpha/r * (x A^T) B^T with A (r, in), B (part, r)."""

    def __init__(self, linear: nn.Linear, parts: list[tuple[str, int, int]], rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.parts = parts  # (Hugging Face name, first output row, rows)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, self.in_features)) for _ in parts)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(n, rank)) for _, _, n in parts)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        deltas = [F.linear(F.linear(x, a), b) * self.scale for a, b in zip(self.lora_A, self.lora_B)]
        if len(self.parts) == 1 and self.parts[0][2] == self.out_features:
            return y + deltas[0]
        pieces, at = [], 0
        for (_, start, rows), d in zip(self.parts, deltas):
            if start > at:
                pieces.append(y.new_zeros(*y.shape[:-1], start - at))
            pieces.append(d)
            at = start + rows
        if at < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(pieces, dim=-1)


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """"q_proj,v_proj" or a sequence of names -> the names, checked against TARGETS."""
    names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets: {', '.join(unknown) or 'empty'} not among {', '.join(TARGETS)}")
    return names


def add_lora(model: Transformer, rank: int, alpha: float, targets: str | tuple[str, ...] = TARGETS) -> Transformer:
    """Swap LoRALinear into the targeted linears of every block, in place; freeze everything else.
    The random A matrices come from torch's global generator (seed it first for a repeatable run)."""
    if rank <= 0:
        raise ValueError(f"lora_rank: {rank} must be positive")
    if any(isinstance(b.ffn, MoE) for b in model.blocks):
        raise ValueError("lora_rank: LoRA covers dense feed-forward models (ffn dense), not MoE")
    names = parse_targets(targets)
    cfg = model.cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    bounds = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for path, hf in _MODULES.items():
            parts = [(n, *(bounds.get(n) or (0, block.get_submodule(path).out_features))) for n in hf if n in names]
            if parts:
                parent, _, leaf = path.rpartition(".")
                setattr(block.get_submodule(parent), leaf, LoRALinear(block.get_submodule(path), parts, rank, alpha))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged_state(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A plain Transformer state dict: each adapted weight plus its alpha/r * B A, the adapters
    dropped. `state` (default: the model's own, in fp32) supplies the values, e.g. the fp32 master
    weights of a mixed-precision run."""
    state = {k: v.float() for k, v in (state if state is not None else model.state_dict()).items()}
    for name, m in lora_modules(model).items():
        delta = torch.zeros_like(state[f"{name}.weight"])
        for i, (_, start, rows) in enumerate(m.parts):
            a, b = state[f"{name}.lora_A.{i}"], state[f"{name}.lora_B.{i}"]
            delta[start:start + rows] = (b @ a) * m.scale
        state[f"{name}.weight"] = state[f"{name}.weight"] + delta
    return {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}


def adapter_tensors(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names (base_model.model.model.layers.i.self_attn.q_proj.lora_A.weight...)."""
    state = state if state is not None else model.state_dict()
    out = {}
    for name, m in lora_modules(model).items():
        layer = name.split(".")[1]  # blocks.<i>.<module path>
        for i, (hf, _, _) in enumerate(m.parts):
            key = f"base_model.model.model.layers.{layer}.{_HF_PREFIX[hf]}.{hf}"
            out[f"{key}.lora_A.weight"] = state[f"{name}.lora_A.{i}"].float().contiguous()
            out[f"{key}.lora_B.weight"] = state[f"{name}.lora_B.{i}"].float().contiguous()
    return out


def save_adapter(folder: str | os.PathLike, model: Transformer, base: str,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """adapter_config.json and adapter_model.safetensors (PEFT's layout) into `folder` (created;
    the caller makes it atomic). `base`: where the base model came from (base_model_name_or_path)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(mods.values()))
    targets = sorted({hf for m in mods.values() for hf, _, _ in m.parts}, key=TARGETS.index)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model, state), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": 0.0, "target_modules": targets,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder
