"""How the kernel tests run Triton: compiled on a GPU, interpreted on the CPU (TRITON_INTERPRET=1).

triton.jit reads TRITON_INTERPRET when a kernel is defined and again at each launch, so it is set
while a kernel module is imported (`with interpreted(): from kernels.x import ...`) and, through
the autouse fixture in tests/kernels/conftest.py, during each test under tests/kernels/ only: the
other suites start DeepSpeed and Triton-server subprocesses that must not inherit it.

triton.language itself must first be imported interpreted too: its reductions (tl.sum, tl.max...)
are @triton.jit functions, and ones defined without the interpreter fail inside an interpreted
kernel ("Cannot call @triton.jit'd outside of the scope of a kernel"). tests/conftest.py imports it
that way at start-up, before any suite can import triton through torch.
"""

from __future__ import annotations

import contextlib
import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@contextlib.contextmanager
def interpreted():
    """TRITON_INTERPRET=1 inside the block (on a CPU), the previous value restored after it."""
    before = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def import_triton_interpreted() -> None:
    """On a CPU, the process's first import of triton.language, interpreted (see the module doc)."""
    if not ON_GPU:
        with interpreted():
            import triton.language  # noqa: F401
