"""Fused RMSNorm, forward and backward, in Triton.

    y = cast(x * rstd) * w,   rstd = 1 / sqrt(mean(x^2) + eps)      (per row of x, statistics in fp32)

as components/model/model.py's RMSNorm computes it (LLaMA: normalise in fp32, cast back to x's
dtype, then scale by the weight; the output dtype is torch's promotion of x's and w's). Follows
Liger-Kernel's `ops/rms_norm.py` ("llama" casting mode): one program per row in the forward,
which also saves rstd per row; the backward recomputes x_hat from x and rstd, and each program
walks a strided set of rows, accumulating its partial dw in fp32 registers (summed by torch).

Backward, per row, with x_hat = x * rstd and g = dy * w (fp32; the cast is treated as identity):
    dx = rstd * (g - x_hat * mean(g * x_hat)),     dw = sum over rows of dy * cast(x_hat)

Runs on the GPU, and on the CPU under TRITON_INTERPRET=1 (tests). `rms_norm_reference` is the
plain PyTorch version the tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    """Row r: rstd = 1/sqrt(mean(x^2) + eps); y = cast_x(x * rstd) * w."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    x_hat = (xf * rstd).to(x.dtype)  # the model's cast back to x's dtype
    y = (x_hat.to(tl.float32) * w.to(tl.float32)).to(Y.dtype.element_ty)  # one rounding, as torch's bf16 mul
    tl.store(Y + row * stride_y + cols, y, mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                         rows_per_program, BLOCK: tl.constexpr):
    """Rows [p * rows_per_program, (p + 1) * rows_per_program): dx per row (formula in the module
    doc), and this program's partial dw = sum of dy * cast(x_hat) over its rows (fp32)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = start + i
        if row < n_rows:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x.to(tl.float32) * rstd
            g = dy * w
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * x_hat.to(x.dtype).to(tl.float32)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()  # (N, C)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y with x's shape, rstd (N,) fp32) for x (..., C) and weight (C,)."""
    x2 = _rows(x)
    n, c = x2.shape
    y = torch.empty((n, c), dtype=torch.result_type(x, weight), device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _rms_norm_fwd_kernel[(n,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), c, eps,
                                   BLOCK=triton.next_power_of_2(c))
    return y.view(*x.shape[:-1], c), rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx with x's shape and dtype, dw with weight's dtype)."""
    x2, dy2 = _rows(x), _rows(dy)
    n, c = x2.shape
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = max(1, min(programs, n))
    per = triton.cdiv(n, programs) if n else 0
    dx = torch.empty_like(x2)
    partial = torch.zeros((programs, c), dtype=torch.float32, device=x.device)
    if n:
        _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, partial, dy2.stride(0), x2.stride(0),
                                          dx.stride(0), n, c, per, BLOCK=triton.next_power_of_2(c))
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm with its backward: RMSNormFunction.apply(x, weight, eps)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, dw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain PyTorch RMSNorm (components/model/model.py's), for tests and benchmarks."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
