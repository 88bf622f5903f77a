"""Mixture-of-experts routed experts in Triton: token permutation and grouped expert matmuls.

For tokens x (N, C) routed to experts idx (N, k) with gates (N, k), and SwiGLU experts with
stacked weights w_gate, w_up (E, H, C) and w_down (E, C, H):

    out[t] = sum_j gates[t, j] * w_down[e] @ (silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])),  e = idx[t, j]

as components/model/model.py's MoE computes it with a Python loop over experts. Here, as in
MegaBlocks (Gale et al. 2022, arXiv 2211.15841: "dropless" MoE, tokens sorted by expert, no
capacity, no padding to a capacity) and ScatterMoE (Tan et al. 2024, arXiv 2403.08245: per-tile
expert ids over the expert-sorted rows, one launch for all experts):

1. permutation (host, torch): the N*k (token, slot) pairs sorted by expert, stably, give `src`
   (the token of each expert-sorted row), `rank` (the sorted row of each pair), `offsets` (E+1,)
   (expert e owns rows offsets[e]:offsets[e+1]) and a tile map: each BLOCK_M-row tile of one
   expert's rows, with its expert id (-1 for the unused tail of the fixed-size map, so nothing
   is read back to the host: the only sync is the check of the expert ids);
2. `_gather_rows_kernel`: xs = x[src], the expert-sorted (N*k, C) buffer;
3. `_grouped_mm_kernel`: ys = xs @ W[e]^T for every tile of expert e, one launch (tl.dot, fp32
   accumulation), for w_gate, w_up, then, after silu(g) * u in torch, w_down;
4. `_combine_kernel`: out[t] = sum_j gates[t, j] * ys[rank[t, j]], one program per token (and
   column block): a deterministic sum, no atomics.

Backward (each step an autograd.Function):
    grouped mm:  dX = dY @ W[e] (the same kernel with W's strides swapped),
                 dW[e] = dY_e^T @ X_e (`_grouped_mm_dw_kernel`, one program per (expert, tile of W));
    combine:     dys[rank[t, j]] = gates[t, j] * dout[t],  dgates[t, j] = dout[t] . ys[rank[t, j]]
                 (`_combine_bwd_kernel`, one program per pair);
    gather:      dx[t] = sum_j dxs[rank[t, j]] (the combine kernel with unit gates; deterministic).

Departures: the gates stay in their dtype (fp32) and the weighted sum of the k expert outputs is
accumulated in fp32 and rounded once (the model casts the gates to x's dtype and rounds each
gate * y and each partial sum), so bf16 results differ from the loop's by rounding only.
fp32 inputs on the GPU use TF32 exactly when torch.backends.cuda.matmul.allow_tf32 does. Tile sizes
are fixed per device and dtype (no autotuning). dW gives one program per (expert, output tile): a
very skewed routing leaves most programs idle (correct, not fast). Runs on the GPU, and on the CPU
under TRITON_INTERPRET=1 (tests), where fp16/bf16 tiles are cast to fp32 before tl.dot (the
interpreter's bf16 dot is garbage). `moe_experts_reference` is the model's loop, for tests and
benchmarks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(X, SRC, XS, stride_x, stride_xs, n_cols, BLOCK_C: tl.constexpr):
    """Row i of the expert-sorted buffer: xs[i, cols] = x[src[i], cols] (a copy, no arithmetic)."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    src = tl.load(SRC + i).to(tl.int64)
    v = tl.load(X + src * stride_x + cols, mask=mask)
    tl.store(XS + i.to(tl.int64) * stride_xs + cols, v, mask=mask)


@triton.jit
def _combine_kernel(YS, RANK, GATES, OUT, stride_ys, stride_out, n_cols, k,
                    HAS_GATES: tl.constexpr, BLOCK_C: tl.constexpr):
    """Token t: out[t, cols] = sum_j gates[t, j] * ys[rank[t, j], cols] (gates = 1 without
    HAS_GATES: the backward of the gather), summed in fp32 in slot order, cast on store."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for j in range(0, k):
        r = tl.load(RANK + t * k + j).to(tl.int64)
        y = tl.load(YS + r * stride_ys + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATES:
            y = y * tl.load(GATES + t * k + j).to(tl.float32)
        acc += y
    tl.store(OUT + t.to(tl.int64) * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(DOUT, YS, RANK, GATES, DYS, DGATES, stride_dout, stride_ys, stride_dys, n_cols, k,
                        BLOCK_C: tl.constexpr):
    """Pair p = t * k + j, r = rank[p]: dys[r] = gates[p] * dout[t]; dgates[p] = dout[t] . ys[r] (fp32).
    Each sorted row belongs to exactly one pair: plain stores, deterministic."""
    p = tl.program_id(0)
    t = (p // k).to(tl.int64)
    r = tl.load(RANK + p).to(tl.int64)
    g = tl.load(GATES + p).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        do = tl.load(DOUT + t * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(YS + r * stride_ys + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DYS + r * stride_dys + cols, (g * do).to(DYS.dtype.element_ty), mask=mask)
        acc += do * y
    tl.store(DGATES + p, tl.sum(acc, axis=0))


@triton.jit
def _grouped_mm_kernel(A, B, C, TILE_EXPERT, TILE_ROW, OFFSETS, n_out, k_in,
                       stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Tile `pid(1)` of the tile map (rows TILE_ROW .. of expert e = TILE_EXPERT, up to the
    expert's end OFFSETS[e+1]) and output columns block pid(0):
        C[rows, cols] = A[rows, :] @ B[e, :, cols]       (fp32 accumulation, K-loop of BLOCK_K)
    B[e, kk, n] is addressed by strides, so W[e]^T (forward) and W[e] (dX) are the same kernel.
    The columns are the fast grid axis: programs running together share A's rows (ScatterMoE)."""
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    e = tl.load(TILE_EXPERT + tile)
    if e < 0:  # the unused tail of the fixed-size tile map
        return
    row0 = tl.load(TILE_ROW + tile)
    row_end = tl.load(OFFSETS + e + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < row_end
    col_mask = cols < n_out
    a_ptr = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptr = B + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_mask = (k0 + ks) < k_in
        a = tl.load(a_ptr, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if CAST_FP32:  # the CPU interpreter: its fp16/bf16 dot is unreliable
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    c_ptr = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_mm_dw_kernel(DY, X, DW, OFFSETS, n_out, k_in, stride_dym, stride_dyn, stride_xm, stride_xk,
                          stride_we, stride_wn, stride_wk,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          CAST_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Expert e = pid(2), tile (pid(0), pid(1)) of its weight gradient:
        dW[e, ns, ks] = sum over the expert's rows m of dY[m, ns]^T X[m, ks]
    walking rows OFFSETS[e] .. OFFSETS[e+1] in BLOCK_M steps (fp32 accumulation); an expert with
    no rows gets zeros."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(OFFSETS + e)
    end = tl.load(OFFSETS + e + 1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < n_out
    k_mask = ks < k_in
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end  # never the next expert's rows
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        x = tl.load(X + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        if CAST_FP32:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    w_ptr = DW + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(w_ptr, acc.to(DW.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# ---- host side ----------------------------------------------------------------------------------

class Routing(NamedTuple):
    """The expert-sorted layout of the N*k (token, slot) pairs (all int32, on idx's device)."""

    src: torch.Tensor  # (N*k,): the token of each expert-sorted row
    rank: torch.Tensor  # (N*k,): the sorted row of pair t*k + j
    offsets: torch.Tensor  # (E+1,): expert e owns sorted rows offsets[e]:offsets[e+1]; offsets[E] = N*k
    tile_expert: torch.Tensor  # (tiles,): the expert of each BLOCK_M-row tile, -1 past the last
    tile_row: torch.Tensor  # (tiles,): the first sorted row of each tile
    block_m: int
    n_tokens: int
    top_k: int

    @property
    def counts(self) -> torch.Tensor:
        """Rows (pairs) per expert, (E,)."""
        return self.offsets.diff()


def _block_m(rows: int, n_experts: int, is_cuda: bool) -> int:
    if not is_cuda:
        return 16
    return 128 if rows >= 256 * n_experts else 64


def moe_permutation(idx: torch.Tensor, n_experts: int, block_m: int | None = None) -> Routing:
    """Sort the pairs of idx (N, k) by expert (stable: by token, then slot, within an expert) and
    build the tile map of `block_m`-row tiles. No host sync (the ids are assumed in range)."""
    n, k = idx.shape
    rows = n * k
    dev = idx.device
    block_m = block_m or _block_m(rows, n_experts, idx.is_cuda)
    sorted_ids, order = torch.sort(idx.reshape(-1), stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(n_experts + 1, device=dev, dtype=sorted_ids.dtype))
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(rows, device=dev))
    counts = offsets.diff()
    tiles = (counts + block_m - 1) // block_m  # (E,)
    tile_end = tiles.cumsum(0)
    n_tiles = triton.cdiv(rows, block_m) + min(n_experts, rows)  # >= sum_e cdiv(count_e, block_m)
    t = torch.arange(n_tiles, device=dev)
    e = torch.searchsorted(tile_end, t, right=True)  # the expert whose tiles cover t, E past the end
    ec = e.clamp(max=n_experts - 1)
    row = offsets[ec] + (t - (tile_end - tiles)[ec]) * block_m
    i32 = torch.int32
    return Routing(src=(order // k).to(i32), rank=rank.to(i32), offsets=offsets.to(i32),
                   tile_expert=torch.where(e < n_experts, e, -1).to(i32), tile_row=row.to(i32),
                   block_m=block_m, n_tokens=n, top_k=k)


def _dot_flags(t: torch.Tensor) -> dict:
    if not t.is_cuda:
        return dict(CAST_FP32=True, PRECISION="ieee")
    tf32 = t.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return dict(CAST_FP32=False, PRECISION="tf32" if tf32 else "ieee")


def _mm_config(t: torch.Tensor, block_m: int) -> dict:
    if not t.is_cuda:
        return dict(BLOCK_N=64, BLOCK_K=64)
    half = t.dtype != torch.float32
    return dict(BLOCK_N=128, BLOCK_K=64 if half else 32, num_warps=8 if block_m >= 128 else 4, num_stages=3)


def _dw_config(t: torch.Tensor) -> dict:
    if not t.is_cuda:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    half = t.dtype != torch.float32
    return dict(BLOCK_M=64 if half else 32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)


def _block_c(n_cols: int) -> int:
    return min(1024, triton.next_power_of_2(max(n_cols, 1)))


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def permute_rows(x: torch.Tensor, r: Routing) -> torch.Tensor:
    """xs (N*k, C): x's rows in expert-sorted order."""
    x = _rowmajor(x)
    c = x.shape[1]
    xs = torch.empty((r.src.numel(), c), dtype=x.dtype, device=x.device)
    if xs.numel():
        bc = _block_c(c)
        _gather_rows_kernel[(xs.shape[0], triton.cdiv(c, bc))](x, r.src, xs, x.stride(0), xs.stride(0), c, BLOCK_C=bc)
    return xs


def combine_rows(ys: torch.Tensor, r: Routing, gates: torch.Tensor | None) -> torch.Tensor:
    """out (N, C) = sum over each token's k sorted rows, weighted by gates (N, k) (unit when None)."""
    ys = _rowmajor(ys)
    c = ys.shape[1]
    out = torch.empty((r.n_tokens, c), dtype=ys.dtype, device=ys.device)
    if out.numel():
        g = gates.contiguous() if gates is not None else r.rank  # unused pointer without gates
        bc = _block_c(c)
        _combine_kernel[(r.n_tokens, triton.cdiv(c, bc))](ys, r.rank, g, out, ys.stride(0), out.stride(0), c,
                                                          r.top_k, HAS_GATES=gates is not None, BLOCK_C=bc)
    return out


def combine_rows_backward(dout: torch.Tensor, ys: torch.Tensor, gates: torch.Tensor,
                          r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(dys (N*k, C) in ys's dtype, dgates (N, k) in gates' dtype) of combine_rows."""
    dout, ys = _rowmajor(dout), _rowmajor(ys)
    c = ys.shape[1]
    dys = torch.empty_like(ys)
    dgates = torch.empty(gates.shape, dtype=torch.float32, device=ys.device)
    if ys.shape[0]:
        _combine_bwd_kernel[(ys.shape[0],)](dout, ys, r.rank, gates.contiguous(), dys, dgates, dout.stride(0),
                                            ys.stride(0), dys.stride(0), c, r.top_k, BLOCK_C=_block_c(c))
    return dys, dgates.to(gates.dtype)


def grouped_mm(a: torch.Tensor, w: torch.Tensor, r: Routing, transpose: bool = True,
               block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ w[e]^T (w (E, Nout, K)), or @ w[e] (w (E, K, Nout)) when
    not `transpose`; a (N*k, K) in expert-sorted order, out (N*k, Nout) in a's dtype."""
    a = _rowmajor(a)
    if transpose:
        n_out, k_in, s_bk, s_bn = w.shape[1], w.shape[2], w.stride(2), w.stride(1)
    else:
        k_in, n_out, s_bk, s_bn = w.shape[1], w.shape[2], w.stride(1), w.stride(2)
    out = torch.empty((a.shape[0], n_out), dtype=a.dtype, device=a.device)
    cfg = _mm_config(a, r.block_m)
    cfg["BLOCK_N"] = block_n or cfg["BLOCK_N"]
    cfg["BLOCK_K"] = block_k or cfg["BLOCK_K"]
    if out.numel():
        grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), r.tile_expert.numel())
        _grouped_mm_kernel[grid](a, w, out, r.tile_expert, r.tile_row, r.offsets, n_out, k_in,
                                 a.stride(0), a.stride(1), w.stride(0), s_bk, s_bn, out.stride(0), out.stride(1),
                                 BLOCK_M=r.block_m, **cfg, **_dot_flags(a))
    return out


def grouped_mm_weight_grad(dy: torch.Tensor, a: torch.Tensor, r: Routing, n_experts: int,
                           block_m: int | None = None, block_n: int | None = None,
                           block_k: int | None = None) -> torch.Tensor:
    """dW (E, Nout, K) in a's dtype: dW[e] = dy[rows of e]^T @ a[rows of e] (zeros for an idle expert)."""
    dy, a = _rowmajor(dy), _rowmajor(a)
    n_out, k_in = dy.shape[1], a.shape[1]
    dw = torch.empty((n_experts, n_out, k_in), dtype=a.dtype, device=a.device)
    cfg = _dw_config(a)
    cfg["BLOCK_M"] = block_m or cfg["BLOCK_M"]
    cfg["BLOCK_N"] = block_n or cfg["BLOCK_N"]
    cfg["BLOCK_K"] = block_k or cfg["BLOCK_K"]
    if dw.numel():
        grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(k_in, cfg["BLOCK_K"]), n_experts)
        _grouped_mm_dw_kernel[grid](dy, a, dw, r.offsets, n_out, k_in, dy.stride(0), dy.stride(1),
                                    a.stride(0), a.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
                                    **cfg, **_dot_flags(a))
    return dw


class PermuteFunction(torch.autograd.Function):
    """xs = x[src] (N*k, C); backward: dx[t] = sum of its k rows of dxs. PermuteFunction.apply(x, routing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: Routing) -> torch.Tensor:
        ctx.routing = r
        return permute_rows(x, r)

    @staticmethod
    def backward(ctx, dxs: torch.Tensor):
        return combine_rows(dxs, ctx.routing, None), None


class GroupedMatmulFunction(torch.autograd.Function):
    """ys[rows of e] = xs[rows of e] @ w[e]^T, w (E, Nout, K): GroupedMatmulFunction.apply(xs, w, routing)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, w: torch.Tensor, r: Routing) -> torch.Tensor:
        ctx.save_for_backward(xs, w)
        ctx.routing = r
        return grouped_mm(xs, w, r)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xs, w = ctx.saved_tensors
        r = ctx.routing
        dx = grouped_mm(dy, w, r, transpose=False) if ctx.needs_input_grad[0] else None
        dw = grouped_mm_weight_grad(dy, xs, r, w.shape[0]).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class UnpermuteFunction(torch.autograd.Function):
    """out[t] = sum_j gates[t, j] * ys[rank[t, j]] (N, C): UnpermuteFunction.apply(ys, gates, routing)."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, gates: torch.Tensor, r: Routing) -> torch.Tensor:
        ctx.save_for_backward(ys, gates)
        ctx.routing = r
        return combine_rows(ys, r, gates)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        ys, gates = ctx.saved_tensors
        dys, dgates = combine_rows_backward(dout, ys, gates, ctx.routing)
        return dys, dgates, None


def _check(x, idx, gates, w_gate, w_up, w_down, check_ids: bool) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating (N, C) tensor, got {tuple(x.shape)} {x.dtype}")
    n, c = x.shape
    if idx.dim() != 2 or idx.shape[0] != n or idx.shape[1] < 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"idx: expected integer expert ids (N={n}, k>=1), got {tuple(idx.shape)} {idx.dtype}")
    if gates.shape != idx.shape or not gates.is_floating_point():
        raise ValueError(f"gates: expected a floating {tuple(idx.shape)} tensor like idx, got {tuple(gates.shape)} "
                         f"{gates.dtype}")
    if w_gate.dim() != 3 or w_gate.shape[2] != c or w_gate.shape[0] < 1:
        raise ValueError(f"w_gate: expected (E, H, C={c}), got {tuple(w_gate.shape)}")
    e, h, _ = w_gate.shape
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up: expected {tuple(w_gate.shape)} like w_gate, got {tuple(w_up.shape)}")
    if w_down.shape != (e, c, h):
        raise ValueError(f"w_down: expected (E={e}, C={c}, H={h}), got {tuple(w_down.shape)}")
    for name, t in (("idx", idx), ("gates", gates), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, x on {x.device}")
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    if check_ids and idx.numel() and bool(((idx < 0) | (idx >= e)).any()):  # one host sync
        raise ValueError(f"idx: expert ids must lie in 0..{e - 1}, got {int(idx.min())}..{int(idx.max())}")


def moe_experts(x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
    """The routed experts of the model's MoE, (N, C) in x's dtype, differentiable w.r.t. x, gates
    and the three weight stacks. x (N, C); idx (N, k) integer ids in 0..E-1; gates (N, k) floating;
    w_gate, w_up (E, H, C) and w_down (E, C, H), x's dtype. `check_ids=False` skips the range
    check of idx (its host sync); out-of-range ids are then undefined behaviour."""
    _check(x, idx, gates, w_gate, w_up, w_down, check_ids)
    r = moe_permutation(idx, w_gate.shape[0])
    xs = PermuteFunction.apply(x, r)  # (N*k, C)
    g = GroupedMatmulFunction.apply(xs, w_gate, r)  # (N*k, H)
    u = GroupedMatmulFunction.apply(xs, w_up, r)
    ys = GroupedMatmulFunction.apply(F.silu(g) * u, w_down, r)  # (N*k, C)
    return UnpermuteFunction.apply(ys, gates, r)


def moe_experts_reference(x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, w_gate: torch.Tensor,
                          w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """components/model/model.py's MoE loop over experts (without the shared expert), plain PyTorch."""
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x.index_select(0, tok)
        y = F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e])
        out = out.index_add(0, tok, y * gates[tok, slot, None].type_as(x))
    return out
