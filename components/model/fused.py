"""The model's switch between its plain PyTorch ops and the Triton kernels of kernels/.

`ModelConfig.kernels` picks, per call, from the tensor at hand:

    "auto"    the kernels when the tensor is on a CUDA device, PyTorch otherwise (the default)
    "triton"  always the kernels: on a CPU only under TRITON_INTERPRET=1 (tests; slow)
    "torch"   always PyTorch

The kernel modules are imported on first use, so a CPU run never imports triton. Each function
here takes the same arguments as the PyTorch op it replaces in model.py, and tests/kernels/
test_model_kernels.py checks that both paths give the same outputs and gradients.
"""

from __future__ import annotations

import os

import torch


def hybrid_supported(q: torch.Tensor) -> bool:
    """Whether the hybrid-attention kernel takes q (B, H, T, D): a head dim it has tiles for, and on a
    GPU 16-bit (fp32 compiles to exact-fp32 FMA loops that spill on sm_90; PyTorch is the better path).
    Other head dims, decoding and dropout stay on PyTorch. Ask after `active` (this imports triton)."""
    from kernels.hybrid_attention import HEAD_DIMS

    return q.size(-1) in HEAD_DIMS and not (q.is_cuda and q.dtype == torch.float32)


def active(mode: str, x: torch.Tensor) -> bool:
    """Whether the kernels run for tensor x under `mode`."""
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels: {mode!r} is not one of auto, triton, torch")
    if mode == "torch":
        return False
    if x.is_cuda:
        return True
    if mode == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("model.kernels: 'triton' needs a CUDA device, or TRITON_INTERPRET=1 to run the "
                               "Triton kernels interpreted on the CPU (slow; for tests). Use 'auto' or 'torch'.")
        return True
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from kernels.rmsnorm import RMSNormFunction

    return RMSNormFunction.apply(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    from kernels.rope import RoPEFunction

    return RoPEFunction.apply(x, cos, sin, start)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """The model's weighted-mean cross-entropy of h (N, C) @ weight (V, C)^T, never forming the logits."""
    from kernels.fused_linear_ce import fused_linear_cross_entropy

    return fused_linear_cross_entropy(h, weight, targets, token_weights, ignore_index=ignore_index)


def linear_kl(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, targets: torch.Tensor,
              token_weights: torch.Tensor | None, temperature: float, ignore_index: int) -> torch.Tensor:
    """Distillation's KL(teacher || student) at `temperature` from the hidden states, never forming logits."""
    from kernels.fused_linear_ce import fused_linear_kl

    return fused_linear_kl(h_s, w_s, h_t, w_t, targets, token_weights, temperature, ignore_index=ignore_index)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (q * scale[:, None])^T for an int8 weight q (N, K), dequantized in registers."""
    from kernels.int8_matmul import int8_weight_matmul

    return int8_weight_matmul(x, q, scale)


def moe_experts(x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, experts) -> torch.Tensor:
    """sum over each token's k routed SwiGLU experts of gate * expert(x), for x (N, C), idx and gates
    (N, k). The experts' weights are stacked per call (gradients flow back through the stack)."""
    from kernels.moe import moe_experts as grouped

    stack = lambda name: torch.stack([getattr(e, name).weight for e in experts])  # noqa: E731
    return grouped(x, idx, gates, stack("w_gate"), stack("w_up"), stack("c_proj"), check_ids=False)


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int,
                     top_k: int) -> torch.Tensor:
    """The hybrid sparse attention of a whole sequence, q, k, v (B, H, T, D) -> (B, H, T, D), without
    the (T, T) mask: the sliding window plus each query's top_k selected earlier key blocks."""
    from kernels.hybrid_attention import HybridAttentionFunction

    return HybridAttentionFunction.apply(q, k, v, window, block, top_k)
