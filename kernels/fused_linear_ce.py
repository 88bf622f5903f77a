"""Fused linear + cross-entropy (and its distillation KL), blockwise over tokens and vocabulary, in Triton.

What components/model/model.py computes, for hidden states h (N, C), the tied head W (V, C),
targets t (N,) and per-token weights u (N,):

    z = h @ W^T,   ce_i = lse(z_i) - z_i[t_i],   w_i = (t_i != ignore) * u_i,
    loss = sum_i w_i ce_i / max(sum_i w_i, 1e-12)

and the KL of components/compress/distill.py `distill_kl`, with zs = h_s @ W_s^T, zt = h_t @ W_t^T
and temperature T: kl_i = KL(softmax(zt_i/T) || softmax(zs_i/T)), averaged with the same weights.
The (N, V) logits never exist: as in Apple's Cut Cross-Entropy (Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models", arXiv 2411.09009), each program computes a
(BLOCK_N, BLOCK_V) tile of logits in registers with tl.dot over C and folds it into per-row
statistics; nothing but O(N) statistics goes to memory.

Forward, per row (online log-sum-exp, one pass over the vocabulary):
    CE: m, s = running max and sum of exp(z - m); the target logit is picked out of the tile that
        holds column t_i. ce_i = m + log(s) - z_i[t_i].
    KL: the same for zs/T and zt/T, plus a = sum_v exp(zt/T - m_t) (zt - zs)/T, so that
        kl_i = a/s_t - lse_t + lse_s   (= E_{p_t}[(zt - zs)/T] - lse(zt/T) + lse(zs/T)).
    The vocabulary is split over `splits` programs per row block (split-K as in flash-decoding);
    each writes its (m, s, ...) partials, O(splits * N), and torch merges them.
Backward (CCE's choice: gradients are computed in backward, from the saved O(N) lse), per tile,
recomputing the logits, with g_i = dloss * w_i / max(sum w, 1e-12):
    CE: dz = g_i (softmax(z_i) - onehot(t_i)),   KL: dz = g_i (softmax(zs_i/T) - softmax(zt_i/T)) / T
    dh += dz @ W,  dW += dz^T @ h   (fp32 atomic adds, tile by tile over C; dz is cast to the
    inputs' dtype before the two tl.dot, as CCE does and as torch's bf16 matmul backward does).
Why in backward and not in forward as Liger-Kernel does: with the vocabulary blocked, a row's lse is
only known after all its vocabulary blocks, so computing the gradient needs a second pass over the
logits anyway; doing that pass in backward costs nothing more, keeps a no-grad evaluation at the
forward's cost and stores no gradient between the two passes.

Sources and departures. Liger-Kernel's `ops/fused_linear_cross_entropy.py` chunks over tokens only
(it materialises (chunk, V) logits per token chunk with cuBLAS and computes the gradients in the
forward); here the tiles are over tokens AND vocabulary, as CCE. From CCE we depart by (a) no
gradient filtering (CCE skips tiles whose softmax is below the dtype's precision: an approximation;
we only skip row blocks whose gradient weight g is exactly 0, e.g. ignored or zero-weight tokens),
(b) no vocabulary sorting, (c) the vocabulary split of the forward (CCE uses one program per tile
and merges the lse with a lock), (d) the backward runs over vocabulary chunks of BWD_VOCAB_CHUNK rows
so that the fp32 accumulator of dW is a chunk, not (V, C), and (e) logits stay fp32 (the model
rounds them to its dtype before .float(); the difference is within the dtype's precision). Not
deterministic on a GPU (atomic adds). The KL variant (teacher frozen: no gradient to h_t, W_t) is ours.

Memory beyond inputs and outputs: O(splits * N) in the forward; in the backward an fp32 dh (N, C)
and an fp32 dW chunk (BWD_VOCAB_CHUNK, C) when the inputs are 16-bit (fp32 inputs accumulate in
place). Runs on the GPU, and on the CPU under TRITON_INTERPRET=1 (tests), where the tiles are cast
to fp32 before tl.dot (the interpreter cannot multiply bf16).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BWD_VOCAB_CHUNK = 16384  # vocabulary rows per backward launch (the fp32 dW scratch of 16-bit inputs)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _logits_tile(H, W, rows, cols, n_rows, n_cols, n_k, stride_h, stride_w, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr):
    """z[r, v] = sum_k H[r, k] W[v, k] for the rows x cols tile, accumulated in fp32 (0 outside)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, n_k, BLOCK_K):
        kk = k0 + ks
        h = tl.load(H + rows[:, None] * stride_h + kk[None, :], mask=(rows[:, None] < n_rows) & (kk[None, :] < n_k),
                    other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + kk[None, :], mask=(cols[:, None] < n_cols) & (kk[None, :] < n_k),
                    other=0.0)
        if FP32_DOT:  # the CPU interpreter: no 16-bit arithmetic
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _ce_fwd_kernel(H, W, TGT, PART, n_rows, n_cols, n_k, stride_h, stride_w, blocks_per_split,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
                   PREC: tl.constexpr):
    """Rows of block program_id(0), vocabulary blocks of split program_id(1): online
    m = max z, s = sum exp(z - m), and z[t] (0 when t is not in the split) -> PART[0..2, split, row]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < n_rows
    tgt = tl.load(TGT + rows, mask=rmask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n_cols, BLOCK_V))
    for vb in range(first, last):
        cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _logits_tile(H, W, rows, cols, n_rows, n_cols, n_k, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K,
                         FP32_DOT, PREC)
        z = tl.where(cols[None, :] < n_cols, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = PART + split * n_rows + rows
    stride_part = tl.num_programs(1) * n_rows
    tl.store(out, m, mask=rmask)
    tl.store(out + stride_part, s, mask=rmask)
    tl.store(out + 2 * stride_part, zt, mask=rmask)


@triton.jit
def _kl_fwd_kernel(HS, WS, HT, WT, PART, n_rows, n_cols, n_ks, n_kt, stride_hs, stride_ws, stride_ht, stride_wt,
                   inv_temp, blocks_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   FP32_DOT: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr):
    """As _ce_fwd_kernel for zs/T and zt/T: (m_s, s_s, m_t, s_t, a) -> PART[0..4, split, row], with
    a = sum exp(zt/T - m_t) (zt - zs)/T (the teacher-weighted log-ratio, unnormalised)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < n_rows
    m_s = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(n_cols, BLOCK_V))
    for vb in range(first, last):
        cols = (vb * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        cmask = cols[None, :] < n_cols
        zs = _logits_tile(HS, WS, rows, cols, n_rows, n_cols, n_ks, stride_hs, stride_ws, BLOCK_N, BLOCK_V,
                          BLOCK_K, FP32_DOT, PREC_S) * inv_temp
        zt = _logits_tile(HT, WT, rows, cols, n_rows, n_cols, n_kt, stride_ht, stride_wt, BLOCK_N, BLOCK_V,
                          BLOCK_K, FP32_DOT, PREC_T) * inv_temp
        zs_m = tl.where(cmask, zs, float("-inf"))
        zt_m = tl.where(cmask, zt, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(zs_m, axis=1))
        s_s = s_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(zs_m - ms_new[:, None]), axis=1)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(zt_m, axis=1))
        scale = tl.exp(m_t - mt_new)
        e_t = tl.exp(zt_m - mt_new[:, None])  # 0 outside the vocabulary
        s_t = s_t * scale + tl.sum(e_t, axis=1)
        a = a * scale + tl.sum(e_t * (zt - zs), axis=1)
        m_t = mt_new
    out = PART + split * n_rows + rows
    stride_part = tl.num_programs(1) * n_rows
    tl.store(out, m_s, mask=rmask)
    tl.store(out + stride_part, s_s, mask=rmask)
    tl.store(out + 2 * stride_part, m_t, mask=rmask)
    tl.store(out + 3 * stride_part, s_t, mask=rmask)
    tl.store(out + 4 * stride_part, a, mask=rmask)


@triton.jit
def _bwd_kernel(H, W, HT, WT, TGT, G, LSE, LSE_T, DH, DW, n_rows, col0, col_end, n_k, n_kt, stride_h, stride_w,
                stride_ht, stride_wt, inv_temp, KL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP: tl.constexpr, FP32_DOT: tl.constexpr, PREC: tl.constexpr,
                PREC_T: tl.constexpr):
    """Tile (row block, vocabulary block of [col0, col_end)): recompute z (and zt), form dz (module
    doc), then for each BLOCK_K slice of C: DH[rows] += dz @ W[cols], DW[cols - col0] += dz^T @ H[rows]
    (fp32 atomics). Row blocks whose g is all 0 are skipped. Tiles are visited in GROUP-row-block
    bands (the Triton matmul tutorial's order) so W and H tiles are reused from L2."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_rows, BLOCK_N)
    num_v = tl.cdiv(col_end - col0, BLOCK_V)
    band = pid // (GROUP * num_v)
    first_n = band * GROUP
    size = tl.minimum(num_n - first_n, GROUP)
    pid_n = first_n + (pid % (GROUP * num_v)) % size
    pid_v = (pid % (GROUP * num_v)) // size
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (col0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    rmask = rows < n_rows
    cmask = cols < col_end
    g = tl.load(G + rows, mask=rmask, other=0.0)
    if tl.max(tl.abs(g), axis=0) > 0:
        # padded columns: z = -inf, so p = 0 there (not exp(0 - lse), which overflows when lse < -88);
        # padded rows: z = lse = 0 and g = 0, so dz = 0
        z = _logits_tile(H, W, rows, cols, n_rows, col_end, n_k, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_K,
                         FP32_DOT, PREC) * inv_temp
        p = tl.exp(tl.where(cmask[None, :], z, float("-inf")) - tl.load(LSE + rows, mask=rmask, other=0.0)[:, None])
        if KL:
            zt = _logits_tile(HT, WT, rows, cols, n_rows, col_end, n_kt, stride_ht, stride_wt, BLOCK_N, BLOCK_V,
                              BLOCK_K, FP32_DOT, PREC_T) * inv_temp
            zt = tl.where(cmask[None, :], zt, float("-inf"))
            q = tl.exp(zt - tl.load(LSE_T + rows, mask=rmask, other=0.0)[:, None])
            dz = (p - q) * (g * inv_temp)[:, None]
        else:
            tgt = tl.load(TGT + rows, mask=rmask, other=-1)
            dz = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
        if not FP32_DOT:
            dz = dz.to(H.dtype.element_ty)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, n_k, BLOCK_K):
            kk = k0 + ks
            kmask = kk[None, :] < n_k
            w = tl.load(W + cols[:, None] * stride_w + kk[None, :], mask=cmask[:, None] & kmask, other=0.0)
            h = tl.load(H + rows[:, None] * stride_h + kk[None, :], mask=rmask[:, None] & kmask, other=0.0)
            if FP32_DOT:
                w = w.to(tl.float32)
                h = h.to(tl.float32)
            dh = tl.dot(dz, w, input_precision=PREC)
            tl.atomic_add(DH + rows[:, None] * n_k + kk[None, :], dh, mask=rmask[:, None] & kmask, sem="relaxed")
            dw = tl.dot(tl.trans(dz), h, input_precision=PREC)
            tl.atomic_add(DW + (cols[:, None] - col0) * n_k + kk[None, :], dw, mask=cmask[:, None] & kmask,
                          sem="relaxed")


# ---------------------------------------------------------------------------------------------- host


def _config(x: torch.Tensor, backward: bool = False) -> dict:
    """Tile sizes: matmul-sized tiles on a GPU (a K slice of 32 for fp32, and 2 pipeline stages in the
    backward, whose two K loops and the dz tile share the shared memory); on the CPU fewer, larger
    programs (the interpreter pays per program and per op, not per flop)."""
    if x.is_cuda:
        return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32 if x.dtype == torch.float32 else 64, FP32_DOT=False,
                    num_warps=8, num_stages=2 if backward else 3)
    return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=64, FP32_DOT=True, num_warps=4, num_stages=1)


def _precision(x: torch.Tensor) -> str:
    """tl.dot's input_precision, which only matters for fp32 inputs: tf32 only where torch would use
    it for the same matmul (torch.backends.cuda.matmul.allow_tf32, off by default), else full fp32."""
    if x.dtype != torch.float32:
        return "tf32"  # Triton's default; 16-bit inputs multiply exactly on the tensor cores anyway
    return "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _splits(n_rows: int, n_cols: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, vocabulary blocks per split): enough programs to fill the GPU (4 per SM), every split non-empty."""
    num_n, num_v = triton.cdiv(n_rows, cfg["BLOCK_N"]), triton.cdiv(n_cols, cfg["BLOCK_V"])
    want = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per = triton.cdiv(num_v, max(1, min(num_v, triton.cdiv(want, max(1, num_n)))))
    return triton.cdiv(num_v, per), per


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split (max, sum exp(z - max)), (S, N) -> (lse (N,), the common max (N,))."""
    mx = m.max(0).values
    return mx + torch.log((s * torch.exp(m - mx)).sum(0)), mx


def linear_ce_forward(h: torch.Tensor, weight: torch.Tensor,
                      targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (N,), target logit (N,)) in fp32 of the logits h @ weight^T, without forming them
    (the target logit is 0 where targets is out of [0, V), e.g. ignore_index)."""
    n, c = h.shape
    v = weight.shape[0]
    cfg = _config(h)
    splits, per = _splits(n, v, cfg, h.device)
    part = torch.empty((3, splits, n), dtype=torch.float32, device=h.device)
    if n:
        _ce_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
            h, weight, targets, part, n, v, c, h.stride(0), weight.stride(0), per, PREC=_precision(h), **cfg)
    lse, _ = _merge_lse(part[0], part[1])
    return lse, part[2].sum(0)


def linear_kl_forward(h_s, w_s, h_t, w_t, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl (N,), lse_s (N,), lse_t (N,)) in fp32: KL(softmax(zt/T) || softmax(zs/T)) per row and the
    log-sum-exps of zs/T and zt/T, with zs = h_s @ w_s^T, zt = h_t @ w_t^T never formed."""
    n, v = h_s.shape[0], w_s.shape[0]
    cfg = _config(h_s)
    splits, per = _splits(n, v, cfg, h_s.device)
    part = torch.empty((5, splits, n), dtype=torch.float32, device=h_s.device)
    if n:
        _kl_fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
            h_s, w_s, h_t, w_t, part, n, v, h_s.shape[1], h_t.shape[1], h_s.stride(0), w_s.stride(0), h_t.stride(0),
            w_t.stride(0), 1.0 / temperature, per, PREC_S=_precision(h_s), PREC_T=_precision(h_t), **cfg)
    lse_s, _ = _merge_lse(part[0], part[1])
    lse_t, mx_t = _merge_lse(part[2], part[3])
    scale = torch.exp(part[2] - mx_t)
    kl = (part[4] * scale).sum(0) / (part[3] * scale).sum(0) - lse_t + lse_s
    return kl, lse_s, lse_t


def linear_backward(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None,
                    lse: torch.Tensor, teacher: tuple | None = None, temperature: float = 1.0,
                    vocab_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh like h, dW like weight) of sum_i g_i * loss_i: CE (targets, lse) or, with
    teacher = (h_t, w_t, lse_t), the KL (module doc). g (N,) fp32; lse in units of z / temperature."""
    n, c = h.shape
    v = weight.shape[0]
    cfg = _config(h, backward=True)
    kl = teacher is not None
    h_t, w_t, lse_t = teacher if kl else (h, weight, lse)
    chunk = max(1, min(v, vocab_chunk or BWD_VOCAB_CHUNK))
    dh = torch.zeros((n, c), dtype=torch.float32, device=h.device)
    dw = torch.zeros((v, c), dtype=weight.dtype, device=h.device)
    scratch = None if weight.dtype == torch.float32 else torch.empty((chunk, c), dtype=torch.float32, device=h.device)
    for v0 in range(0, v if n else 0, chunk):
        v1 = min(v, v0 + chunk)
        acc = dw[v0:v1] if scratch is None else scratch[: v1 - v0].zero_()
        grid = (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(v1 - v0, cfg["BLOCK_V"]),)
        _bwd_kernel[grid](h, weight, h_t, w_t, targets if targets is not None else g, g, lse, lse_t, dh, acc, n, v0,
                          v1, c, h_t.shape[1], h.stride(0), weight.stride(0), h_t.stride(0), w_t.stride(0),
                          1.0 / temperature, KL=kl, GROUP=8, PREC=_precision(h), PREC_T=_precision(h_t), **cfg)
        if scratch is not None:
            dw[v0:v1] = acc
    return dh.to(h.dtype), dw


def _weights(targets: torch.Tensor, token_weights: torch.Tensor | None, ignore_index: int):
    """(w (N,) fp32 = (targets != ignore) * token_weights, sum(w).clamp_min(1e-12)): the model's."""
    w = (targets != ignore_index).float()
    if token_weights is not None:
        w = w * token_weights.float()
    return w, w.sum().clamp_min(1e-12)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """FusedLinearCrossEntropyFunction.apply(h, weight, targets, token_weights, ignore_index) -> the
    weighted mean CE (fp32 scalar); gradients for h and weight (none for targets, token_weights)."""

    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, ignore_index):
        lse, z_target = linear_ce_forward(h, weight, targets)
        w, den = _weights(targets, token_weights, ignore_index)
        ce = torch.where(targets != ignore_index, lse - z_target, 0.0)
        ctx.save_for_backward(h, weight, targets, lse, w / den)
        return (ce * w).sum() / den

    @staticmethod
    def backward(ctx, dloss):
        h, weight, targets, lse, g = ctx.saved_tensors
        dh, dw = linear_backward((g * dloss.float()).contiguous(), h, weight, targets, lse)
        return dh, dw, None, None, None


class FusedLinearKLFunction(torch.autograd.Function):
    """FusedLinearKLFunction.apply(h_s, w_s, h_t, w_t, targets, token_weights, temperature, ignore_index)
    -> the weighted mean KL (fp32 scalar); gradients for h_s and w_s only (the teacher is frozen)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, token_weights, temperature, ignore_index):
        kl, lse_s, lse_t = linear_kl_forward(h_s, w_s, h_t, w_t, temperature)
        w, den = _weights(targets, token_weights, ignore_index)
        ctx.save_for_backward(h_s, w_s, h_t, w_t, lse_s, lse_t, w / den)
        ctx.temperature = temperature
        return (torch.where(w != 0, kl, 0.0) * w).sum() / den

    @staticmethod
    def backward(ctx, dloss):
        h_s, w_s, h_t, w_t, lse_s, lse_t, g = ctx.saved_tensors
        dh, dw = linear_backward((g * dloss.float()).contiguous(), h_s, w_s, None, lse_s, (h_t, w_t, lse_t),
                                 ctx.temperature)
        return dh, dw, None, None, None, None, None, None


# ------------------------------------------------------------------------------------- public API


def _check_pair(h: torch.Tensor, w: torch.Tensor, hname: str, wname: str) -> None:
    if h.dim() != 2:
        raise ValueError(f"{hname}: expected (N, C), got shape {tuple(h.shape)}")
    if w.dim() != 2 or w.shape[1] != h.shape[1]:
        raise ValueError(f"{wname}: expected (V, {h.shape[1]}) to match {hname} (N, C), got {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError(f"{wname}: empty vocabulary")
    if h.dtype not in _DTYPES or w.dtype != h.dtype:
        raise ValueError(f"{wname}: dtype {w.dtype} with {hname} {h.dtype}; both must be one of fp32/fp16/bf16")
    if w.device != h.device:
        raise ValueError(f"{wname}: on {w.device}, {hname} on {h.device}")


def _check_targets(targets, token_weights, n: int, device) -> torch.Tensor | None:
    if targets.shape != (n,) or targets.dtype != torch.int64:
        raise ValueError(f"targets: expected ({n},) int64, got {tuple(targets.shape)} {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets: on {targets.device}, expected {device}")
    if token_weights is not None:
        if token_weights.shape != (n,) or not token_weights.is_floating_point():
            raise ValueError(f"token_weights: expected ({n},) floating, got {tuple(token_weights.shape)} "
                             f"{token_weights.dtype}")
        if token_weights.device != device:
            raise ValueError(f"token_weights: on {token_weights.device}, expected {device}")
        return token_weights.detach().float().contiguous()
    return None


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               token_weights: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """sum_i w_i CE(h_i @ weight^T, targets_i) / max(sum_i w_i, 1e-12), w_i = (targets_i != ignore_index)
    * token_weights_i: the model's loss, without the (N, V) logits. h (N, C) and weight (V, C) of one
    dtype (fp32/fp16/bf16), targets (N,) int64 in [0, V) or ignore_index, token_weights (N,) float or
    None (all ones). Returns an fp32 scalar; 0 when every token is ignored (as the model's clamp).
    The range check of targets costs one host-device sync."""
    _check_pair(h, weight, "h", "weight")
    token_weights = _check_targets(targets, token_weights, h.shape[0], h.device)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"targets: {int(targets[bad][0])} is neither in [0, {weight.shape[0]}) nor "
                         f"ignore_index={ignore_index}")
    return FusedLinearCrossEntropyFunction.apply(_rows(h), _rows(weight), targets.contiguous(), token_weights,
                                                 ignore_index)


def fused_linear_kl(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, targets: torch.Tensor,
                    token_weights: torch.Tensor | None, temperature: float, ignore_index: int = -100) -> torch.Tensor:
    """distill_kl on the logits h_s @ w_s^T (student) and h_t @ w_t^T (teacher), never formed:
    weighted mean over tokens (targets != ignore_index) of KL(softmax(teacher/T) || softmax(student/T)).
    Student pair and teacher pair each of one dtype (fp32/fp16/bf16), C_s and C_t may differ, the
    vocabulary may not. targets only mask (their values are not checked). Gradients: h_s, w_s."""
    _check_pair(h_s, w_s, "h_s", "w_s")
    _check_pair(h_t, w_t, "h_t", "w_t")
    if h_t.shape[0] != h_s.shape[0] or h_t.device != h_s.device:
        raise ValueError(f"h_t: {h_t.shape[0]} rows on {h_t.device}, h_s has {h_s.shape[0]} on {h_s.device}")
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(f"w_t: vocabulary {w_t.shape[0]}, w_s has {w_s.shape[0]}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    token_weights = _check_targets(targets, token_weights, h_s.shape[0], h_s.device)
    return FusedLinearKLFunction.apply(_rows(h_s), _rows(w_s), _rows(h_t.detach()), _rows(w_t.detach()),
                                       targets.contiguous(), token_weights, float(temperature), ignore_index)


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   token_weights: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The model's loss in plain PyTorch (components/model/model.py Transformer.forward), for tests and benchmarks."""
    logits = h @ weight.T
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    w, den = _weights(targets, token_weights, ignore_index)
    return (ce * w).sum() / den


def linear_kl_reference(h_s, w_s, h_t, w_t, targets, token_weights, temperature: float,
                        ignore_index: int = -100) -> torch.Tensor:
    """components/compress/distill.py distill_kl on h_s @ w_s^T and h_t @ w_t^T, in plain PyTorch."""
    log_s = torch.log_softmax((h_s @ w_s.T).float() / temperature, dim=-1)
    log_t = torch.log_softmax((h_t @ w_t.T).float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    w, den = _weights(targets, token_weights, ignore_index)
    return (kl * w).sum() / den
