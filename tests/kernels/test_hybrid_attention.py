"""Triton hybrid sparse attention against SDPA with the model's hybrid_mask, forward and the three
gradients, at small and odd shapes (T not a multiple of the tile or of `block`, windows of 1 and
beyond T, no, one, several and more blocks than there are), each dtype with its tolerance; the block
choice against a plain loop; the attention weights' support via one-hot values; tile-size
independence; and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernel_env import DEVICE, interpreted

with interpreted():
    from kernels.hybrid_attention import (HybridAttentionFunction, hybrid_attention, hybrid_attention_backward,
                                          hybrid_attention_forward, select_blocks)

from components.model.model import hybrid_mask  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=5e-3, atol=5e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# (B, H, T, D, window, block, top_k)
CASES = [(1, 1, 1, 16, 1, 4, 1), (1, 2, 37, 16, 5, 4, 3), (2, 1, 70, 32, 1, 8, 1), (1, 2, 131, 16, 5, 16, 3),
         (1, 1, 70, 32, 100, 8, 3), (1, 1, 131, 32, 5, 8, 100), (1, 2, 70, 16, 12, 4, 0),
         (1, 1, 131, 16, 3, 32, 2), (1, 2, 131, 16, 70, 8, 2)]  # blocks of whole key tiles; unmasked tiles


def _inputs(B, H, T, D, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, D) if strided else (B, H, T, D)  # strided: the model's (B, T, H, D) view, transposed
    q, k, v, do = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(4))
    if strided:
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    return [t.requires_grad_() for t in (q, k, v)], do


def _reference(q, k, v, window, block, top_k):
    """SDPA in fp32 with the model's mask, chosen from the inputs in their own dtype (as the kernel)."""
    mask = hybrid_mask(q.detach(), k.detach(), window, block, top_k)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


def _check(case, dtype, strided=False):
    B, H, T, D, window, block, top_k = case
    (q, k, v), do = _inputs(B, H, T, D, dtype, seed=T * D + top_k, strided=strided)
    o = hybrid_attention(q, k, v, window, block, top_k)
    ref = _reference(q, k, v, window, block, top_k)
    assert o.dtype == dtype and o.shape == (B, H, T, D)
    torch.testing.assert_close(o.float(), ref, **TOL[dtype])
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(ref, (q, k, v), do.float())
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), g_ref.float(), **TOL[dtype], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_forward_and_gradients_match_the_reference(case):
    _check(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_half_precision_forward_and_gradients_match_the_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("D", [64, 128])
def test_the_real_head_dims_with_strided_inputs(D):
    """The model's q, k, v are (B, T, H, D) views transposed to (B, H, T, D)."""
    _check((1, 2, 45, D, 7, 8, 2), torch.float32, strided=True)


def test_a_window_as_long_as_the_sequence_is_dense_causal_attention():
    (q, k, v), do = _inputs(2, 2, 53, 32, torch.float32, seed=3)
    o = hybrid_attention(q, k, v, 53, 4, 3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(o, ref, **TOL[torch.float32])
    for g, g_ref in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, g_ref, **TOL[torch.float32])


def _chosen_by_a_loop(q, k, window, block, top_k):
    """The block choice written out per query, in float64: {(b, h, i): set of block ids}."""
    B, H, T, D = q.shape
    out = {}
    for b in range(B):
        for h in range(H):
            for i in range(T):
                scores = []
                for blk in range(T // block):
                    if (blk + 1) * block <= i - window + 1:
                        kc = k[b, h, blk * block:(blk + 1) * block].double().mean(0)
                        scores.append((float(q[b, h, i].double() @ kc), blk))
                out[b, h, i] = {blk for _, blk in sorted(scores, reverse=True)[:top_k]}
    return out


def test_the_block_choice_is_the_best_eligible_blocks():
    """Against a plain loop, not hybrid_mask: eligible blocks only, best scores first, -1 padding."""
    B, H, T, D, window, block, top_k = 2, 2, 41, 16, 6, 4, 3
    (q, k, _), _ = _inputs(B, H, T, D, torch.float32, seed=5)
    sel = select_blocks(q.detach(), k.detach(), window, block, top_k)
    assert sel.shape == (B, H, T, top_k) and sel.dtype == torch.int32
    want = _chosen_by_a_loop(q.detach().cpu(), k.detach().cpu(), window, block, top_k)
    for (b, h, i), blocks in want.items():
        got = sel[b, h, i].tolist()
        assert {x for x in got if x >= 0} == blocks, (b, h, i)
        assert got.count(-1) == top_k - len(blocks), (b, h, i)


def test_every_output_row_is_a_convex_combination_of_exactly_the_attended_values():
    """Not only agreement with a reference that could share a bug: with one-hot values (v[j] = e_j)
    output row i is query i's attention weights; they are positive exactly on its window and on the
    keys of its chosen blocks (from a plain loop), and sum to 1."""
    B, H, T, D, window, block, top_k = 1, 2, 29, 32, 4, 3, 2
    (q, k, _), _ = _inputs(B, H, T, D, torch.float32, seed=7)
    v = torch.eye(T, D, device=DEVICE).expand(B, H, T, D)
    w = hybrid_attention(q.detach(), k.detach(), v, window, block, top_k)[..., :T]  # (B, H, T, T) weights
    chosen = _chosen_by_a_loop(q.detach().cpu(), k.detach().cpu(), window, block, top_k)
    assert (w >= -1e-7).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T, device=DEVICE), rtol=1e-5, atol=1e-5)
    for (b, h, i), blocks in chosen.items():
        want = {j for j in range(T) if 0 <= i - j < window}
        want |= {j for blk in blocks for j in range(blk * block, (blk + 1) * block)}
        got = set((w[b, h, i] > 1e-6).nonzero().flatten().tolist())
        assert got == want, (b, h, i)


@pytest.mark.parametrize("tiles", [(16, 16), (16, 32), (32, 16)])
def test_the_result_does_not_depend_on_the_tile_sizes(tiles):
    """Blocks smaller than, larger than, misaligned with (20 keys vs 16 or 32) and made of whole key tiles."""
    (q, k, v), do = _inputs(1, 2, 83, 16, torch.float32, seed=11)
    q, k, v = q.detach(), k.detach(), v.detach()
    for window, block, top_k in [(9, 20, 2), (50, 8, 4), (5, 32, 1)]:
        want = _reference(q, k, v, window, block, top_k)
        o, lse, plan = hybrid_attention_forward(q, k, v, window, block, top_k, tiles=tiles)
        torch.testing.assert_close(o, want, **TOL[torch.float32])
        mask = hybrid_mask(q, k, window, block, top_k)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(16)).masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(lse, scores.logsumexp(-1) / math.log(2), **TOL[torch.float32])
        grads = hybrid_attention_backward(do, q, k, v, o, lse, plan)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
        grads_ref = torch.autograd.grad(_reference(qr, kr, vr, window, block, top_k), (qr, kr, vr), do)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, **TOL[torch.float32])


@pytest.mark.parametrize("bad, match", [
    (dict(D=24), "head dim 24"), (dict(D=8), "head dim 8"), (dict(window=0), "window must be at least 1, got 0"),
    (dict(block=0), "block must be at least 1, got 0"), (dict(top_k=-1), "top_k must not be negative, got -1"),
    (dict(kT=9), r"\(1, 2, 9, 16\)"), (dict(vdtype=torch.float16), "float16"),
])
def test_what_the_kernel_refuses(bad, match):
    D = bad.get("D", 16)
    q = torch.randn(1, 2, 8, D, device=DEVICE)
    k = torch.randn(1, 2, bad.get("kT", 8), D, device=DEVICE)
    v = torch.randn(1, 2, 8, D, device=DEVICE, dtype=bad.get("vdtype", torch.float32))
    with pytest.raises(ValueError, match=match):
        HybridAttentionFunction.apply(q, k, v, bad.get("window", 2), bad.get("block", 4), bad.get("top_k", 1))


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU size")
def test_32k_tokens_without_a_quadratic_buffer():
    """At 32k tokens the (T, T) mask alone would be 1 GiB per head; the kernel's extra memory stays
    at O(T * top_k) (the choice, the tile lists) and the gradients are finite."""
    B, H, T, D = 1, 2, 32768, 64
    (q, k, v), do = _inputs(B, H, T, D, torch.bfloat16, seed=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = hybrid_attention(q, k, v, 512, 64, 16)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 256 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert all(torch.isfinite(t).all() for t in (o, dq, dk, dv))
    # the last 64 queries against the reference, on their rows of the mask only
    rows = slice(T - 64, T)
    mask = hybrid_mask(q[:, :, rows].detach(), k.detach(), 512, 64, 16, q_start=T - 64)
    ref = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(o[:, :, rows].float(), ref, **TOL[torch.bfloat16])
