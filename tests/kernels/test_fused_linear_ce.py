"""Fused linear + cross-entropy and its KL variant against the plain PyTorch references (the model's
loss, distill_kl), loss and every gradient, at small and odd shapes (V not a multiple of the tile,
ignored targets, zero and non-uniform token weights) and each dtype with its tolerance; plus
properties that do not go through a reference (CE = log V at h = 0, KL = 0 for student = teacher).
On the CPU the kernels run under TRITON_INTERPRET=1 (tests/kernel_env.py);
on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import math

import pytest
import torch

from kernel_env import DEVICE, interpreted

with interpreted():
    from kernels.fused_linear_ce import (
        FusedLinearCrossEntropyFunction,
        FusedLinearKLFunction,
        fused_linear_cross_entropy,
        fused_linear_kl,
        linear_backward,
        linear_ce_forward,
        linear_cross_entropy_reference,
        linear_kl_reference,
    )



# loss: relative; gradients: relative to the largest entry of the reference gradient (they scale as 1/N).
# 16-bit: the reference rounds the logits to the dtype before .float() and multiplies in the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SHAPES = [(1, 8, 1), (13, 40, 37), (64, 24, 300), (13, 72, 1000)]  # (N, C, V)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(n, c, v, dtype, seed, c_t=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(DEVICE, dtype)
    w = (torch.randn(v, c, generator=g) * 2 / math.sqrt(c)).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.25] = -100
    weights = torch.rand(n, generator=g) * 2
    weights[torch.rand(n, generator=g) < 0.2] = 0.0
    out = [h, w, targets.to(DEVICE), weights.to(DEVICE)]
    if c_t is not None:
        out += [torch.randn(n, c_t, generator=g).to(DEVICE, dtype),
                (torch.randn(v, c_t, generator=g) * 2 / math.sqrt(c_t)).to(DEVICE, dtype)]
    return out


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _close(got, want, tol, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(want.float().abs().max().item(), 1e-30)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_and_gradients_match_the_model(shape, dtype):
    h, w, targets, weights = _inputs(*shape, dtype, seed=sum(shape))
    (h1, w1), (h2, w2) = _leaves(h, w), _leaves(h, w)
    loss = fused_linear_cross_entropy(h1, w1, targets, weights)
    ref = linear_cross_entropy_reference(h2, w2, targets, weights)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=TOL[dtype], atol=TOL[dtype])
    loss.backward()
    ref.backward()
    _close(h1.grad, h2.grad, TOL[dtype], "dh")
    _close(w1.grad, w2.grad, TOL[dtype], "dW")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 1), (13, 40, 300), (21, 24, 1000)])
def test_kl_and_gradients_match_distill_kl(shape, dtype):
    n, c, v = shape
    h, w, targets, weights, h_t, w_t = _inputs(n, c, v, dtype, seed=v, c_t=c + 9)
    (h1, w1, ht1, wt1), (h2, w2) = _leaves(h, w, h_t, w_t), _leaves(h, w)
    loss = fused_linear_kl(h1, w1, ht1, wt1, targets, weights, 2.0)
    ref = linear_kl_reference(h2, w2, h_t, w_t, targets, weights, 2.0)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=TOL[dtype], atol=TOL[dtype])
    (3 * loss).backward()  # a grad_output other than 1 (the engine's loss scale, distill's T^2)
    (3 * ref).backward()
    _close(h1.grad, h2.grad, TOL[dtype], "dh_s")
    _close(w1.grad, w2.grad, TOL[dtype], "dW_s")
    assert ht1.grad is None and wt1.grad is None  # the teacher is frozen


def test_default_weights_are_the_plain_token_mean_and_strided_rows_work():
    h, w, targets, _ = _inputs(13, 40, 300, torch.float32, seed=1)
    wide = torch.randn(13, 64, device=DEVICE)
    wide[:, 5:45] = h  # rows with a stride of 64, not C
    loss = fused_linear_cross_entropy(wide[:, 5:45], w, targets)
    ones = linear_cross_entropy_reference(h, w, targets, torch.ones(13, device=DEVICE))
    torch.testing.assert_close(loss, ones, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_backward_does_not_depend_on_the_vocabulary_chunk(dtype):
    h, w, targets, weights = _inputs(13, 40, 300, dtype, seed=3)
    lse, _ = linear_ce_forward(h, w, targets)
    g = torch.rand(13, device=DEVICE)
    whole = linear_backward(g, h, w, targets, lse)
    # to rounding: dh's fp32 sums over the vocabulary are ordered differently per chunk, and each
    # row of dW, summed within one chunk, may still round differently where the interpreter's dot
    # blocks by the tile's width (bit-equal on some CPUs, not on others: AVX2-only EPYC)
    ulp = 1e-5 if dtype == torch.float32 else 2 ** -7
    for chunk in (7, 128, 299):
        dh, dw = linear_backward(g, h, w, targets, lse, vocab_chunk=chunk)
        torch.testing.assert_close(dh, whole[0], rtol=ulp, atol=1e-6)
        torch.testing.assert_close(dw, whole[1], rtol=ulp, atol=1e-6)


def test_cross_entropy_is_log_v_at_zero_hidden_states():
    """Independent of the reference: z = 0 gives a uniform softmax, CE = log V for every target, and
    dh_i = w_i / sum(w) * (mean_v W_v - W_{t_i}), dW = 0."""
    n, c, v = 13, 24, 300
    _, w, targets, weights = _inputs(n, c, v, torch.float32, seed=5)
    h = torch.zeros(n, c, device=DEVICE, requires_grad=True)
    wl = w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, wl, targets, weights)
    torch.testing.assert_close(loss.item(), math.log(v), rtol=1e-6, atol=1e-6)
    loss.backward()
    keep = (targets != -100).float() * weights
    expect = (keep / keep.sum())[:, None] * (w.mean(0)[None, :] - w[targets.clamp_min(0)])
    torch.testing.assert_close(h.grad, expect, rtol=1e-5, atol=1e-7)
    assert torch.equal(wl.grad, torch.zeros_like(w))


def test_very_negative_logits_stay_finite():
    """Every logit -200 (the padded vocabulary columns of a tile hold 0 > lse there): CE = log V,
    and the gradients match the reference with no inf/nan from the padding."""
    n, c, v = 13, 16, 37
    _, _, targets, weights = _inputs(n, c, v, torch.float32, seed=6)
    (h1, w1), (h2, w2) = _leaves(torch.ones(n, c, device=DEVICE), torch.full((v, c), -12.5, device=DEVICE)), \
        _leaves(torch.ones(n, c, device=DEVICE), torch.full((v, c), -12.5, device=DEVICE))
    loss = fused_linear_cross_entropy(h1, w1, targets, weights)
    torch.testing.assert_close(loss.item(), math.log(v), rtol=1e-5, atol=1e-5)
    loss.backward()
    linear_cross_entropy_reference(h2, w2, targets, weights).backward()
    assert h1.grad.isfinite().all() and w1.grad.isfinite().all()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-5)  # dh is 0 up to fp32 cancellation
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_with_zero_gradient_when_student_is_teacher():
    """Independent of the reference: KL(p || p) = 0 and its gradient (p - p)/T = 0; and KL >= 0."""
    h, w, targets, weights = _inputs(21, 40, 300, torch.float32, seed=7)
    hs, ws = _leaves(h, w)
    loss = fused_linear_kl(hs, ws, h, w, targets, weights, 1.5)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert hs.grad.abs().max().item() < 1e-7 and ws.grad.abs().max().item() < 1e-7
    other = fused_linear_kl(h, w, h.flip(0), w, targets, None, 1.5)
    assert other.item() > 0.01


def test_every_token_ignored_or_weighted_zero_gives_zero_loss_and_gradients():
    h, w, targets, _ = _inputs(13, 40, 37, torch.float32, seed=9)
    for t, u in ((torch.full_like(targets, -100), None), (targets, torch.zeros(13, device=DEVICE))):
        hl, wl = _leaves(h, w)
        loss = fused_linear_cross_entropy(hl, wl, t, u)
        ref = linear_cross_entropy_reference(h, w, t, u)
        assert loss.item() == 0.0 == ref.item()
        loss.backward()
        assert not hl.grad.any() and not wl.grad.any()
        kl = fused_linear_kl(h.requires_grad_(False), w, h.flip(0), w, t, u, 1.0)
        assert kl.item() == 0.0
    empty = torch.zeros(0, 40, device=DEVICE, requires_grad=True)  # no tokens at all
    loss = fused_linear_cross_entropy(empty, w, targets[:0])
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 40)


def test_bad_inputs_are_refused_naming_the_argument():
    h, w, targets, weights = _inputs(13, 40, 37, torch.float32, seed=11)
    cases = [
        (lambda: fused_linear_cross_entropy(h[0], w, targets), "h"),
        (lambda: fused_linear_cross_entropy(h, w[:, :39], targets), "weight"),
        (lambda: fused_linear_cross_entropy(h, w.half(), targets), "weight"),
        (lambda: fused_linear_cross_entropy(h, w, targets[:12]), "targets"),
        (lambda: fused_linear_cross_entropy(h, w, targets.int()), "targets"),
        (lambda: fused_linear_cross_entropy(h, w, targets.clone().fill_(37)), "targets"),
        (lambda: fused_linear_cross_entropy(h, w, targets.clone().fill_(-1)), "targets"),
        (lambda: fused_linear_cross_entropy(h, w, targets, weights[:5]), "token_weights"),
        (lambda: fused_linear_kl(h, w, h, w, targets, weights, 0.0), "temperature"),
        (lambda: fused_linear_kl(h, w, h, w, targets, weights, float("nan")), "temperature"),
        (lambda: fused_linear_kl(h, w, h[:5], w, targets, weights, 1.0), "h_t"),
        (lambda: fused_linear_kl(h, w, h, w[:30], targets, weights, 1.0), "w_t"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call()
    # another ignore_index is honoured: -1 is then the ignored value, not an out-of-range target
    loss = fused_linear_cross_entropy(h, w, targets.masked_fill(targets == -100, -1), weights, ignore_index=-1)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, targets, weights), rtol=1e-5, atol=1e-5)


def test_the_functions_are_plain_autograd_functions():
    h, w, targets, weights, h_t, w_t = _inputs(13, 40, 37, torch.float32, seed=13, c_t=16)
    ce = FusedLinearCrossEntropyFunction.apply(h, w, targets, weights, -100)
    kl = FusedLinearKLFunction.apply(h, w, h_t, w_t, targets, weights, 1.0, -100)
    torch.testing.assert_close(ce, linear_cross_entropy_reference(h, w, targets, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, linear_kl_reference(h, w, h_t, w_t, targets, weights, 1.0), rtol=1e-5,
                               atol=1e-6)
