"""INT8 weight-only modules and an INT8 KV cache for the transformer: what an INT8 model folder
(components/model/folder.py) is built from, and what compress.quantize writes.

Weights: every linear layer of the blocks (attention, feed-forward, MoE experts; not the MoE
router, whose few weights decide routing) and the token embedding with its tied output head
are stored as int8 with one float32 scale per output channel (per row of the weight matrix),
symmetric: q = round(w / s), s = max|w_row| / 127, w ~ q * s (LLM.int8's "vector-wise"
weight quantization without the outlier split; GPTQ/AWQ pick scales better, this is the
round-to-nearest baseline they are measured against). The norms stay float32. Activations are
not quantized (weight-only, as for memory-bound decoding): a QuantLinear multiplies with the
int8 weight through PyTorch's `_weight_int8pack_mm` (dequantization fused in the kernel), so the
fp32 weight never exists at run time.

KV cache: keys and values are stored as int8 with one scale per (sequence, head, position),
symmetric over the head dimension, and dequantized when attention reads them (KIVI quantizes
keys per channel and values per token, with a float residual window; here both are per token).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.model import fused
from components.model.model import LayerCache, Transformer

FORMAT = "distillery-int8/1"
QMAX = 127.0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 of a (out, in) matrix: (q int8 (out, in), scale float32 (out,)),
    with w ~ q * scale[:, None] and |w - q * scale| <= scale / 2 elementwise."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None].float()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernels: str = "auto") -> torch.Tensor:
    """x (..., in) @ (q * scale[:, None])^T with q int8 (out, in): the Triton GEMV/GEMM of
    kernels/int8_matmul.py where `kernels` (the model's switch) says so, on CUDA by default;
    otherwise PyTorch's fused weight-only kernel where it is exact; a plain matmul with the
    dequantized weight while tracing for ONNX (the exporter has no int8pack op; the int8 weights
    stay int8 in the graph). bf16 on the CPU
    runs the kernel in fp32: torch 2.13's CPU kernel is wrong for bf16 when `in` is not a
    multiple of 16."""
    shape, dtype = x.shape, x.dtype
    if torch.compiler.is_exporting():
        return F.linear(x, q.to(dtype) * scale.to(dtype)[:, None])
    if fused.active(kernels, x):
        return fused.int8_matmul(x, q, scale)
    flat = x.reshape(-1, shape[-1]).contiguous()  # (N, in)
    if flat.dtype not in (torch.float32, torch.float16) or flat.device.type == "cpu" and flat.dtype != torch.float32:
        flat = flat.float()
    y = torch.ops.aten._weight_int8pack_mm(flat, q, scale.to(flat.dtype))
    return y.to(dtype).view(*shape[:-1], q.size(0))  # (..., out)


def _keep_fp32_scale(module: nn.Module, apply, fn, recurse):
    """Cast like any module, but keep the float32 scales: rounding them to bf16 would double
    the quantization error."""
    scale = module.scale
    apply(fn, recurse)
    module.scale = scale.to(module.scale.device)
    return module


class QuantLinear(nn.Module):
    """y = x @ (q * s)^T + b with q int8 (out, in), s (out,) and an optional float bias b (out,)
    (Qwen2's q/k/v biases): weight-only INT8, the bias kept in float."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernels = "auto"  # the model's switch (ModelConfig.kernels), set by swap_modules

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        m.weight_int8, m.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight_int8, self.scale, self.kernels)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        return _keep_fp32_scale(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows and one scale per token; its rows are exactly the output
    channels of the tied output head, so `head` shares the same int8 matrix (stored once)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(vocab, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(vocab))
        self.register_buffer("dtype_probe", torch.zeros(0), persistent=False)  # follows .to(dtype): the output's

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight_int8).float() * self.scale[idx, None]  # (B, T, C)
        return rows.to(self.dtype_probe.dtype)

    def _apply(self, fn, recurse=True):
        return _keep_fp32_scale(self, super()._apply, fn, recurse)


class TiedQuantHead(nn.Module):
    """The output head tied to a QuantEmbedding: logits = x @ (q * s)^T over the same buffers."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._emb = [embedding]  # a list: not a submodule, so its buffers are saved once, under wte
        self.kernels = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._emb[0]
        return int8_matmul(x, emb.weight_int8, emb.scale, self.kernels)


class Int8LayerCache(LayerCache):
    """LayerCache with int8 keys and values and one float32 scale per (batch, head, position):
    4 * D / (D + 4) times fewer bytes than fp32 at head dim D (3.56x at 32, 3.76x at 64)."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, heads, capacity, head_dim, dtype=torch.int8, device=device)
        self.v = torch.empty_like(self.k)
        self.k_scale = torch.empty(batch, heads, capacity, 1, dtype=torch.float32, device=device)
        self.v_scale = torch.empty_like(self.k_scale)
        self.dtype = dtype
        self.length = 0

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.float().abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(1e-12)  # (B, H, T, 1)
        return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache full: {end} positions, capacity {self.k.size(2)}")
        span = slice(self.length, end)
        self.k[:, :, span], self.k_scale[:, :, span] = self._quantize(k)
        self.v[:, :, span], self.v_scale[:, :, span] = self._quantize(v)
        self.length = end
        keys = (self.k[:, :, :end].float() * self.k_scale[:, :, :end]).to(self.dtype)  # (B, H, end, D)
        values = (self.v[:, :, :end].float() * self.v_scale[:, :, :end]).to(self.dtype)
        return keys, values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale))


def quantizable(model: Transformer) -> list[str]:
    """Names of the linear layers that INT8 replaces: every nn.Linear inside the blocks except MoE
    routers (a few weights that decide routing)."""
    return [name for name, m in model.blocks.named_modules(prefix="blocks")
            if isinstance(m, nn.Linear) and not name.endswith(".router")]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def swap_modules(model: Transformer, names: list[str], embedding: bool, kv_cache: bool) -> Transformer:
    """Replace the named linears (and the tied embedding/head) by their INT8 versions, quantizing
    the weights they hold now; set the KV cache class. In place; returns the model."""
    for name in names:
        set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name)))
        model.get_submodule(name).kernels = model.cfg.kernels
    if embedding:  # a tied head shares the embedding's int8 rows; an untied one is an INT8 linear of its own
        emb = QuantEmbedding(model.cfg.vocab_size, model.cfg.n_embd)
        emb.weight_int8, emb.scale = quantize_rows(model.wte.weight)
        head = TiedQuantHead(emb) if model.cfg.tie_embeddings else QuantLinear.from_linear(model.lm_head)
        model.wte, model.lm_head = emb, head
        model.lm_head.kernels = model.cfg.kernels
    if kv_cache:
        model.cache_layer = Int8LayerCache
    return model


def quantize_model(model: Transformer, embedding: bool = True, kv_cache: bool = True) -> tuple[Transformer, dict]:
    """INT8 copy of a float model (the float one is left as it was) and its quantization.json."""
    import copy

    q = copy.deepcopy(model).float().eval()
    names = quantizable(q)
    swap_modules(q, names, embedding, kv_cache)
    spec = {"format": FORMAT, "weights": "int8, symmetric, per output channel (row)", "modules": names,
            "embedding": embedding, "kv_cache": "int8" if kv_cache else "float"}
    return q, spec


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds (parameters and saved buffers, shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.state_dict(keep_vars=True).values()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def dequantized_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The float state dict (Transformer's names) of a model with INT8 modules swapped in: each
    int8 matrix times its scales, biases and norms as they are."""
    out, state = {}, model.state_dict()
    for name, t in state.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".weight_int8"):
            prefix = name[: -len("weight_int8")]
            out[prefix + "weight"] = dequantize_rows(t, state[prefix + "scale"])
        else:
            out[name] = t.float()
    if "lm_head.weight" not in out:  # a tied INT8 head holds no tensors of its own
        out["lm_head.weight"] = out["wte.weight"]
    return out
