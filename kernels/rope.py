"""Rotary position embedding (RoPE), forward and backward, in Triton.

For x (B, H, T, D) and the tables cos, sin (T_max, D/2) of angle(t, i) = t * theta^(-2i/D), pair i
of position t is (x[..., i], x[..., i + D/2]) (the "rotate half" layout of GPT-NeoX and LLaMA in
HF transformers; components/model/model.py's apply_rope):

    y1 = x1 cos - x2 sin,      y2 = x1 sin + x2 cos          (fp32, cast back to x's dtype)

The backward applies the inverse rotation (the transpose of a rotation):

    dx1 = dy1 cos + dy2 sin,   dx2 = -dy1 sin + dy2 cos

Follows Liger-Kernel's `ops/rope.py` (one program per (batch*head, block of positions), the two
halves loaded separately), with one kernel for both directions (`SIGN` = -1 rotates backwards).
x may be a strided view (the model's q and k are (B, T, H, D) transposed to (B, H, T, D)); only the
last dimension must be contiguous. `start` offsets the positions (decoding with a KV cache).
Arithmetic in fp32 (Triton's CPU interpreter cannot multiply bf16; on a GPU it is the model's own
precision). `rope_reference` is the plain PyTorch version the tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, Y, COS, SIN, n_heads, n_pos, start, sxb, sxh, sxt, syb, syh, syt, stab,
                 HALF: tl.constexpr, SIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Positions [pid_t * BLOCK_T, ...) of sequence pid_bh: y1 = x1 c - SIGN' x2 s, y2 = SIGN' x1 s + x2 c,
    with SIGN' = SIGN (+1 forward, -1 for the backward's inverse rotation); c, s at position start + t."""
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    i = tl.arange(0, BLOCK_D)  # (BLOCK_D,) pair index
    mask = (t[:, None] < n_pos) & (i[None, :] < HALF)
    tab = (start + t)[:, None] * stab + i[None, :]
    c = tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32) * SIGN
    xo = b * sxb + h * sxh + t[:, None] * sxt + i[None, :]
    x1 = tl.load(X + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    yo = b * syb + h * syh + t[:, None] * syt + i[None, :]
    tl.store(Y + yo, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + yo + HALF, (x1 * s + x2 * c).to(Y.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, H, T, D), got shape {tuple(x.shape)}")
    half = x.size(-1) // 2
    if x.size(-1) % 2:
        raise ValueError(f"x: head dimension {x.size(-1)} must be even")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.size(1) != half:
        raise ValueError(f"cos/sin: expected two (T_max, {half}) tables, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if start < 0 or start + x.size(2) > cos.size(0):
        raise ValueError(f"start: positions {start}..{start + x.size(2) - 1} are outside the tables' {cos.size(0)}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, sign: int) -> torch.Tensor:
    _check(x, cos, sin, start)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, H, T, D = x.shape
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    if y.numel():
        block_t = min(triton.next_power_of_2(T), 16)
        grid = (B * H, triton.cdiv(T, block_t))
        _rope_kernel[grid](x, y, cos, sin, H, T, start, x.stride(0), x.stride(1), x.stride(2),
                           y.stride(0), y.stride(1), y.stride(2), cos.stride(0),
                           HALF=D // 2, SIGN=sign, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(D // 2))
    return y


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """x (B, H, T, D) rotated by positions start .. start+T-1 of the (T_max, D/2) tables; x's dtype."""
    return _rotate(x, cos, sin, start, 1)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The gradient w.r.t. x of rope_forward: dy rotated back by the same angles."""
    return _rotate(dy, cos, sin, start, -1)


class RoPEFunction(torch.autograd.Function):
    """RoPEFunction.apply(x, cos, sin, start): rotary embedding with its backward (the tables get no
    gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.start = start
        return rope_forward(x, cos, sin, start)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rope_backward(dy, cos, sin, ctx.start), None, None, None


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The plain PyTorch RoPE (components/model/model.py's apply_rope), for tests and benchmarks."""
    T = x.size(-2)
    cos, sin = cos[start:start + T], sin[start:start + T]  # (T, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
