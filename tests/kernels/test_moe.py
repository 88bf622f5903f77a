"""MoE token permutation and grouped expert matmuls against the model's loop over experts: output
and every gradient (x, gates, the three weight stacks) at small and odd shapes, each dtype, skewed
routing, the model's MoE end to end, and properties that need no reference. On the CPU the kernels
run under TRITON_INTERPRET=1 (tests/kernel_env.py); on a GPU the same tests run the
compiled kernels."""

from __future__ import annotations

import pytest
import torch

from kernel_env import DEVICE, interpreted

with interpreted():
    from kernels.moe import (
        combine_rows, grouped_mm, grouped_mm_weight_grad, moe_experts, moe_experts_reference, moe_permutation,
        permute_rows,
    )

from components.model.config import ModelConfig
from components.model.model import MoE


# max |got - want| <= TOL * max |want|, with want computed in fp32 from the same (rounded) inputs
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _routing(n: int, e: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token (like the model's top-k) and gates summing to 1."""
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k).long()
    gates = torch.rand(n, k, generator=g) + 0.1
    return idx, gates / gates.sum(-1, keepdim=True)


def _inputs(n, c, h, e, k, dtype, seed=0, idx=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    r_idx, gates = _routing(n, e, k, g)
    idx = r_idx if idx is None else idx
    ws = [torch.randn(e, h, c, generator=g) * c ** -0.5, torch.randn(e, h, c, generator=g) * c ** -0.5,
          torch.randn(e, c, h, generator=g) * h ** -0.5]
    return ([x.to(DEVICE, dtype), idx.to(DEVICE), gates.to(DEVICE)] + [w.to(DEVICE, dtype) for w in ws])


def _run(fn, x, idx, gates, *ws, dy):
    """fn's output and the gradients w.r.t. x, gates and the weight stacks."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *ws)]
    out = fn(leaves[0], idx, leaves[1], *leaves[2:])
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves]


def _assert_near(name, got, want, dtype):
    want = want.float()
    err = (got.float() - want).abs().max().item() if want.numel() else 0.0
    bound = TOL[dtype] * max(want.abs().max().item() if want.numel() else 0.0, 1e-3)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


CASES = [  # N, C, H, E, k: odd sizes, E = 1, k = 1 and k = E, one token
    (1, 24, 16, 1, 1),
    (7, 40, 72, 3, 2),
    (50, 24, 16, 8, 2),
    (7, 24, 72, 8, 8),
    (50, 40, 16, 3, 3),
    (1, 40, 72, 8, 1),
]


# every case in fp32; fp16 and bf16 without the two largest k (keeps the interpreter run short)
DTYPE_CASES = [(case, dt) for dt in (torch.float32, torch.float16, torch.bfloat16) for case in CASES
               if dt == torch.float32 or case not in CASES[3:5]]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES)
def test_forward_and_gradients_match_the_reference(case, dtype):
    n, c, h, e, k = case
    x, idx, gates, *ws = _inputs(n, c, h, e, k, dtype, seed=sum(case))
    dy = torch.randn(n, c, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = _run(moe_experts, x, idx, gates, *ws, dy=dy)
    assert got[0].dtype == dtype and got[0].shape == (n, c)
    assert [t.dtype for t in got[1:]] == [dtype, torch.float32, dtype, dtype, dtype]
    # the reference in fp32 from the same rounded inputs; in fp16/bf16 also the reference in dtype
    want = _run(moe_experts_reference, x.float(), idx, gates, *(w.float() for w in ws), dy=dy.float())
    same = _run(moe_experts_reference, x, idx, gates, *ws, dy=dy)
    for name, a, b, s in zip(("out", "dx", "dgates", "dw_gate", "dw_up", "dw_down"), got, want, same):
        _assert_near(name, a, b, dtype)
        if dtype != torch.float32:
            _assert_near(name + " (reference in dtype)", a, s, dtype)


@pytest.mark.parametrize("k", [1, 2])
def test_skewed_routing_leaves_idle_experts_with_zero_gradients(k):
    """Every token to expert 5 (and 2): one big group, six experts without a single row."""
    n, c, h, e = 50, 24, 72, 8
    idx = torch.tensor([[5, 2][:k]] * n)
    x, idx, gates, *ws = _inputs(n, c, h, e, k, torch.float32, seed=3, idx=idx)
    dy = torch.randn(n, c, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = _run(moe_experts, x, idx, gates, *ws, dy=dy)
    want = _run(moe_experts_reference, x, idx, gates, *ws, dy=dy)
    for name, a, b in zip(("out", "dx", "dgates", "dw_gate", "dw_up", "dw_down"), got, want):
        _assert_near(name, a, b, torch.float32)
    idle = [i for i in range(e) if i not in (5, 2)[:k]]
    for dw in got[3:]:
        assert torch.equal(dw[idle], torch.zeros_like(dw[idle]))


def test_matches_the_models_moe_forward_and_backward():
    """The wiring: route with the model's MoE, stack its experts' weights (gradients flow back
    through the stack), add the shared expert; output and every parameter's gradient agree."""
    cfg = ModelConfig(n_embd=40, ffn_hidden=24, n_experts=5, expert_top_k=2, ffn="moe")
    torch.manual_seed(0)
    moe = MoE(cfg).to(DEVICE)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 7, 40, device=DEVICE)
    dy = torch.randn(3, 7, 40, device=DEVICE)

    def ours(xb):
        flat = xb.reshape(-1, 40)
        idx, gates = moe.route(flat)
        stack = [torch.stack([getattr(ex, name).weight for ex in moe.experts]) for name in ("w_gate", "w_up", "c_proj")]
        return (moe_experts(flat, idx, gates, *stack) + moe.shared(flat)).view_as(xb)

    grads = []
    for fn in (moe, ours):
        moe.zero_grad()
        xl = x.clone().requires_grad_()
        out = fn(xl)
        out.backward(dy)
        grads.append([out.detach(), xl.grad] + [p.grad.clone() for p in moe.parameters()])
    for i, (a, b) in enumerate(zip(*grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("n,k", [(1, 1), (50, 1), (7, 3)])
def test_permute_then_combine_with_unit_gates_is_the_identity(n, k):
    """No reference: each token's k copies come back, so with gates 1/k (k = 1: gate 1) the
    round trip returns x; the sorted rows of expert e are its tokens in token order."""
    e, c = 6, 40
    g = torch.Generator().manual_seed(n + k)
    idx, _ = _routing(n, e, k, g)
    x = torch.randn(n, c, generator=g).to(DEVICE)
    r = moe_permutation(idx.to(DEVICE), e)
    assert int(r.counts.sum()) == n * k and r.offsets[0] == 0 and r.offsets[-1] == n * k
    assert torch.equal(r.counts.cpu().long(), torch.bincount(idx.flatten(), minlength=e))
    xs = permute_rows(x, r)
    for ex in range(e):
        tokens = (idx == ex).any(-1).nonzero().flatten().to(DEVICE)
        assert torch.equal(xs[r.offsets[ex]:r.offsets[ex + 1]], x[tokens])
    back = combine_rows(xs, r, torch.full((n, k), 1.0 / k, device=DEVICE))
    if k == 1:
        assert torch.equal(back, x)
    else:
        torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(combine_rows(xs, r, None), x * k)  # sum of k equal copies (k <= 3: exact)


def test_grouped_matmul_scales_each_experts_rows_by_its_own_weight():
    """No reference: W[e] = (e + 1) * I gives out = (e + 1) * rows; small tiles (many K steps,
    many row tiles, ragged edges); dW[e] = dY_e^T X_e checked through the same identity."""
    n, c, e = 45, 40, 4
    idx = torch.tensor([0] * 20 + [2] * 22 + [3] * 3)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    r = moe_permutation(idx[:, None].to(DEVICE), e, block_m=16)
    a = torch.randn(n, c, device=DEVICE)
    w = torch.stack([(i + 1) * torch.eye(c) for i in range(e)]).to(DEVICE)
    scale = idx.sort(stable=True).values.to(DEVICE, torch.float32)[:, None] + 1
    torch.testing.assert_close(grouped_mm(a, w, r, block_n=16, block_k=16), scale * a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped_mm(a, w, r, transpose=False, block_n=16, block_k=16), scale * a,
                               rtol=1e-6, atol=1e-6)
    rect = torch.randn(e, 24, c, device=DEVICE)  # (E, Nout, K), Nout != K
    out = grouped_mm(a, rect, r, block_n=16, block_k=16)
    dw = grouped_mm_weight_grad(out, a, r, e, block_m=16, block_n=16, block_k=16)
    for ex in range(e):
        rows = slice(int(r.offsets[ex]), int(r.offsets[ex + 1]))
        torch.testing.assert_close(out[rows], a[rows] @ rect[ex].T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dw[ex], out[rows].T @ a[rows], rtol=1e-5, atol=1e-4)
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))


def test_deterministic_and_empty_batch():
    x, idx, gates, *ws = _inputs(7, 24, 16, 3, 2, torch.float32, seed=5)
    dy = torch.randn(7, 24, device=DEVICE)
    a, b = _run(moe_experts, x, idx, gates, *ws, dy=dy), _run(moe_experts, x, idx, gates, *ws, dy=dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    out = moe_experts(x[:0], idx[:0], gates[:0], *ws)
    assert out.shape == (0, 24)


@pytest.mark.parametrize("arg,change,match", [
    ("idx", lambda d: d["idx"].fill_(3), r"^idx: expert ids must lie in 0\.\.2"),
    ("idx", lambda d: d["idx"].fill_(-1), "^idx"),
    ("idx", lambda d: d["idx"].float(), "^idx"),
    ("idx", lambda d: d["idx"][:-1], "^idx"),
    ("x", lambda d: d["x"][None], "^x"),
    ("gates", lambda d: d["gates"][:, :1], "^gates"),
    ("w_gate", lambda d: d["w_gate"][:, :, :-1], "^w_gate"),
    ("w_up", lambda d: d["w_up"][:2], "^w_up"),
    ("w_down", lambda d: d["w_down"].transpose(1, 2), "^w_down"),
    ("w_down", lambda d: d["w_down"].double(), "^w_down: dtype"),
])
def test_bad_input_is_refused_naming_the_argument(arg, change, match):
    x, idx, gates, wg, wu, wd = _inputs(5, 24, 16, 3, 2, torch.float32)
    d = dict(x=x, idx=idx, gates=gates, w_gate=wg, w_up=wu, w_down=wd)
    d[arg] = change(d)
    with pytest.raises(ValueError, match=match):
        moe_experts(**d)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size shapes: compiled kernels only")
@pytest.mark.parametrize("e,k", [(8, 2), (64, 6)])
def test_gpu_size_bf16(e, k):
    n, c, h = 2048, 1024, 704
    x, idx, gates, *ws = _inputs(n, c, h, e, k, torch.bfloat16, seed=e)
    dy = torch.randn(n, c, device=DEVICE, dtype=torch.bfloat16)
    got = _run(moe_experts, x, idx, gates, *ws, dy=dy)
    want = _run(moe_experts_reference, x.float(), idx, gates, *(w.float() for w in ws), dy=dy.float())
    for name, a, b in zip(("out", "dx", "dgates", "dw_gate", "dw_up", "dw_down"), got, want):
        _assert_near(name, a, b, torch.bfloat16)
