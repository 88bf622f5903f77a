"""`precision: auto`: bf16 where the machine computes it natively, fp32 elsewhere.

    from components.train.precision import resolve
    resolve("auto")   # "bf16" on CUDA with bf16, or a CPU with AVX512-BF16 or AMX; else "fp32"

Why it matters: on a CPU without native bf16 (AVX2 only, e.g. many AMD EPYC machines) every bf16
matmul falls back to a slow emulated path, measured at about 27x an fp32 matmul and about 12x a
whole training step here. `auto` is the default of every training stage; the choice is logged
once per process, and an explicit `bf16` on such a CPU is a warning that names the cost.
"""

from __future__ import annotations

import functools

from components.console import log

PRECISIONS = ("auto", "bf16", "fp32", "fp16")


@functools.lru_cache(maxsize=None)
def native_bf16() -> tuple[bool, str]:
    """(whether this machine's training device computes bf16 natively, which hardware says so)."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA {torch.cuda.get_device_name()}" + ("" if ok else " without bf16")
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    level = torch.backends.cpu.get_cpu_capability()  # what torch's kernels use (ATEN_CPU_CAPABILITY caps it)
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if caps.get(flag) and level.startswith("AVX512"):
            return True, f"CPU with {name}"
    return False, f"CPU without native bf16 ({level})"


@functools.lru_cache(maxsize=None)
def resolve(requested: str, field: str = "train.precision") -> str:
    """The precision a stage trains in: `requested` itself, or for `auto` bf16 / fp32 by the
    hardware. Logged once per (requested, field); explicit bf16 without native support warns."""
    ok, hardware = native_bf16()
    if requested == "auto":
        chosen = "bf16" if ok else "fp32"
        log.info("precision: %s (%s; %s: auto)", chosen, hardware, field)
        return chosen
    if requested == "bf16" and not ok:
        log.warning("%s: bf16 on a %s: every matmul takes a slow emulated path (about 12x slower training "
                    "than fp32 measured on such a CPU); set %s=auto (fp32 here) unless you need bf16",
                    field, hardware, field)
    return requested
