"""INT8 weight-only matmul for decoding, the dequantization fused, in Triton (inference only).

    y = (x @ q^T) * scale      x (..., K) fp16/bf16/fp32, q (N, K) int8, scale (N,) fp32, y (..., N) in x's dtype

with q and scale as components/model/int8.py defines them (symmetric, one scale per output
channel: W ~ q * scale[:, None]). The int8 weight is read from memory once, converted to float in
registers (never written back as a float copy of W), the products accumulate in fp32, and the
per-channel scale multiplies the accumulator once at the end (it is constant along K: the algebra
of PyTorch's `_weight_int8pack_mm` and gpt-fast's `WeightOnlyInt8Linear`, `linear(x, q) * scale`).
Two kernels, chosen by the launcher on M = rows of x:

- M <= GEMV_MAX_M (decode): `_int8_gemv_kernel`, memory bound. Each program owns BLOCK_N output
  channels of one row of x and streams a K range, accumulating w * x elementwise in an fp32
  (BLOCK_N, BLOCK_K) tile that is reduced across K once at the end (the weight-only batched GEMV of
  FasterTransformer / TensorRT-LLM, which also covers batch 1-4 in its GEMV). Programs for the
  rows of x are adjacent in the launch order, so the M reads of a weight tile hit L2. BLOCK_N shrinks
  until there are a few programs per SM; if N is still too small, K is split (below).
- larger M (small-batch GEMM): `_int8_gemm_kernel`, the Triton matmul tutorial's tiling
  (03-matrix-multiplication) with the int8 tile converted to x's dtype before `tl.dot` (fp32
  accumulation), and split-K (as in the old `triton.ops.matmul`) when the M x N grid is too small
  to fill the GPU.

The int8 -> float conversion (`_int8_to`) is the magic-number trick of FasterTransformer's
`FastInterleavedAndBiasedNumericArrayConverter` (vendored in PyTorch as
aten/src/ATen/native/cuda/cutlass_extensions/interleaved_numeric_conversion.h; Kim et al. 2022,
arXiv:2211.10017), as Marlin also does it: integer ops and one subtraction instead of an int->float
conversion instruction (16 per clock per SM on Hopper in the CUDA programming guide's throughput
table, against 64 integer and 128 fp32 ops: about the rate at which HBM delivers int8 weights to an
SM, so the conversion instruction alone would cap the GEMV). The byte u = q + 128 (mod 256: an xor with 0x80) placed in the mantissa of 2^23 is the
fp32 2^23 + 128 + q exactly, and in the mantissa of the fp16 1024.0 it is 1024 + 128 + q; one
subtraction leaves q, exactly, for all 256 int8 values. bf16 (8 significant bits) takes the top half
of the exact fp32 value. FasterTransformer stores its weights biased and interleaved; ours are the
plain signed int8 of quantize.py, hence the xor.

Departures: split-K partial sums (fp32, scale applied) go to a (S, M, N) buffer reduced and cast by
`_splitk_reduce_kernel` (deterministic, unlike fp32 atomics); the tile sizes are heuristics, not
autotuned; fp32 x uses full-precision fp32 dots (no TF32). No backward: the model only runs
INT8 weights for inference, and `Int8WeightMatmulFunction.backward` says so with an error
instead of silently dropping the gradient.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests), whose tl.dot cannot take bf16/fp16:
there the GEMM converts both tiles to fp32 before the dot (constexpr DOT_FP32, set from x.is_cuda).
`int8_matmul_reference` is the plain PyTorch version the tests and benchmarks compare against.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 4  # rows of x up to which the GEMV kernel runs (TensorRT-LLM's batched GEMV goes to 4)
_GEMV_TILE = 4096  # BLOCK_N * BLOCK_K of the GEMV: 32 int8 per thread at 4 warps
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _int8_to(q, DTYPE: tl.constexpr):
    """int8 -> DTYPE (fp32 / fp16 / bf16), exact, with integer ops and one subtraction. With
    u = q + 128 (mod 256): bits(2^23) | u is the fp32 2^23 + 128 + q; bits(1024.0) | u is the fp16
    1024 + 128 + q; bf16 keeps the top half of the (exact, <= 8 significant bits) fp32 result."""
    u = q.to(tl.uint8, bitcast=True)
    if DTYPE == tl.float16:
        w = (u.to(tl.uint16) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        w = (u.to(tl.int32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        if DTYPE == tl.bfloat16:
            w = (w.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return w


@triton.jit
def _int8_convert_kernel(Q, O, n, BLOCK: tl.constexpr):
    """O[i] = float(Q[i]) in O's dtype through `_int8_to` (tests check all 256 values)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(O + offs, _int8_to(tl.load(Q + offs, mask=mask, other=0), O.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemv_kernel(X, Q, S, Y, M, N, K, stride_xm, stride_qn, stride_ys, stride_ym, k_per_split,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (m, n-block, k-split), m fastest: for the BLOCK_N channels n and the K range
    [split * k_per_split, (split + 1) * k_per_split),
        Y[split, m, n] = scale[n] * sum_k x[m, k] * q[n, k]       (fp32, cast to Y's dtype)."""
    pid = tl.program_id(0)
    pid_m = pid % M
    rest = pid // M
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = rest % n_blocks
    pid_k = rest // n_blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = pid_k * k_per_split
    offs_k = k0 + tl.arange(0, BLOCK_K)
    q_ptrs = Q + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :]
    x_ptrs = X + pid_m.to(tl.int64) * stride_xm + offs_k
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(k0, k0 + k_per_split, BLOCK_K):
        mask_k = offs_k < K - (k - k0)
        x = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(q_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc += _int8_to(w, tl.float32) * x[None, :]
        q_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    scale = tl.load(S + offs_n, mask=mask_n, other=0.0)
    y = tl.sum(acc, axis=1) * scale
    tl.store(Y + pid_k * stride_ys + pid_m * stride_ym + offs_n, y.to(Y.dtype.element_ty), mask=mask_n)


@triton.jit
def _int8_gemm_kernel(X, Q, S, Y, M, N, K, stride_xm, stride_qn, stride_ys, stride_ym, k_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_FP32: tl.constexpr):
    """Program (m-block, n-block) on axis 0 (m fastest), k-split on axis 1:
        Y[split, m, n] = scale[n] * sum_k x[m, k] * q[n, k] over the split's K range,
    the int8 tile converted to x's dtype (exact: |q| <= 128) and multiplied by tl.dot in fp32."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m
    pid_n = pid // grid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k0 = pid_k * k_per_split
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    q_ptrs = Q + offs_n[None, :].to(tl.int64) * stride_qn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of q^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k0, k0 + k_per_split, BLOCK_K):
        mask_k = offs_k < K - (k - k0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(q_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        if DOT_FP32:  # the CPU interpreter, or fp32 x: full fp32 products
            acc += tl.dot(x.to(tl.float32), _int8_to(w, tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, _int8_to(w, x.dtype))
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    scale = tl.load(S + offs_n, mask=mask_n, other=0.0)
    y = acc * scale[None, :]
    y_ptrs = Y + pid_k * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(P, Y, total, splits, BLOCK: tl.constexpr):
    """Y[i] = cast(sum over s of P[s, i]) for the flat (M * N) output, in split order (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(P + s * total + offs, mask=mask, other=0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """ValueError naming the argument for anything the kernels do not take."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        raise ValueError(f"x: expected a float16/bfloat16/float32 tensor (..., K), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q: expected an int8 matrix (N, K), got {getattr(q, 'dtype', type(q).__name__)} "
                         f"of shape {tuple(getattr(q, 'shape', ()))}")
    if not q.is_contiguous():
        raise ValueError("q: must be contiguous (N, K) (the kernels stream its rows; call .contiguous() once "
                         "when loading the weights, not per call)")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match q's K = {q.shape[1]} (q is (N, K))")
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0],):
        raise ValueError(f"scale: expected float32 of shape ({q.shape[0]},) (one per output channel of q), got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)} of shape "
                         f"{tuple(getattr(scale, 'shape', ()))}")
    if not (x.device == q.device == scale.device):
        raise ValueError(f"x, q, scale: on different devices ({x.device}, {q.device}, {scale.device})")


@functools.lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """A few programs per SM on a GPU; few (big) programs under the interpreter, where each costs."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _split(k: int, block_k: int, programs: int, wanted: int, split_k: int | None) -> tuple[int, int]:
    """(splits, k_per_split): K cut into whole BLOCK_K blocks so that programs * splits ~ wanted."""
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = triton.cdiv(wanted, programs) if programs < wanted // 2 else 1
    per = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks)))
    return triton.cdiv(k_blocks, per), per * block_k


def int8_weight_matmul_forward(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernel: str | None = None,
                               split_k: int | None = None) -> torch.Tensor:
    """The launcher: y (..., N) in x's dtype. `kernel` ("gemv" / "gemm") and `split_k` override the
    choices made from M and the grid size (tests, benchmarks); the inputs are checked by the caller."""
    n, k = q.shape
    out_shape = (*x.shape[:-1], n)
    if x.numel() == 0 or n == 0:  # no rows, or K = 0 (an empty sum)
        return torch.zeros(out_shape, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kernel = kernel or ("gemv" if m <= GEMV_MAX_M else "gemm")
    wanted = _programs_wanted(x.device)
    if kernel == "gemv":
        block_n = 32
        while block_n > 4 and m * triton.cdiv(n, block_n) < wanted:
            block_n //= 2
        block_k = min(_GEMV_TILE // block_n, max(16, triton.next_power_of_2(k)))
        programs = m * triton.cdiv(n, block_n)
        num_warps, num_stages = 4, 3
    elif kernel == "gemm":
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_k = min(32 if x.dtype == torch.float32 else 128, max(16, triton.next_power_of_2(k)))
        block_n = 64 if triton.cdiv(m, block_m) * triton.cdiv(n, 64) >= wanted // 4 else 32
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        num_warps, num_stages = 4, 4
    else:
        raise ValueError(f"kernel: expected 'gemv', 'gemm' or None, got {kernel!r}")
    splits, k_per_split = _split(k, block_k, programs, wanted, split_k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # one split writes y directly; several write fp32 partials reduced (and cast) afterwards
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    stride_ys = 0 if splits == 1 else out.stride(0)
    if kernel == "gemv":
        _int8_gemv_kernel[(programs * splits,)](
            x2, q, scale, out, m, n, k, x2.stride(0), q.stride(0), stride_ys, n, k_per_split,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    else:
        _int8_gemm_kernel[(programs, splits)](
            x2, q, scale, out, m, n, k, x2.stride(0), q.stride(0), stride_ys, n, k_per_split,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_FP32=x.dtype == torch.float32 or not x.is_cuda, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, splits, BLOCK=block)
    return y.view(out_shape)


class Int8WeightMatmulFunction(torch.autograd.Function):
    """Int8WeightMatmulFunction.apply(x, q, scale): the forward only; backward raises (inference)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return int8_weight_matmul_forward(x, q, scale)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        raise NotImplementedError("int8_weight_matmul is inference only (no backward); train the float "
                                  "model, or FakeQuantLinear for quantization-aware training")


def int8_weight_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp16/bf16/fp32 @ (q (N, K) int8 * scale (N,) fp32 [:, None])^T -> (..., N) in x's
    dtype, the dequantization fused. ValueError naming the argument for a wrong dtype or shape."""
    _check(x, q, scale)
    if torch.is_grad_enabled() and x.requires_grad:
        return Int8WeightMatmulFunction.apply(x, q, scale)
    return int8_weight_matmul_forward(x, q, scale)


def int8_to_float(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (any shape, int8) as `dtype` through the kernels' in-register conversion (for tests)."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.numel():
        _int8_convert_kernel[(triton.cdiv(q.numel(), 1024),)](q.contiguous(), out, q.numel(), BLOCK=1024)
    return out


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, for tests and benchmarks: x @ (q * scale[:, None]).to(x.dtype)^T computed in
    fp32 (the dequantized weight rounded to x's dtype first, as a float model would hold it)."""
    w = (q.float() * scale.float()[:, None]).to(x.dtype)
    return (x.float() @ w.float().t()).to(x.dtype)
