"""Fused RMSNorm against the plain PyTorch reference, forward and both gradients, at small and odd
shapes and each dtype with its tolerance. On the CPU the kernels run under TRITON_INTERPRET=1
(tests/kernels/kernel_env.py); on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch

from kernel_env import DEVICE, interpreted

with interpreted():
    from kernels.rmsnorm import RMSNormFunction, rms_norm_backward, rms_norm_forward, rms_norm_reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SHAPES = [(1, 1), (3, 7), (2, 5, 48), (17, 128), (4, 3, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_the_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = RMSNormFunction.apply(x, w, 1e-6)
    y_ref = rms_norm_reference(x_ref, w_ref, 1e-6)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    # dw sums over every row: its error grows with the row count, and the reference sums in `dtype`
    rows = x.numel() // shape[-1]
    tol = {k: v * max(1, rows ** 0.5) for k, v in TOL[dtype].items()}
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)


def test_mixed_dtypes_promote_like_the_model():
    """bf16 activations with an fp32 weight (the model under autocast-free bf16 compute)."""
    x = torch.randn(6, 40).to(DEVICE, torch.bfloat16)
    w = torch.rand(40, device=DEVICE) + 0.5
    y, _ = rms_norm_forward(x, w, 1e-6)
    ref = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == torch.float32 == ref.dtype
    # one bf16 step: Triton's CPU interpreter truncates fp32 -> bf16 casts where the GPU rounds
    torch.testing.assert_close(y, ref, rtol=2 ** -7 if DEVICE == "cpu" else 1e-6, atol=1e-6)


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_the_weight_gradient_does_not_depend_on_how_rows_are_split(programs):
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(11, 24, generator=g), torch.rand(24, generator=g) + 0.5, torch.randn(11, 24, generator=g)
    x, w, dy = x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE)
    _, rstd = rms_norm_forward(x, w, 1e-6)
    dx, dw = rms_norm_backward(dy, x, w, rstd, programs=programs)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    rms_norm_reference(x_ref, w_ref, 1e-6).backward(dy)
    torch.testing.assert_close(dw, w_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_the_kernel_really_normalises():
    """Not only agreement with a reference that could share a bug: unit RMS per row when w = 1."""
    x = torch.randn(5, 33, device=DEVICE) * torch.arange(1, 6, device=DEVICE)[:, None]
    y, rstd = rms_norm_forward(x, torch.ones(33, device=DEVICE), 0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(5, device=DEVICE), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, x.pow(2).mean(-1).rsqrt(), rtol=1e-5, atol=1e-6)
