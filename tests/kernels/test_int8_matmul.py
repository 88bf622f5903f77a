"""INT8 weight-only matmul (the dequantization fused) against the plain PyTorch reference and
against components.model.int8.int8_matmul (torch's `_weight_int8pack_mm`), at odd K and N,
M from 1 (GEMV) to 33 (GEMM), 3-D x, each dtype with its tolerance; plus exact properties that do
not go through any reference. On the CPU the kernels run under TRITON_INTERPRET=1 (tests/kernel_env.py); on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch

from kernel_env import DEVICE, interpreted

with interpreted():
    from kernels.int8_matmul import (int8_matmul_reference, int8_to_float, int8_weight_matmul,
                                     int8_weight_matmul_forward)

from components.model.int8 import int8_matmul, quantize_rows


# bf16: one output ulp (2^-8 relative) plus the reference's rounding of W to bf16; the CPU
# interpreter also truncates fp32 -> bf16 casts where torch rounds
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEADING = [(1,), (2,), (5,), (33,), (2, 3)]  # rows of x: M = 1, 2 (GEMV), 5, 33 (GEMM), 3-D x (M = 6)
NK = [(1, 7), (3, 1), (130, 100), (3, 257), (130, 257)]  # (N, K)


def _inputs(lead, n, k, dtype, seed=0):
    """x ~ N(0, 1) and an int8 weight over the full range with scales that keep |y| ~ 1."""
    g = torch.Generator().manual_seed(seed + 1000 * n + k)
    x = torch.randn(*lead, k, generator=g)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (0.5 + torch.rand(n, generator=g)) / (64 * k ** 0.5)
    return x.to(DEVICE, dtype), q.to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("lead", LEADING)
def test_matches_the_reference(lead, n, k, dtype):
    x, q, scale = _inputs(lead, n, k, dtype)
    y = int8_weight_matmul(x, q, scale)
    ref = int8_matmul_reference(x, q, scale)
    assert y.dtype == dtype and y.shape == (*lead, n) and y.device == x.device
    torch.testing.assert_close(y, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,k", [((1,), 130, 257), ((3,), 3, 100), ((2, 3), 130, 7), ((33,), 1, 257)])
def test_matches_torch_int8pack_as_quantize_calls_it(lead, n, k, dtype):
    """The weights as the quantizer writes them, against the module the model runs today."""
    g = torch.Generator().manual_seed(n + k)
    q, scale = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    q, scale = q.to(DEVICE), scale.to(DEVICE)
    try:
        want = int8_matmul(x, q, scale)
    except (RuntimeError, NotImplementedError) as err:  # no kernel for this device in this torch
        pytest.skip(f"torch's _weight_int8pack_mm does not run here: {err}")
    torch.testing.assert_close(int8_weight_matmul(x, q, scale), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 2, 64])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_both_kernels_at_any_split_agree_with_the_reference(kernel, split_k, dtype):
    """Each kernel at M where the launcher would not pick it, K split into 1, 2 and (capped) all blocks."""
    x, q, scale = _inputs((3,) if kernel == "gemm" else (5,), 130, 257, dtype)
    y = int8_weight_matmul_forward(x, q, scale, kernel=kernel, split_k=split_k)
    torch.testing.assert_close(y, int8_matmul_reference(x, q, scale), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_int8_value_converts_exactly(dtype):
    q = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
    assert torch.equal(int8_to_float(q, dtype), q.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_one_hot_rows_pick_weight_columns_exactly(m, dtype):
    """Not via the reference: x = rows of the identity, scale = powers of two, so y[i, n] =
    q[n, col_i] * scale[n] exactly, in every dtype, in the GEMV (m <= 4) and the GEMM, for the
    whole int8 range including -128."""
    g = torch.Generator().manual_seed(m)
    n, k = 37, 256
    q = torch.stack([torch.randperm(256, generator=g) - 128 for _ in range(n)]).to(torch.int8)  # all values per row
    scale = 2.0 ** -torch.randint(0, 9, (n,), generator=g).float()
    cols = torch.randint(0, k, (m,), generator=g)
    x = torch.eye(k)[cols]
    want = (q[:, cols].float() * scale[:, None]).t()  # (m, n)
    y = int8_weight_matmul(x.to(DEVICE, dtype), q.to(DEVICE), scale.to(DEVICE))
    torch.testing.assert_close(y.float().cpu(), want, rtol=0, atol=0)


def test_an_identity_weight_returns_x():
    """q = I (N = K) and scale = 1: y = x bit for bit; a permutation of q's rows permutes y's columns."""
    x, _, _ = _inputs((2, 3), 1, 100, torch.bfloat16)
    eye = torch.eye(100, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(100, device=DEVICE)
    assert torch.equal(int8_weight_matmul(x, eye, ones), x)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(int8_weight_matmul(x, eye[perm].contiguous(), ones), x[..., perm])


@pytest.mark.parametrize("lead", [(1,), (9,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_doubling_the_scale_doubles_the_output_exactly(lead, dtype):
    x, q, scale = _inputs(lead, 130, 257, dtype)
    torch.testing.assert_close(int8_weight_matmul(x, q, 2 * scale), 2 * int8_weight_matmul(x, q, scale),
                               rtol=0, atol=0)


def test_non_contiguous_x_and_empty_batches():
    x, q, scale = _inputs((7,), 3, 33, torch.float32)
    xt = x.t().contiguous().t()  # (7, 33) with stride (1, 7)
    torch.testing.assert_close(int8_weight_matmul(xt, q, scale), int8_matmul_reference(x, q, scale), **TOL[x.dtype])
    assert int8_weight_matmul(x[:0], q, scale).shape == (0, 3)
    assert torch.equal(int8_weight_matmul(x[:, :0], q[:, :0], scale), torch.zeros(7, 3, device=DEVICE))


def test_an_unknown_kernel_name_is_refused():
    with pytest.raises(ValueError, match="^kernel:"):
        int8_weight_matmul_forward(*_inputs((1,), 3, 7, torch.float32), kernel="gemm2")


def _bad(name):
    x, q, scale = _inputs((2,), 3, 7, torch.float32)
    return {"q_float": (x, q.float(), scale), "q_1d": (x, q[0], scale[:1]), "q_strided": (x, q.t().contiguous().t(),
            scale), "x_k": (x[:, :6], q, scale), "x_int": (x.to(torch.int32), q, scale),
            "scale_len": (x, q, scale[:2]), "scale_2d": (x, q, scale[:, None]),
            "scale_fp16": (x, q, scale.half())}[name]


@pytest.mark.parametrize("case,arg", [("q_float", "q"), ("q_1d", "q"), ("q_strided", "q"), ("x_k", "x"),
                                      ("x_int", "x"), ("scale_len", "scale"), ("scale_2d", "scale"),
                                      ("scale_fp16", "scale")])
def test_bad_inputs_are_refused_naming_the_argument(case, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        int8_weight_matmul(*_bad(case))


def test_inference_only_the_backward_says_so():
    x, q, scale = _inputs((2,), 3, 7, torch.float32)
    x.requires_grad_()
    y = int8_weight_matmul(x, q, scale)
    torch.testing.assert_close(y, int8_matmul_reference(x.detach(), q, scale), **TOL[x.dtype])
    with pytest.raises(NotImplementedError, match="inference only"):
        y.sum().backward()
    with torch.no_grad():
        assert int8_weight_matmul(x, q, scale).grad_fn is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-size shapes")
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)])
def test_gpu_sizes_match_the_reference(m, n, k):
    x, q, scale = _inputs((m,), n, k, torch.bfloat16)
    torch.testing.assert_close(int8_weight_matmul(x, q, scale), int8_matmul_reference(x, q, scale),
                               **TOL[torch.bfloat16])
