"""INT8 weight-only matmul for decoding: ours (kernels/int8_matmul.py) against a bf16 GEMV, torch's
`_weight_int8pack_mm` and the dequantize-then-matmul reference, at batch M = 1..32.

    python benchmarks/kernels/bench_int8.py            # on a GPU: LLaMA-size weights and lm heads
    python benchmarks/kernels/bench_int8.py --smoke    # tiny shapes (always so on a CPU)

Per case (weight N x K, batch M, x in bf16): the time and peak memory of the bf16 GEMV (x @ W^T
with W already in bf16, torch), `torch._weight_int8pack_mm` ("-" where this torch has no kernel
for the device), the reference (`int8_matmul_reference`: dequantize to fp32, round to bf16, matmul
in fp32) and ours; the GB/s of ours counts the bytes it must read and write (int8 weight + fp32
scales + x + y), those of the bf16 GEMV its own (bf16 weight + x + y). `bf16/ours` is the speed-up
over the bf16 GEMV: the issue's target on an H100 is >= 1.5 at M = 1 (the ideal is 2: half the
weight bytes). Ours is checked against the reference before it is timed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import DEVICE, check_close, gbps, measure, parser, report, smoke  # noqa: E402  (before kernels.*)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.int8_matmul import int8_matmul_reference, int8_weight_matmul  # noqa: E402

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (32000, 4096), (128256, 4096)]  # (N, K)
FULL_M = [1, 2, 4, 8, 16, 32]
SMOKE_SHAPES = [(130, 257), (64, 96)]
SMOKE_M = [1, 2, 8]


def _int8pack(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor):
    """torch's fused weight-only kernel as a callable, or None where it does not run on this device.
    On the CPU it runs in fp32, as components/model/int8.py calls it (torch's bf16 CPU kernel
    is wrong, here even crashes, when K is not a multiple of 16)."""
    if x.device.type == "cpu":
        xf = x.float()
        fn = lambda: torch.ops.aten._weight_int8pack_mm(xf, q, scale).to(x.dtype)  # noqa: E731
    else:
        s = scale.to(x.dtype)
        fn = lambda: torch.ops.aten._weight_int8pack_mm(x, q, s)  # noqa: E731
    try:
        fn()
    except (RuntimeError, NotImplementedError):
        return None
    return fn


def case(n: int, k: int, m: int, smoke_run: bool) -> dict:
    g = torch.Generator().manual_seed(n + k + m)
    scale = ((0.5 + torch.rand(n, generator=g)) / (64 * k ** 0.5)).to(DEVICE)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    w = (q.float() * scale[:, None]).to(torch.bfloat16)  # the float model's weight, for the bf16 GEMV
    ref = int8_matmul_reference(x, q, scale)
    check_close(f"{n}x{k} M={m}", int8_weight_matmul(x, q, scale), ref, rtol=2e-2, atol=2e-2)
    del ref
    ours = measure(lambda: int8_weight_matmul(x, q, scale), smoke_run)
    bf16 = measure(lambda: F.linear(x, w), smoke_run)
    pack = _int8pack(x, q, scale)
    packed = measure(pack, smoke_run) if pack is not None else {"ms": None, "peak_mib": None}
    deq = measure(lambda: int8_matmul_reference(x, q, scale), smoke_run)
    io = 2 * m * k + 2 * m * n  # x and y in bf16
    return {"N x K": f"{n}x{k}", "M": m,
            "bf16 ms": bf16["ms"], "int8pack ms": packed["ms"], "dequant+mm ms": deq["ms"], "ours ms": ours["ms"],
            "ours GB/s": gbps(n * k + 4 * n + io, ours["ms"]), "bf16 GB/s": gbps(2 * n * k + io, bf16["ms"]),
            "bf16/ours": bf16["ms"] / ours["ms"], "dequant+mm/ours": deq["ms"] / ours["ms"],
            "ours MiB": ours["peak_mib"], "dequant+mm MiB": deq["peak_mib"]}


def main() -> None:
    args = parser(__doc__).parse_args()
    smoke_run = smoke(args)
    shapes, ms = (SMOKE_SHAPES, SMOKE_M) if smoke_run else (FULL_SHAPES, FULL_M)
    rows = []
    for n, k in shapes:
        for m in ms:
            rows.append(case(n, k, m, smoke_run))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    report("int8_matmul", "INT8 weight-only matmul (bf16 x): bf16 GEMV vs _weight_int8pack_mm vs dequant+matmul "
           "vs ours", rows, args)


if __name__ == "__main__":
    main()
