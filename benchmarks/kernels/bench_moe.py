"""MoE routed experts: the model's Python loop, torch's best, and kernels/moe.py (Triton).

    .venv/bin/python benchmarks/kernels/bench_moe.py            # full sizes on a GPU
    .venv/bin/python benchmarks/kernels/bench_moe.py --smoke    # tiny shapes (always so on a CPU)

Per case (N tokens, C = 2048, H = 1408 as DeepSeek-V2-Lite's experts, E experts, top-k, bf16),
forward and forward+backward (gradients w.r.t. x, gates and the three weight stacks):
  - reference: components/model/model.py's loop over experts (index_select, three F.linear,
    index_add), as kernels.moe.moe_experts_reference;
  - torch best: sort by expert + torch._grouped_mm (one grouped GEMM per projection, torch's own
    CUTLASS kernels on sm90) + index_add, when this torch has it and it runs on these shapes,
    else torch.compile of the reference loop (the table names which);
  - ours: kernels.moe.moe_experts with the weights already stacked (E, H, C);
  - ours + stack: the same with torch.stack of per-expert weights inside the timed call, as the
    model's wiring does with its per-expert nn.Linear weights.
TFLOP/s counts the three expert matmuls only: 6 N k C H forward, 18 N k C H forward+backward.
Ours is checked against the reference (output and every gradient) before anything is timed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEVICE, check_close, measure, parser, report, smoke, tflops  # noqa: E402  (TRITON_INTERPRET)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.moe import moe_experts, moe_experts_reference  # noqa: E402

DTYPE = torch.bfloat16


def moe_experts_grouped_mm(x, idx, gates, w_gate, w_up, w_down):
    """Sort by expert, torch._grouped_mm for the three projections, weighted index_add back."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=w_gate.shape[0]).cumsum(0).to(torch.int32)  # end row of each expert
    tok = order // k
    xs = x.index_select(0, tok)
    g = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)
    u = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(F.silu(g) * u, w_down.transpose(1, 2), offs=offs)
    y = y * gates.reshape(-1).index_select(0, order)[:, None].to(y.dtype)
    return torch.zeros_like(x).index_add(0, tok, y)


def torch_best(inputs) -> tuple[str, object]:
    """(its name, the function): torch._grouped_mm if it runs forward and backward here, else
    torch.compile of the loop (on a GPU) or nothing (CPU)."""
    if hasattr(torch, "_grouped_mm"):
        try:
            x, idx, gates, *ws = inputs
            leaves = [t.detach().requires_grad_() for t in (x, gates, *ws)]
            out = moe_experts_grouped_mm(leaves[0], idx, leaves[1], *leaves[2:])
            torch.autograd.grad(out, leaves, torch.ones_like(out))
            return "sort + torch._grouped_mm", moe_experts_grouped_mm
        except (RuntimeError, NotImplementedError) as e:
            print(f"torch._grouped_mm unusable here ({str(e).splitlines()[0]}); trying torch.compile", flush=True)
    if DEVICE == "cuda":
        return "torch.compile(loop)", torch.compile(moe_experts_reference, dynamic=True)
    return "none on this CPU", None


def make_inputs(n, c, h, e, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    idx = torch.rand(n, e, generator=g).topk(k, dim=-1).indices  # k distinct experts, roughly balanced
    gates = torch.rand(n, k, generator=g) + 0.1
    gates = gates / gates.sum(-1, keepdim=True)
    ws = [torch.randn(e, h, c, generator=g) * c ** -0.5, torch.randn(e, h, c, generator=g) * c ** -0.5,
          torch.randn(e, c, h, generator=g) * h ** -0.5]
    return [x.to(DEVICE, DTYPE), idx.to(DEVICE), gates.to(DEVICE)] + [w.to(DEVICE, DTYPE) for w in ws]


def with_stack(x, idx, gates, w_gate, w_up, w_down):
    """ours as the model would call it: per-expert weights (views here) stacked inside the call."""
    stacks = [torch.stack(list(w.unbind(0))) for w in (w_gate, w_up, w_down)]
    return moe_experts(x, idx, gates, *stacks)


def fwd_bwd(fn, inputs, dy):
    x, idx, gates, *ws = inputs
    leaves = [t.detach().requires_grad_() for t in (x, gates, *ws)]

    def run():
        out = fn(leaves[0], idx, leaves[1], *leaves[2:])
        return (out,) + torch.autograd.grad(out, leaves, dy)
    return run


def check(inputs, dy, name):
    got = fwd_bwd(moe_experts, inputs, dy)()
    want = fwd_bwd(moe_experts_reference, inputs, dy)()
    for what, a, b in zip(("out", "dx", "dgates", "dw_gate", "dw_up", "dw_down"), got, want):
        a, b = a.detach(), b.detach()
        check_close(f"{name} {what}", a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def main() -> None:
    args = parser(__doc__).parse_args()
    tiny = smoke(args)
    c, h = (32, 48) if tiny else (2048, 1408)
    cases = [(16, 4, 2), (8, 8, 8)] if tiny else [(n, e, k) for n in (4096, 16384) for e, k in ((8, 2), (64, 6))]
    best_name, best = None, None
    rows = []
    for n, e, k in cases:
        inputs = make_inputs(n, c, h, e, k)
        dy = torch.randn(n, c, device=DEVICE, dtype=DTYPE)
        name = f"N={n} C={c} H={h} E={e} k={k}"
        check(inputs, dy, name)
        if best_name is None:
            best_name, best = torch_best(inputs)
            print(f"torch best: {best_name}", flush=True)
        impls = [("reference (loop)", moe_experts_reference), (best_name, best), ("ours (Triton)", moe_experts),
                 ("ours + torch.stack", with_stack)]
        flops = {"fwd": 6 * n * k * c * h, "fwd+bwd": 18 * n * k * c * h}
        for pas in ("fwd", "fwd+bwd"):
            ref_ms = None
            for label, fn in impls:
                if fn is None:
                    continue
                if pas == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            return fn(*inputs)
                else:
                    call = fwd_bwd(fn, inputs, dy)
                m = measure(call, tiny)
                ref_ms = ref_ms or m["ms"]
                rows.append({"case": name, "pass": pas, "impl": label, "ms": m["ms"],
                             "TFLOP/s": tflops(flops[pas], m["ms"]), "peak MiB": m["peak_mib"],
                             "speedup vs loop": ref_ms / m["ms"]})
    report("moe", "MoE routed experts (bf16): loop vs torch best vs Triton", rows, args)


if __name__ == "__main__":
    main()
