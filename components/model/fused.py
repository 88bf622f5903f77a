"""The model's switch between its plain PyTorch ops and the Triton kernels of kernels/.

`ModelConfig.kernels` picks, per call, from the tensor at hand:

    "auto"  the kernels when the tensor is on a CUDA device, PyTorch otherwise (the default)
    "on"    always the kernels: on a CPU only under TRITON_INTERPRET=1 (tests; slow)
    "off"   always PyTorch

The kernel modules are imported on first use, so a CPU run never imports triton. Each function
here takes the same arguments as the PyTorch op it replaces in model.py, and tests/kernels/
test_model_kernels.py checks that both paths give the same outputs and gradients.
"""

from __future__ import annotations

import os

import torch

MODES = ("auto", "on", "off")


def active(mode: str, x: torch.Tensor) -> bool:
    """Whether the kernels run for tensor x under `mode`."""
    if mode == "off":
        return False
    if x.is_cuda:
        return True
    if mode == "on":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("model.kernels: 'on' needs a CUDA device, or TRITON_INTERPRET=1 to run the "
                               "Triton kernels interpreted on the CPU (slow; for tests). Use 'auto' or 'off'.")
        return True
    return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from kernels.rmsnorm import RMSNormFunction

    return RMSNormFunction.apply(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    from kernels.rope import RoPEFunction

    return RoPEFunction.apply(x, cos, sin, start)
