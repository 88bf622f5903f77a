"""Hybrid sparse attention (kernels/hybrid_attention.py) against SDPA: time, TFLOP/s, peak memory.

    .venv/bin/python benchmarks/kernels/bench_attention.py            # full sizes on a GPU
    .venv/bin/python benchmarks/kernels/bench_attention.py --smoke    # tiny, and always so on a CPU

Per sequence length T (1k .. 32k), head dim D (64, 128), bf16, B = 1, H = 16 and the NSA-like
window 512, block 64, top_k 16 (arXiv 2502.11089 uses 512 / 64 / 16): forward and forward+backward
of
  - ref:   the model's path, hybrid_mask (a dense (B, H, T, T) boolean mask, built each call) + SDPA;
           only where one such mask is at most 4 GiB (T <= 16k here), "-" beyond;
  - flash: torch's best dense attention, SDPA's FlashAttention backend with is_causal=True (it
           computes ALL causal pairs, so it is the bar a sparse kernel must beat);
  - ours:  HybridAttentionFunction (selection, tile lists, Triton forward / dq / dk-dv kernels).
TFLOP/s count the attended pairs of the hybrid mask (window + chosen blocks), 4*D flops per pair
forward and 3.5 times that forward+backward (FlashAttention-2's convention: backward = 2.5 x forward),
for ref and ours alike; "visited/attended" is the work ours really does (whole tiles of the window
and of each query tile's union of chosen blocks) over the attended pairs.

Two kinds of queries: "iid" (random: neighbouring queries choose unrelated blocks, so a query
tile's union of choices approaches all earlier blocks at long T, the worst case for a tile-based
kernel), and "shared" (each head's queries are one random vector plus 10 % noise, so they agree on
their blocks, as neighbouring queries of a trained model largely do: the best case). The issue's H100
targets: faster than SDPA flash from 8k tokens, at least 3x at 32k.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, ON_GPU, check_close, measure, parser, report, smoke, tflops  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels.hybrid_attention import HybridAttentionFunction, hybrid_attention_forward  # noqa: E402

from components.model.model import hybrid_mask  # noqa: E402

MASK_BYTES = 2**32  # the reference runs while one (B, H, T, T) bool mask is at most this


def reference(q, k, v, window, block, top_k):
    """The model's hybrid attention: the dense mask (no gradient), then SDPA."""
    with torch.no_grad():
        mask = hybrid_mask(q, k, window, block, top_k)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fwd_bwd(fn, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(dy)
    return run


def timed(fn, inputs, dy, small):
    """(forward, forward+backward) measurements, or (None, None) where the op cannot run here."""
    try:
        with torch.no_grad():
            fwd = measure(fn, small)
        return fwd, measure(fwd_bwd(fn, inputs, dy), small)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # e.g. no flash backend for this device/dtype
        print(f"  skipped: {str(e).splitlines()[0][:120]}", flush=True)
        if ON_GPU:
            torch.cuda.empty_cache()
        return None, None


def inputs(B, H, T, D, dtype, kind, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v, dy = (torch.randn(B, T, H, D, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2)
                   for _ in range(4))  # the model's (B, T, H, D) projections, viewed (B, H, T, D)
    if kind == "shared":
        q = (torch.randn(B, H, 1, D, device=DEVICE, dtype=dtype, generator=g) + 0.1 * q).transpose(1, 2)
        q = q.contiguous().transpose(1, 2)
    return [t.requires_grad_() for t in (q, k, v)], dy


def case(B, H, T, D, window, block, top_k, dtype, kind, small) -> dict:
    (q, k, v), dy = inputs(B, H, T, D, dtype, kind)
    name = f"T={T} D={D} {kind}"
    with torch.no_grad():  # check the last rows against the reference first: a wrong kernel's speed is worthless
        o, _, plan = hybrid_attention_forward(q, k, v, window, block, top_k)
        n = min(T, 256)
        mask = hybrid_mask(q[:, :, T - n:], k, window, block, top_k, q_start=T - n)
        want = F.scaled_dot_product_attention(q[:, :, T - n:].float(), k.float(), v.float(), attn_mask=mask)
        check_close(name, o[:, :, T - n:], want, 2e-2, 2e-2)
        i = torch.arange(T, device=DEVICE)
        pairs = int(B * H * torch.clamp(i + 1, max=window).sum()) + block * int((plan.sel >= 0).sum())
        bm, bn = plan.cfg["BLOCK_M"], plan.cfg["BLOCK_N"]
        lo = (torch.arange(0, T, bm, device=DEVICE) - window + 1).clamp_min(0) // bn
        hi = (torch.clamp(torch.arange(0, T, bm, device=DEVICE) + bm, max=T) - 1) // bn + 1
        visited = bm * bn * (B * H * int((hi - lo).sum()) + int(plan.counts.sum()))
        del o, plan, mask, want
    fits = B * H * T * T <= MASK_BYTES
    ours = timed(lambda: HybridAttentionFunction.apply(q, k, v, window, block, top_k), (q, k, v), dy, small)
    dense = timed(lambda: flash(q, k, v), (q, k, v), dy, small)
    ref = timed(lambda: reference(q, k, v, window, block, top_k), (q, k, v), dy, small) if fits else (None, None)
    flops = 4 * D * pairs

    def ms(m):
        return m and m["ms"]

    def ratio(a, b):
        return a and b and a["ms"] / b["ms"]

    return {"T": T, "D": D, "q": kind, "keys/query": pairs / (B * H * T), "visited/attended": visited / pairs,
            "ref fwd ms": ms(ref[0]), "flash fwd ms": ms(dense[0]), "ours fwd ms": ms(ours[0]),
            "ours fwd TFLOP/s": tflops(flops, ours[0]["ms"]), "flash/ours fwd": ratio(dense[0], ours[0]),
            "ref/ours fwd": ratio(ref[0], ours[0]),
            "ref f+b ms": ms(ref[1]), "flash f+b ms": ms(dense[1]), "ours f+b ms": ms(ours[1]),
            "ours f+b TFLOP/s": tflops(3.5 * flops, ours[1]["ms"]), "flash/ours f+b": ratio(dense[1], ours[1]),
            "ref/ours f+b": ratio(ref[1], ours[1]),
            "peak MiB ref": ref[1] and ref[1]["peak_mib"], "peak MiB flash": dense[1] and dense[1]["peak_mib"],
            "peak MiB ours": ours[1]["peak_mib"]}


def main() -> None:
    args = parser(__doc__).parse_args()
    small = smoke(args)
    if small:
        B, H, window, block, top_k, dtype = 1, 2, 16, 8, 2, (torch.bfloat16 if ON_GPU else torch.float32)
        grid = [(T, 16, kind) for T in (64, 100) for kind in ("iid", "shared")]
    else:
        B, H, window, block, top_k, dtype = 1, 16, 512, 64, 16, torch.bfloat16
        grid = [(1024 * n, D, kind) for D in (64, 128) for n in (1, 2, 4, 8, 16, 32) for kind in ("iid", "shared")]
    print(f"B={B} H={H} window={window} block={block} top_k={top_k} dtype={dtype}", flush=True)
    rows = [case(B, H, T, D, window, block, top_k, dtype, kind, small) for T, D, kind in grid]
    report("attention", f"Hybrid sparse attention vs SDPA (B={B}, H={H}, window={window}, block={block}, "
           f"top_k={top_k}, {dtype})", rows, args)


if __name__ == "__main__":
    main()
