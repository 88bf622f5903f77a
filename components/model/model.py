"""A small decoder-only transformer in the DeepSeek style, written like nanoGPT's model.py.

RMSNorm, rotary position embeddings, pre-norm blocks, SwiGLU feed-forward or a DeepSeekMoE layer
(routed experts + one shared expert, aux-loss-free load balancing as in DeepSeek-V3), and either
dense causal attention or a hybrid sparse attention after DeepSeek's Native Sparse Attention.

Single device, plain PyTorch: parallelism, kernels and quantization are applied from outside by
swapping modules. The output head is tied to the token embedding by default.

    model = Transformer(ModelConfig(attention="hybrid", ffn="moe"))
    logits, loss = model(idx, targets, loss_weights=w)   # (B, T, V), scalar
    loss.backward(); opt.step(); model.update_router_bias()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from components.model import fused
from components.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, kernels: str = "torch"):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.active(self.kernels, x):
            return fused.rms_norm(x, self.weight, self.eps)  # kernels/rmsnorm.py, the same formula
        if x.dtype == self.weight.dtype == torch.float32:
            if not torch.is_grad_enabled():  # inference: the same arithmetic without autograd's bookkeeping
                return rms_norm_forward(x, self.weight, self.eps)
            return RMSNormFunction.apply(x, self.weight, self.eps)  # the same formula, a shorter backward
        xf = x.float()  # bf16: normalise in fp32, cast back, then scale (LLaMA)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * rstd, rstd) with rstd = 1/sqrt(mean(x^2) + eps) over the last dim."""
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()  # (..., 1)
    return x * rstd, rstd


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNormFunction's forward alone (inference): about 2x faster a call than through autograd's Function."""
    return _normalize(x, eps)[0].mul_(weight)


class RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps), for x (..., C), with its backward written
    out: dx = rstd * (g - xhat * mean(g * xhat)) for g = dy * w and xhat = x * rstd, where the mean is
    (dy * xhat) @ w / C and dy * xhat also gives dw. Three passes over x forward and six backward,
    about half of autograd's for the same formula (2 CPU cores, nanoGPT's size: 0.55 ms a call against
    0.9, about 3 % of a training step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xhat, rstd = _normalize(x, eps)
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        xhat, rstd, weight = ctx.saved_tensors
        C = xhat.size(-1)
        dy_xhat = dy * xhat  # (..., C)
        dw = dy_xhat.reshape(-1, C).sum(0)  # (C,)
        mean = (dy_xhat @ weight).unsqueeze_(-1).div_(C)  # (..., 1): mean(g * xhat)
        dx = torch.addcmul(dy * weight, xhat, mean, value=-1.0).mul_(rstd)
        return dx, dw, None


def rope_tables(block_size: int, head_dim: int, theta: float, device=None,
                inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, each (block_size, head_dim/2), float32; inv_freq defaults
    to 1 / theta**(2i/head_dim), computed as Hugging Face's Llama does (the same bits)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(block_size, device=device, dtype=torch.float32), inv_freq.to(device))  # (T, D/2)
    return angles.cos(), angles.sin()


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The model's RoPE frequencies (head_dim/2,), float32, with cfg.rope_type's scaling applied:
    "linear" divides every frequency by rope_factor; "llama3" (Llama 3.1) divides those whose
    wavelength exceeds original/low_freq_factor, keeps those under original/high_freq_factor, and
    blends linearly (in original/wavelength) between."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type != "llama3":
        return inv_freq
    old, lo, hi, factor = cfg.rope_original_max_position, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, blended, scaled)


def model_rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, head_dim/2) of the model's positions and scaled frequencies."""
    return rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta, device, rope_frequencies(cfg))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by the angle of each position:
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), in fp32 (a bf16 x is upcast, the result cast back)."""
    T = x.size(-2)
    if not torch.is_grad_enabled():  # inference: the rotation without autograd's bookkeeping
        return rotate(x, cos[:T], sin[:T])
    return RoPEFunction.apply(x, cos[:T], sin[:T])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """x (..., T, D) with its pairs rotated by sign * the angles of cos, sin (T, D/2): four half-width
    multiplies written into one fp32 output, no chunk-and-cat."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., T, D/2) each
    out = torch.empty_like(x, dtype=torch.float32)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)  # x2 cos + x1 sin
    return out.type_as(x)


class RoPEFunction(torch.autograd.Function):
    """`rotate` with its backward, the rotation of the gradient by the opposite angles: no activation
    is saved, and each direction is four multiplies (with q and k in one call, about 3 % of a training
    step less than chunk, eight multiplies and cat on 2 CPU cores)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return rotate(dy, cos, sin, -1.0), None, None


def hybrid_mask(q: torch.Tensor, k: torch.Tensor, window: int, block: int, top_k: int,
                q_start: int = 0) -> torch.Tensor:
    """Boolean attention mask (B, H, Tq, Tk) of the hybrid attention; True = may attend.

    q (B, H, Tq, D) holds the queries of positions q_start .. q_start+Tq-1 and k (B, H, Tk, D) the
    keys of positions 0 .. Tk-1 (q_start = 0, Tq = Tk: a whole sequence; q_start = Tk - 1: one
    decoding step against a KV cache, with the same result as the whole-sequence mask's last row).

    Query i sees (a) keys i-window+1 .. i (the sliding window) and (b) every key of its `top_k`
    best earlier key blocks. Key block b holds keys b*block .. (b+1)*block-1; it is a candidate
    for query i only when it ends before the window starts, (b+1)*block <= i-window+1, which keeps
    the mask causal. A block's score is q_i . (mean of the block's keys), the compressed key.
    """
    B, H, Tq, D = q.shape
    Tk = k.size(2)
    qpos = torch.arange(q_start, q_start + Tq, device=q.device)
    diff = qpos[:, None] - torch.arange(Tk, device=q.device)[None, :]  # (Tq, Tk) query minus key position
    mask = ((diff >= 0) & (diff < window)).expand(B, H, Tq, Tk)
    nb = Tk // block  # only whole blocks; a trailing partial block can never lie before a window
    if top_k <= 0 or nb == 0:
        return mask.clone()
    kc = k[:, :, : nb * block].reshape(B, H, nb, block, D).mean(dim=3)  # (B, H, nb, D) compressed keys
    scores = (q @ kc.transpose(-2, -1)).float()  # (B, H, Tq, nb)
    block_end = (torch.arange(nb, device=q.device) + 1) * block  # (nb,)
    eligible = block_end[None, :] <= (qpos[:, None] - window + 1)  # (Tq, nb)
    scores = scores.masked_fill(~eligible, float("-inf"))
    top = scores.topk(min(top_k, nb), dim=-1).indices  # (B, H, Tq, k)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & eligible  # (B, H, Tq, nb)
    keys = chosen.repeat_interleave(block, dim=-1)  # (B, H, Tq, nb*block)
    keys = F.pad(keys, (0, Tk - nb * block), value=False)  # (B, H, Tq, Tk)
    return mask | keys


class LayerCache:
    """Keys and values of one attention layer for positions 0 .. length-1, (B, H, capacity, D)
    buffers filled in place (no re-allocation per decoded token); H is the key/value heads."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at the next T positions; the keys and values so far, (B, H, length, D)."""
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache full: {end} positions, capacity {self.k.size(2)}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerCache per block; `Transformer.new_cache` makes one sized for a generation."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys.

    attention="dense": full causal attention (SDPA with is_causal=True).
    attention="hybrid": each query attends to its sliding window of `window` keys plus the keys of
    its `top_k_blocks` highest-scoring earlier key blocks (see `hybrid_mask`), one SDPA call with a
    boolean mask. Departures from DeepSeek NSA (arXiv 2502.11089): NSA has three branches
    (compressed tokens, selected blocks, sliding window), each with its own keys/values, mixed by
    learned gates, and a learned MLP compressor. Here there is one branch over the union of the
    window and the selected keys; blocks are scored by mean-pooled keys, chosen per head and per
    query (NSA shares the choice across a GQA group), and the choice gets no gradient; the mask is
    a dense (T, T) one, so this shows the attention pattern, not the memory saving (that needs a
    kernel).
    With window >= T the hybrid is exactly dense attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.attention, self.window, self.block, self.top_k = cfg.attention, cfg.window, cfg.block, cfg.top_k_blocks
        self.sliding_window = cfg.sliding_window
        self.dropout, self.kernels = cfg.dropout, cfg.kernels
        # one fused projection: n_head query heads, then n_kv_head key heads, then n_kv_head value heads
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.out_bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, C); with a cache, x holds positions cache.length .. cache.length+T-1, whose keys
        and values are appended to it, and the queries attend to everything cached so far."""
        B, T, C = x.shape
        start = cache.length if cache is not None else 0
        H, Hkv = self.n_head, self.n_kv_head  # n_head/tp and n_kv_head/tp under tensor parallelism
        qk, v = self.c_attn(x).view(B, T, H + 2 * Hkv, self.head_dim).split((H + Hkv, Hkv), dim=2)
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)  # (B, H+Hkv, T, D), (B, Hkv, T, D)
        if fused.active(self.kernels, x):  # kernels/rope.py
            q, k = qk.split((H, Hkv), dim=1)  # (B, H, T, D), (B, Hkv, T, D)
            q, k = fused.rope(q, cos, sin, start), fused.rope(k, cos, sin, start)
        else:
            q, k = apply_rope(qk, cos[start:], sin[start:]).split((H, Hkv), dim=1)  # one rotation for both
        if cache is not None:
            k, v = cache.append(k, v)  # (B, Hkv, start+T, D)
        gqa = Hkv != H  # grouped-query attention: kv head j serves query heads j*H/Hkv .. (j+1)*H/Hkv-1
        if gqa and self.attention == "hybrid":  # the block scores and the kernel want every head's keys
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, ., D)
            gqa = False
        p = self.dropout if self.training else 0.0
        window = self.sliding_window if 0 < self.sliding_window < start + T else 0
        if self.attention == "dense" and start == 0 and not window:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)  # (B, H, T, D)
        elif self.attention == "dense" and T == 1 and not window:  # one new token sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
        elif start == 0 and p == 0.0 and fused.active(self.kernels, x) and fused.hybrid_supported(q) \
                and self.attention == "hybrid":
            y = fused.hybrid_attention(q, k, v, self.window, self.block, self.top_k)  # kernels/hybrid_attention.py
        else:
            with torch.no_grad():
                if self.attention == "dense":  # new queries see every cached key and the causal part of theirs
                    diff = torch.arange(start, start + T, device=x.device)[:, None] \
                        - torch.arange(start + T, device=x.device)[None, :]  # (T, start+T) query minus key position
                    mask = (diff >= 0) & (diff < window) if window else diff >= 0
                else:
                    mask = hybrid_mask(q, k, self.window, self.block, self.top_k, q_start=start)  # (B, H, T, start+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class SwiGLU(nn.Module):
    """c_proj(silu(w_gate x) * w_up x): the feed-forward of LLaMA and DeepSeek, and each MoE expert."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(n_embd, hidden, bias=False)
        self.w_up = nn.Linear(n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """DeepSeekMoE layer: `n_experts` routed SwiGLU experts, top-k per token, plus a shared expert.

    Routing as in DeepSeek-V3: affinities s = sigmoid(router(x)); the top-k experts are chosen by
    s + expert_bias (the bias steers selection only), and the gates are the chosen experts'
    un-biased s, renormalised to sum to 1. No auxiliary loss: `update_router_bias` nudges the bias
    of overloaded experts down and underloaded ones up by a fixed step, using the token counts
    of the last forward (buffer `load`). No capacity limit, no token dropping.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.bias_update, self.kernels = cfg.expert_top_k, cfg.moe_bias_update, cfg.kernels
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.n_embd, cfg.hidden) for _ in range(cfg.n_experts))
        self.shared = SwiGLU(cfg.n_embd, cfg.hidden) if cfg.shared_expert else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))  # saved: selection depends on it
        self.register_buffer("load", torch.zeros(cfg.n_experts, dtype=torch.long), persistent=False)  # last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids (N, k) and gates (N, k) for tokens x (N, C); gates sum to 1 per token."""
        scores = torch.sigmoid(self.router(x).float())  # (N, E)
        idx = (scores.detach() + self.expert_bias.float()).topk(self.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, idx)  # (N, k)
        return idx, gates / gates.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C)
        idx, gates = self.route(flat)  # (N, k)
        with torch.no_grad():
            self.load.copy_(torch.bincount(idx.flatten(), minlength=len(self.experts)))
        if type(self.experts[0].w_gate) is nn.Linear and fused.active(self.kernels, x):  # kernels/moe.py (not INT8)
            out = fused.moe_experts(flat, idx, gates, self.experts)
        else:
            out = self._experts_loop(flat, idx, gates)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, C)

    def _experts_loop(self, flat: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, and in which of their k slots
            if tok.numel() == 0 and not torch.is_grad_enabled():
                continue  # training runs an idle expert on 0 rows: every weight gets a gradient, so
                # data-parallel ranks reduce the same ones (ZeRO's buckets must line up)
            y = expert(flat.index_select(0, tok)) * gates[tok, slot, None].type_as(flat)  # (n_e, C)
            out = out.index_add(0, tok, y)
        return out

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """bias += moe_bias_update * sign(mean load - load); call once after each optimizer step."""
        load = self.load.float()
        if self.bias_update > 0 and load.sum() > 0:
            self.expert_bias += self.bias_update * torch.sign(load.mean() - load)

    def _apply(self, fn, recurse=True):
        """Keep expert_bias float32 when the model is cast (steps of 1e-3 vanish in bf16)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        self.expert_bias = bias.to(self.expert_bias.device)
        return self


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.kernels)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.kernels)
        self.ffn = MoE(cfg) if cfg.ffn == "moe" else SwiGLU(cfg.n_embd, cfg.hidden)
        self.ffn_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, cache)
        return x + self.ffn_dropout(self.ffn(self.ln_2(x)))


class Transformer(nn.Module):
    cache_layer: type = LayerCache
    """What `new_cache` fills, per block; an INT8 KV cache (components/model/int8.py) swaps in
    its own class with the same `append` on the instance, from outside the model code."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.kernels)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = model_rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _apply(self, fn, recurse=True):
        """Keep the RoPE tables float32 (exact) when the model is cast, e.g. to bf16."""
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = model_rope_tables(self.cfg, self.rope_cos.device)
        return self

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        ignore_index: int = -100,
        cache: KVCache | None = None,
        output: str = "logits",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T), also the loss.

        `output` picks the first of the pair: "logits"; "loss" (None: with the kernels on, the loss
        then comes from the fused linear + cross-entropy, and the (B*T, V) logits never exist);
        "hidden" (the final normed hidden states (B, T, C), for a fused loss outside, e.g. distillation).

        With a `cache` (inference), idx continues the cached sequence: its tokens sit at positions
        cache.length .. cache.length+T-1 and their keys and values are appended to the cache.

        The loss is the mean cross-entropy over the target tokens that are not `ignore_index`,
        each token weighted by its sequence's entry of `loss_weights` (B,): sum(w * ce) / sum(w).
        Weights are relative within the batch: all-ones gives the plain token mean, a zero
        removes the sequence.
        """
        if output not in ("logits", "loss", "hidden"):
            raise ValueError(f"output: {output!r} is not one of logits, loss, hidden")
        B, T = idx.shape
        end = T + (cache.length if cache is not None else 0)
        assert end <= self.cfg.block_size, f"sequence of {end} tokens is longer than block_size {self.cfg.block_size}"
        x = self.drop(self.wte(idx))  # (B, T, C)
        ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, self.rope_cos, self.rope_sin, cache.layers[i])
            elif ckpt:
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        h = self.ln_f(x)  # (B, T, C)
        token_w = None if loss_weights is None else loss_weights.float().view(B, 1).expand(B, T)  # (B, T)
        if targets is not None and output != "logits" and type(self.lm_head) is nn.Linear \
                and fused.active(self.cfg.kernels, h):  # kernels/fused_linear_ce.py
            loss = fused.linear_cross_entropy(h.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                              None if token_w is None else token_w.reshape(B * T), ignore_index)
            return (h if output == "hidden" else None), loss
        logits = self.lm_head(h)  # (B, T, V)
        first = {"logits": logits, "loss": None, "hidden": h}[output]
        if targets is None:
            return first, None
        return first, token_loss(logits, targets, loss_weights, ignore_index)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert in the last forward, (n_moe_layers, n_experts)."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.cfg.n_experts, dtype=torch.long, device=self.rope_cos.device)
        return torch.stack([m.load for m in layers])

    def update_router_bias(self) -> None:
        """Aux-loss-free balancing step of every MoE layer; call after each optimizer step."""
        for m in self.moe_layers():
            m.update_router_bias()

    def num_params(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Two param groups: matrices with `weight_decay`; norms, biases and embeddings without."""
        embeddings = {id(self.wte.weight)}
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `capacity` (block_size) tokens."""
        capacity = capacity or self.cfg.block_size
        p = self.ln_f.weight  # the compute dtype and device (norms stay float when weights are INT8)
        return KVCache([self.cache_layer(batch, self.cfg.kv_heads, capacity, self.cfg.head_dim, p.dtype, p.device)
                        for _ in self.blocks])

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        eos_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append up to `max_new_tokens` sampled tokens to idx (B, T); temperature 0 is greedy.

        When the whole sequence fits in block_size, decoding uses a KV cache (one forward of the
        prompt, then one token per step); otherwise the context is cropped to the last block_size
        tokens at each step, without a cache. With `eos_id`, a row that has produced it gets
        `eos_id` from then on, and decoding stops once every row has. Returns (B, T + new)."""
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate needs at least one prompt token")
        cached = T + max_new_tokens <= self.cfg.block_size
        cache = self.new_cache(B, T + max_new_tokens) if cached else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        stops = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                                          device=idx.device)
        step_in = idx
        for _ in range(max_new_tokens):
            if cached:
                logits, _ = self(step_in, cache=cache)
            else:
                logits, _ = self(idx[:, -self.cfg.block_size:])
            nxt = sample(logits[:, -1, :], temperature, top_k, generator)  # (B, 1)
            if stops is not None:
                nxt = nxt.masked_fill(done[:, None], stops[0])
                done |= torch.isin(nxt[:, 0], stops)
            idx = torch.cat((idx, nxt), dim=1)
            step_in = nxt
            if stops is not None and bool(done.all()):
                break
        return idx


def token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor | None = None,
               ignore_index: int = -100) -> torch.Tensor:
    """The model's loss from logits (B, T, V): the mean cross-entropy over the targets that are not
    `ignore_index`, each token weighted by its sequence's entry of `loss_weights` (B,)."""
    B, T, _ = logits.shape
    ce = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=ignore_index,
                         reduction="none").view(B, T)
    w = (targets != ignore_index).float()  # (B, T)
    if loss_weights is not None:
        w = w * loss_weights.float().view(B, 1)
    return (ce * w).sum() / w.sum().clamp_min(1e-12)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V): argmax at temperature 0, else softmax(logits / t)
    over the `top_k` best (all when None). Returns (B, 1)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
