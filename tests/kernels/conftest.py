"""Every test under tests/kernels/ launches its kernels interpreted on a CPU (see kernel_env.py)."""

from __future__ import annotations

import pytest

from kernel_env import ON_GPU


@pytest.fixture(autouse=True)
def interpret_on_cpu(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
