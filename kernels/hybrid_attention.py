"""Hybrid sparse attention (sliding window + selected key blocks), forward and backward, in Triton.

The attention of components/model/model.py's CausalSelfAttention with attention="hybrid", for a
whole sequence (q_start = 0, no KV cache). For q, k, v (B, H, T, D), query i attends to
    (a) keys i-window+1 .. i                                    (the sliding window), and
    (b) every key of its `top_k` best earlier key blocks         (the selection),
where block b holds keys b*block .. (b+1)*block-1, is eligible for query i only when
(b+1)*block <= i-window+1, and scores q_i . mean(k of block b) (the compressed key of DeepSeek
Native Sparse Attention, arXiv 2502.11089). Softmax scale 1/sqrt(D). The selection is made per
(batch, head, query) and gets no gradient. The result equals
SDPA(q, k, v, attn_mask=hybrid_mask(q, k, window, block, top_k)), without any (T, T) mask.

Three steps; nothing (T, T) or (T, n_blocks) is ever held (extra memory O(T * top_k) per head):
1. `select_blocks` (PyTorch, chunked over queries, so at most ~16M scores live at once): mean-pooled
   keys, scores, top-k block ids per query (B, H, T, k), -1 where fewer than k blocks are eligible.
   The same torch ops as hybrid_mask, so the choice is the reference's (ties aside).
2. `selected_key_tiles` (PyTorch): per (b, h, query tile of BLOCK_M queries) the sorted unique
   key tiles (BLOCK_N aligned keys) that hold a block chosen by any query of the tile and lie
   before the tile's window range: the union of its queries' selections, padded, with a count.
3. Flash-attention kernels, structured as the Triton fused-attention tutorial
   (python/tutorials/06-fused-attention.py) and FlashAttention-2 (Dao, arXiv 2307.08691):
   - forward, one program per (query tile, b*h): online softmax in base 2 over the selected key
     tiles (mask: the query chose the key's block), then the window's key tiles (mask: in the
     window OR chosen; tiles wholly inside every query's window skip the mask; when block is a
     multiple of BLOCK_N the choice is tested per query, not per key); saves the log-sum-exp per
     query (base 2, of the scaled scores). Work O(T * (window + BLOCK_M + |union| * BLOCK_N));
   - dq, one program per (query tile, b*h), the same tiles: p = exp2(s - lse),
     ds = p * (dO v^T - delta) with delta = rowsum(dO * O), dq = scale * ds k;
   - dk, dv, one program per (key tile, b*h): the window's queries are one contiguous range of
     query tiles; the query tiles that selected the key tile come from an inverse (CSR) list built
     in torch from step 2's lists: dv = p^T dO, dk = scale * ds^T q.

Departures and choices. The inverse lists instead of tl.atomic_add into fp32 dk/dv buffers:
deterministic gradients, no fp32 buffers and cast, and no atomic contention on popular blocks
(block 0 is chosen by almost every query tile). dq is its own kernel (the tutorial computes it in
the same launch): it recomputes p and dp once more (7 dots per tile pair instead of 5) but needs no
atomics either. A query tile visits the UNION of its queries' blocks: when neighbouring queries
choose alike (as in trained models) that is ~top_k blocks, and the work is O(T * (window + top_k *
block)); with i.i.d. random queries it approaches all earlier blocks at long T, and the work tends
to dense causal attention's (bench_attention.py prints both cases). Block scores cost
O(T * n_blocks * D) flops, as in hybrid_mask.

dtypes: fp16 and bf16 (tl.dot on the 16-bit tiles, fp32 accumulation), fp32 (IEEE dots). Head dims
16, 32, 64, 128. On the CPU (TRITON_INTERPRET=1, tests) every tile is cast to fp32 first: the
interpreter cannot multiply bf16. `hybrid_attention` is the entry point; the tests compare it with
SDPA and components.model.model.hybrid_mask (not imported here: kernels/ imports only torch, triton).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
MAX_SCORES = 1 << 24  # select_blocks: scores held at once (fp32), 64 MiB


@triton.jit
def _allowed(Idx, offs_m, m_ok, offs_k, T, window, block, TOPK: tl.constexpr, WINDOW: tl.constexpr,
             WHOLE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: query offs_m[i] chose the block of key offs_k[j] (Idx: this head's
    (T, TOPK) block ids, -1 for none), or (WINDOW) 0 <= offs_m[i] - offs_k[j] < window. WHOLE: the
    key tile lies in one block (block % BLOCK_N == 0), so the choice is one compare per query."""
    if WHOLE:
        kblk = tl.min(offs_k, 0) // block
        rows = offs_m < 0  # all False, (BLOCK_M,)
        for t in tl.static_range(TOPK):
            rows = rows | (tl.load(Idx + offs_m * TOPK + t, mask=m_ok, other=-1) == kblk)
        ok = rows[:, None] & (offs_k >= 0)[None, :]
    else:
        kblk = offs_k // block
        ok = (offs_m[:, None] < 0) & (kblk[None, :] < 0)  # all False, (BLOCK_M, BLOCK_N)
        for t in tl.static_range(TOPK):
            b = tl.load(Idx + offs_m * TOPK + t, mask=m_ok, other=-1)
            ok = ok | (b[:, None] == kblk[None, :])
    if WINDOW:
        diff = offs_m[:, None] - offs_k[None, :]
        ok = ok | ((diff >= 0) & (diff < window))
    return ok & m_ok[:, None] & (offs_k < T)[None, :]


@triton.jit
def _window_tiles(m0, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [lo, hi) hold the windows of queries m0 .. m0+BLOCK_M-1; those in [a, b) lie wholly
    inside every one of these windows (kt*BLOCK_N >= m0+BLOCK_M-window and (kt+1)*BLOCK_N-1 <= m0)."""
    lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N
    hi = (tl.minimum(m0 + BLOCK_M, T) - 1) // BLOCK_N + 1
    a = tl.minimum(tl.maximum((tl.maximum(m0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N, lo), hi)
    b = tl.maximum(tl.minimum((m0 + 1) // BLOCK_N, hi), a)
    return lo, a, b, hi


@triton.jit
def _load_tile(P, offs, stride, n, HEAD_DIM: tl.constexpr, FP32: tl.constexpr):
    """Rows offs (< n) of a (n, HEAD_DIM) matrix with row stride `stride`; zeros past n."""
    x = tl.load(P + offs[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :], mask=(offs < n)[:, None], other=0.0)
    if FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block, qk_scale,
              MODE: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              FP32: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr):
    """One online-softmax step over key tile kt. MODE 0: no mask, 1: window or chosen, 2: chosen."""
    offs_k = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(K, offs_k, s_kt, T, HEAD_DIM, FP32)
    v = _load_tile(V, offs_k, s_vt, T, HEAD_DIM, FP32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MODE != 0:
        s = tl.where(_allowed(Idx, offs_m, m_ok, offs_k, T, window, block, TOPK, MODE == 1, WHOLE), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _hybrid_fwd_kernel(Q, K, V, O, LSE, IDX, TILES, NTILES,
                       s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                       H, T, n_qtiles, n_list, window, block, qk_scale,
                       TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEAD_DIM: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr):
    """Query tile (n_qtiles-1-program 0) of head program 1: o = softmax(q k^T * scale, masked) v over
    the chosen key tiles TILES[row, :NTILES[row]], then the window's tiles; LSE = m + log2(l)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the late, busiest tiles start first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    Idx = IDX + bh.to(tl.int64) * T * TOPK
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    q = _load_tile(Q, offs_m, s_qt, T, HEAD_DIM, FP32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = bh * n_qtiles + pid_m
    for t in range(0, tl.load(NTILES + row)):
        kt = tl.load(TILES + row * n_list + t)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block,
                                  qk_scale, 2, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    lo, a, b2, hi = _window_tiles(m0, T, window, BLOCK_M, BLOCK_N)
    for kt in range(lo, a):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block,
                                  qk_scale, 1, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    for kt in range(a, b2):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block,
                                  qk_scale, 0, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    for kt in range(b2, hi):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block,
                                  qk_scale, 1, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past T only: every query sees itself
    o = acc / l_safe[:, None]
    O += bh.to(tl.int64) * T * HEAD_DIM
    tl.store(O + offs_m[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block, qk_scale,
             MODE: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             FP32: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr):
    """dq += ds k over key tile kt, ds = p * (dO v^T - delta), p = exp2(s - lse) (masked as _fwd_tile)."""
    offs_k = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(K, offs_k, s_kt, T, HEAD_DIM, FP32)
    v = _load_tile(V, offs_k, s_vt, T, HEAD_DIM, FP32)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
    if MODE != 0:
        p = tl.where(_allowed(Idx, offs_m, m_ok, offs_k, T, window, block, TOPK, MODE == 1, WHOLE), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _hybrid_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, TILES, NTILES,
                      s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                      H, T, n_qtiles, n_list, window, block, qk_scale, sm_scale,
                      TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr):
    """dq of one query tile: the forward's key tiles, recomputing p from the saved lse."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    Idx = IDX + bh.to(tl.int64) * T * TOPK
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    q = _load_tile(Q + b * s_qb + h * s_qh, offs_m, s_qt, T, HEAD_DIM, FP32)
    do = _load_tile(DO + b * s_ob + h * s_oh, offs_m, s_ot, T, HEAD_DIM, FP32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = bh * n_qtiles + pid_m
    for t in range(0, tl.load(NTILES + row)):
        kt = tl.load(TILES + row * n_list + t)
        dq = _dq_tile(dq, q, do, lse, delta, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block, qk_scale,
                      2, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    lo, a, b2, hi = _window_tiles(m0, T, window, BLOCK_M, BLOCK_N)
    for kt in range(lo, a):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block, qk_scale,
                      1, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    for kt in range(a, b2):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block, qk_scale,
                      0, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    for kt in range(b2, hi):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, s_kt, s_vt, Idx, offs_m, m_ok, kt, T, window, block, qk_scale,
                      1, TOPK, BLOCK_N, HEAD_DIM, FP32, PREC, WHOLE)
    DQ += bh.to(tl.int64) * T * HEAD_DIM
    tl.store(DQ + offs_m[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None])


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, s_qt, s_ot, LSE, DELTA, Idx, qt, offs_k, T, window, block, qk_scale,
               MODE: tl.constexpr, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
               FP32: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr):
    """dv += p^T dO and dk += ds^T q over query tile qt (unscaled; masked as _fwd_tile)."""
    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    q = _load_tile(Q, offs_m, s_qt, T, HEAD_DIM, FP32)
    do = _load_tile(DO, offs_m, s_ot, T, HEAD_DIM, FP32)
    lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))  # p = 0 on rows past T
    delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
    if MODE != 0:
        p = tl.where(_allowed(Idx, offs_m, m_ok, offs_k, T, window, block, TOPK, MODE == 1, WHOLE), p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _hybrid_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, IDX, QOFF, QLIST,
                        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                        H, T, n_qtiles, n_ktiles, window, block, qk_scale, sm_scale,
                        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD_DIM: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr, WHOLE: tl.constexpr):
    """dk, dv of key tile (program 0) of head (program 1): the query tiles whose windows reach it
    (contiguous; the middle ones unmasked, the same tile pairs as the forward's [a, b)), then the
    query tiles that chose it, QLIST[QOFF[row] : QOFF[row+1]]."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * s_qb + h * s_qh
    DO += b * s_ob + h * s_oh
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T
    Idx = IDX + bh.to(tl.int64) * T * TOPK
    n0 = pid_n * BLOCK_N
    offs_k = n0 + tl.arange(0, BLOCK_N)
    k = _load_tile(K + b * s_kb + h * s_kh, offs_k, s_kt, T, HEAD_DIM, FP32)
    v = _load_tile(V + b * s_vb + h * s_vh, offs_k, s_vt, T, HEAD_DIM, FP32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = n0 // BLOCK_M
    hi = tl.minimum((n0 + BLOCK_N + window - 2) // BLOCK_M + 1, n_qtiles)
    a = tl.minimum(tl.maximum((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M, lo), hi)
    b2 = tl.maximum(tl.minimum((window + n0) // BLOCK_M, hi), a)
    for qt in range(lo, a):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, s_qt, s_ot, LSE, DELTA, Idx, qt, offs_k, T, window, block,
                            qk_scale, 1, TOPK, BLOCK_M, HEAD_DIM, FP32, PREC, WHOLE)
    for qt in range(a, b2):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, s_qt, s_ot, LSE, DELTA, Idx, qt, offs_k, T, window, block,
                            qk_scale, 0, TOPK, BLOCK_M, HEAD_DIM, FP32, PREC, WHOLE)
    for qt in range(b2, hi):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, s_qt, s_ot, LSE, DELTA, Idx, qt, offs_k, T, window, block,
                            qk_scale, 1, TOPK, BLOCK_M, HEAD_DIM, FP32, PREC, WHOLE)
    row = bh * n_ktiles + pid_n
    for t in range(tl.load(QOFF + row), tl.load(QOFF + row + 1)):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, s_qt, s_ot, LSE, DELTA, Idx, tl.load(QLIST + t), offs_k, T,
                            window, block, qk_scale, 2, TOPK, BLOCK_M, HEAD_DIM, FP32, PREC, WHOLE)
    out = bh.to(tl.int64) * T * HEAD_DIM + offs_k[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    k_ok = (offs_k < T)[:, None]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_ok)


# ---------------------------------------------------------------- host side


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int, top_k: int) -> None:
    """ValueError naming the offending value, for anything the kernels do not handle."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported (one of {HEAD_DIMS})")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    if top_k < 0:
        raise ValueError(f"top_k must not be negative, got {top_k}")


def tile_config(head_dim: int, device: torch.device, tiles: tuple[int, int] | None = None) -> dict:
    """BLOCK_M (queries), BLOCK_N (keys) and launch options. GPU: 64 x 64 (not autotuned: the
    tile lists depend on them); CPU (interpreter): 32 x 32, small tiles to exercise ragged edges."""
    bm, bn = tiles or ((64, 64) if device.type == "cuda" else (32, 32))
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if head_dim <= 64 else 8)


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, window: int, block: int, top_k: int) -> torch.Tensor:
    """Chosen key blocks, (B, H, T, min(top_k, T // block)) int32, best first, -1 in the slots a
    query has no eligible block for. hybrid_mask's torch ops (mean-pooled keys, q . kc in q's dtype,
    top-k of the eligible scores), chunked over queries so at most MAX_SCORES scores live at once."""
    B, H, T, D = q.shape
    nb = T // block
    kk = min(top_k, nb)
    sel = torch.full((B, H, T, kk), -1, dtype=torch.int32, device=q.device)
    first = block + window - 1  # the first query with an eligible block (block 0)
    if kk == 0 or first >= T:
        return sel
    kc = k[:, :, : nb * block].reshape(B, H, nb, block, D).mean(dim=3).transpose(-2, -1)  # (B, H, D, nb)
    block_end = (torch.arange(nb, device=q.device) + 1) * block
    chunk = max(1, MAX_SCORES // (B * H * nb))
    for s in range(first, T, chunk):
        e = min(T, s + chunk)
        scores = (q[:, :, s:e] @ kc).float()  # (B, H, e-s, nb)
        eligible = block_end[None, :] <= torch.arange(s - window + 1, e - window + 1, device=q.device)[:, None]
        val, idx = scores.masked_fill_(~eligible, float("-inf")).topk(kk, dim=-1)
        sel[:, :, s:e] = torch.where(val == float("-inf"), -1, idx).to(torch.int32)
    return sel


def _span(block: int, bn: int) -> int:
    """Most key tiles (bn keys, aligned) that one key block (block keys, aligned) can touch."""
    if bn % block == 0:
        return 1
    return block // bn if block % bn == 0 else (block - 1) // bn + 2


@torch.no_grad()
def selected_key_tiles(sel: torch.Tensor, window: int, block: int, block_m: int, block_n: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b*h, query tile) row: the sorted unique key tiles holding a block chosen by a query of
    the tile and lying before the tile's window range (those are the window loop's). Returns
    (tiles (B*H*n_qtiles, L) int32, padded past the count with n_ktiles; counts (B*H*n_qtiles,) int32)."""
    B, H, T, kk = sel.shape
    nq, nk = triton.cdiv(T, block_m), triton.cdiv(T, block_n)
    if kk == 0 or T == 0:
        return torch.zeros((B * H * nq, 1), dtype=torch.int32, device=sel.device), \
            torch.zeros(B * H * nq, dtype=torch.int32, device=sel.device)
    s = torch.full((B * H, nq * block_m, kk), -1, dtype=torch.int64, device=sel.device)
    s[:, :T] = sel.reshape(B * H, T, kk)
    s = s.view(B * H, nq, block_m * kk, 1)
    cand = s * block // block_n + torch.arange(_span(block, block_n), device=sel.device)  # (BH, nq, m*kk, span)
    m0 = torch.arange(nq, device=sel.device) * block_m
    lo = (m0 - window + 1).clamp_min(0) // block_n  # (nq,) the window loop's first tile
    ok = (s >= 0) & (cand <= ((s + 1) * block - 1) // block_n) & (cand < lo[:, None, None])
    cand = torch.where(ok, cand, nk).to(torch.int32).view(B * H, nq, -1).sort(dim=-1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[..., 1:] = cand[..., 1:] == cand[..., :-1]
    cand = cand.masked_fill_(dup, nk).sort(dim=-1).values
    counts = (cand < nk).sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max()))
    return cand[..., :width].reshape(B * H * nq, width).contiguous(), counts.view(-1)


@torch.no_grad()
def _query_tiles_per_key_tile(tiles: torch.Tensor, counts: torch.Tensor, bh: int, nq: int, nk: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of selected_key_tiles, as CSR: the query tiles that chose key tile kt of head r
    are qlist[qoff[r*nk + kt] : qoff[r*nk + kt + 1]], in increasing order."""
    width = tiles.shape[1]
    valid = torch.arange(width, device=tiles.device)[None, :] < counts[:, None].long()
    rows = torch.arange(bh * nq, device=tiles.device)[:, None].expand(-1, width)
    key = ((rows // nq) * nk + tiles.long())[valid]
    order = torch.argsort(key, stable=True)
    qlist = (rows % nq)[valid][order].to(torch.int32)
    qoff = torch.zeros(bh * nk + 1, dtype=torch.int32, device=tiles.device)
    qoff[1:] = torch.cumsum(torch.bincount(key, minlength=bh * nk), 0)
    return qoff, qlist if qlist.numel() else torch.zeros(1, dtype=torch.int32, device=tiles.device)


@dataclass
class Plan:
    """What the forward decided and the backward reuses: chosen blocks and key tiles, tile sizes."""
    sel: torch.Tensor  # (B, H, T, k) int32
    tiles: torch.Tensor  # (B*H*n_qtiles, L) int32
    counts: torch.Tensor  # (B*H*n_qtiles,) int32
    window: int
    block: int
    cfg: dict


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()[:3]]


def _common(q: torch.Tensor, plan: Plan) -> tuple[dict, dict]:
    B, H, T, D = q.shape
    cfg = dict(plan.cfg)
    warps = cfg.pop("num_warps")
    kw = dict(TOPK=plan.sel.shape[-1], HEAD_DIM=D, FP32=not q.is_cuda,
              PREC="ieee" if q.dtype == torch.float32 else "tf32", WHOLE=plan.block % cfg["BLOCK_N"] == 0,
              num_warps=warps, **cfg)
    return kw, dict(H=H, T=T, n_qtiles=triton.cdiv(T, cfg["BLOCK_M"]), window=plan.window, block=plan.block,
                    qk_scale=LOG2E / math.sqrt(D))


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _sel_arg(sel: torch.Tensor) -> torch.Tensor:
    return sel if sel.numel() else torch.full((1,), -1, dtype=torch.int32, device=sel.device)


def hybrid_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int,
                             top_k: int, tiles: tuple[int, int] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """(o (B, H, T, D) in q's dtype, lse (B, H, T) fp32 in base 2 of the log2e-scaled scores, plan).
    `tiles` = (BLOCK_M, BLOCK_N) overrides tile_config (powers of two >= 16)."""
    check_inputs(q, k, v, window, block, top_k)
    q, k, v = (_last_dim_dense(t) for t in (q, k, v))
    B, H, T, D = q.shape
    window, block = min(window, max(T, 1)), min(block, max(T, 1) + 1)  # the same mask; int32-safe
    cfg = tile_config(D, q.device, tiles)
    sel = select_blocks(q, k, window, block, top_k)
    ktiles, counts = selected_key_tiles(sel, window, block, cfg["BLOCK_M"], cfg["BLOCK_N"])
    plan = Plan(sel, ktiles, counts, window, block, cfg)
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if B * H * T:
        kw, args = _common(q, plan)
        _hybrid_fwd_kernel[(args["n_qtiles"], B * H)](
            q, k, v, o, lse, _sel_arg(sel), ktiles, counts, *_strides(q, k, v), args["H"], T, args["n_qtiles"],
            ktiles.shape[1], window, block, args["qk_scale"], num_stages=3 if q.is_cuda else 1, **kw)
    return o, lse, plan


def hybrid_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              o: torch.Tensor, lse: torch.Tensor, plan: Plan
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous (B, H, T, D) in q's dtype, for the upstream gradient do."""
    q, k, v, do = (_last_dim_dense(t) for t in (q, k, v, do))
    B, H, T, D = q.shape
    dq, dk, dv = (torch.empty((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    if B * H * T == 0:
        return dq, dk, dv
    delta = (do.float() * o.float()).sum(-1)  # (B, H, T) contiguous, fp32
    kw, args = _common(q, plan)
    nq, nk = args["n_qtiles"], triton.cdiv(T, plan.cfg["BLOCK_N"])
    sel, stages = _sel_arg(plan.sel), 2 if q.is_cuda else 1
    scales = (args["qk_scale"], 1.0 / math.sqrt(D))
    _hybrid_dq_kernel[(nq, B * H)](
        q, k, v, do, dq, lse, delta, sel, plan.tiles, plan.counts, *_strides(q, k, v, do), H, T, nq,
        plan.tiles.shape[1], plan.window, plan.block, *scales, num_stages=stages, **kw)
    qoff, qlist = _query_tiles_per_key_tile(plan.tiles, plan.counts, B * H, nq, nk)
    _hybrid_dkdv_kernel[(nk, B * H)](
        q, k, v, do, dk, dv, lse, delta, sel, qoff, qlist, *_strides(q, k, v, do), H, T, nq, nk,
        plan.window, plan.block, *scales, num_stages=1, **kw)  # 2 stages spill (255 registers) on sm_90
    return dq, dk, dv


class HybridAttentionFunction(torch.autograd.Function):
    """HybridAttentionFunction.apply(q, k, v, window, block, top_k) -> (B, H, T, D); gradients for
    q, k, v (the block choice is a constant, as under hybrid_mask's torch.no_grad)."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, block: int, top_k: int):
        o, lse, plan = hybrid_attention_forward(q, k, v, window, block, top_k)
        ctx.save_for_backward(q, k, v, o, lse, plan.sel, plan.tiles, plan.counts)
        ctx.plan = (plan.window, plan.block, plan.cfg)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, sel, tiles, counts = ctx.saved_tensors
        dq, dk, dv = hybrid_attention_backward(do, q, k, v, o, lse, Plan(sel, tiles, counts, *ctx.plan))
        return dq, dk, dv, None, None, None


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int,
                     top_k: int) -> torch.Tensor:
    """The hybrid attention of q, k, v (B, H, T, D) with gradients: see the module docstring."""
    return HybridAttentionFunction.apply(q, k, v, window, block, top_k)
