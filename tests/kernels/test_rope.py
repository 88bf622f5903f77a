"""Triton RoPE against the model's apply_rope, forward and gradient, at small and odd shapes, each
dtype with its tolerance, strided (transposed) inputs and a position offset (KV-cache decoding)."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_env import DEVICE, interpreted

with interpreted():
    from kernels.rope import RoPEFunction, rope_backward, rope_forward, rope_reference

from components.model.model import apply_rope, rope_tables  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
SHAPES = [(1, 1, 1, 2), (2, 3, 5, 8), (1, 2, 17, 32), (2, 1, 33, 6), (1, 4, 20, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradient_match_the_model(shape, dtype):
    B, H, T, D = shape
    g = torch.Generator().manual_seed(T * D)
    cos, sin = (t.to(DEVICE) for t in rope_tables(T + 3, D, 10000.0))
    x = torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    x_ref = x.detach().clone().requires_grad_()
    y = RoPEFunction.apply(x, cos, sin, 0)
    y_ref = apply_rope(x_ref, cos, sin)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])


def test_strided_queries_and_a_position_offset():
    """The model's q is (B, T, H, D) transposed to (B, H, T, D); decoding starts at cache.length."""
    cos, sin = (t.to(DEVICE) for t in rope_tables(40, 16, 500.0))
    q = torch.randn(2, 7, 3, 16, device=DEVICE).transpose(1, 2)  # (B, H, T, D), not contiguous
    assert not q.is_contiguous()
    torch.testing.assert_close(rope_forward(q, cos, sin, start=30), rope_reference(q, cos, sin, start=30))
    torch.testing.assert_close(rope_forward(q, cos, sin, start=30), apply_rope(q, cos[30:], sin[30:]))


def test_rotation_preserves_pair_norms_and_inverts():
    """Independent of the reference: each (x_i, x_{i+D/2}) pair keeps its length, the backward is the
    inverse rotation, and position 0 is the identity; a half-turn angle negates the pair."""
    D = 12
    cos, sin = (t.to(DEVICE) for t in rope_tables(9, D, 10000.0))
    x = torch.randn(2, 2, 9, D, device=DEVICE)
    y = rope_forward(x, cos, sin)
    pair_norm = lambda t: t[..., : D // 2] ** 2 + t[..., D // 2:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope_backward(y, cos, sin), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    half_turn = (torch.full((1, D // 2), math.pi).cos().to(DEVICE), torch.full((1, D // 2), math.pi).sin().to(DEVICE))
    torch.testing.assert_close(rope_forward(x[:, :, :1], *half_turn), -x[:, :, :1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 3, 4)), "x: expected"),
    (dict(x=torch.zeros(1, 1, 2, 5)), "must be even"),
    (dict(start=8), "start: positions"),
    (dict(cos=torch.zeros(10, 3)), "cos/sin"),
])
def test_bad_input_is_refused_with_the_argument_named(bad, match):
    args = dict(x=torch.zeros(1, 1, 3, 4), cos=torch.zeros(10, 2), sin=torch.zeros(10, 2), start=0) | bad
    if args["cos"].shape != args["sin"].shape:
        args["sin"] = torch.zeros(10, 2)
    with pytest.raises(ValueError, match=match):
        rope_forward(args["x"].to(DEVICE), args["cos"].to(DEVICE), args["sin"].to(DEVICE), args["start"])
