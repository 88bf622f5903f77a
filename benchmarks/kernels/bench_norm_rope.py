"""Fused RMSNorm and RoPE against eager PyTorch and torch.compile: time, GB/s, peak memory.

    .venv/bin/python benchmarks/kernels/bench_norm_rope.py            # full sizes on a GPU
    .venv/bin/python benchmarks/kernels/bench_norm_rope.py --smoke    # tiny, and always so on a CPU

Both ops are memory bound, so the yardstick is the device's copy bandwidth, measured here on the
same bytes (`y.copy_(x)` reads and writes what the op reads and writes, the weight and tables
aside). The issue's H100 target: RMSNorm forward at >= 80 % of the copy bandwidth. Forward and
forward+backward are timed separately; bytes counted: forward reads x and writes y, the backward
reads x and dy and writes dx (RMSNorm adds the per-program dw partials, negligible).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEVICE, ON_GPU, check_close, gbps, measure, parser, report, smoke  # noqa: E402

import torch  # noqa: E402

from kernels.rmsnorm import RMSNormFunction, rms_norm_reference  # noqa: E402
from kernels.rope import RoPEFunction, rope_reference  # noqa: E402

from components.model.model import rope_tables  # noqa: E402


def compiled(fn):
    """torch.compile where it is fair (a GPU); None on the CPU (no inductor run in a smoke test)."""
    return torch.compile(fn) if ON_GPU else None


def fwd_bwd(fn, *inputs):
    def run():
        for t in inputs:
            t.grad = None
        y = fn()
        y.backward(torch.ones_like(y))
    return run


def row(op: str, shape: str, impls: dict, grads: tuple, nbytes: int, small: bool) -> dict:
    """One table row: eager, torch.compile and Triton, forward and forward+backward, against copy."""
    x = grads[0]
    dst = torch.empty_like(x)
    copy = measure(lambda: dst.copy_(x), small)
    res = {k: f and measure(f, small) for k, f in impls.items()}
    back = {k: f and measure(fwd_bwd(f, *grads), small) for k, f in impls.items()}
    return {"op": op, "shape": shape, "copy GB/s": gbps(nbytes, copy["ms"]),
            "eager ms": res["eager"]["ms"], "compile ms": res["compile"] and res["compile"]["ms"],
            "triton ms": res["triton"]["ms"], "triton GB/s": gbps(nbytes, res["triton"]["ms"]),
            "% of copy": 100 * copy["ms"] / res["triton"]["ms"],
            "eager/triton": res["eager"]["ms"] / res["triton"]["ms"],
            "compile/triton": res["compile"] and res["compile"]["ms"] / res["triton"]["ms"],
            "fwd+bwd eager/triton": back["eager"]["ms"] / back["triton"]["ms"],
            "peak MiB eager": res["eager"]["peak_mib"], "peak MiB triton": res["triton"]["peak_mib"]}


def bench_rmsnorm(shapes, dtype, small: bool) -> list[dict]:
    rows, best = [], compiled(rms_norm_reference)
    for n, c in shapes:
        x = torch.randn(n, c, device=DEVICE, dtype=dtype, requires_grad=True)
        w = torch.ones(c, device=DEVICE, dtype=dtype, requires_grad=True)
        check_close(f"rmsnorm {n}x{c}", RMSNormFunction.apply(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), 2e-2, 2e-2)
        impls = {"eager": lambda: rms_norm_reference(x, w, 1e-6), "compile": best and (lambda: best(x, w, 1e-6)),
                 "triton": lambda: RMSNormFunction.apply(x, w, 1e-6)}
        rows.append(row("rmsnorm", f"{n}x{c}", impls, (x, w), 2 * x.numel() * x.element_size(), small))
    return rows


def bench_rope(shapes, dtype, small: bool) -> list[dict]:
    rows, best = [], compiled(rope_reference)
    for b, h, t, d in shapes:
        cos, sin = (u.to(DEVICE) for u in rope_tables(t, d, 10000.0))
        q = torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()  # the model's view
        check_close(f"rope {b}x{h}x{t}x{d}", RoPEFunction.apply(q, cos, sin, 0), rope_reference(q, cos, sin), 2e-2, 2e-2)
        impls = {"eager": lambda: rope_reference(q, cos, sin), "compile": best and (lambda: best(q, cos, sin)),
                 "triton": lambda: RoPEFunction.apply(q, cos, sin, 0)}
        rows.append(row("rope", f"{b}x{h}x{t}x{d}", impls, (q,), 2 * q.numel() * q.element_size(), small))
    return rows


def main() -> None:
    args = parser(__doc__).parse_args()
    small = smoke(args)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    norm_shapes = [(64, 96), (33, 130)] if small else [(4096, 2048), (8192, 4096), (16384, 4096), (32768, 8192)]
    rope_shapes = [(1, 2, 17, 32)] if small else [(4, 32, 2048, 128), (1, 32, 8192, 128), (1, 16, 32768, 64)]
    rows = bench_rmsnorm(norm_shapes, dtype, small) + bench_rope(rope_shapes, dtype, small)
    report("norm_rope", f"RMSNorm and RoPE ({dtype})", rows, args)


if __name__ == "__main__":
    main()
