"""Shared test setup: quiet, CPU-only defaults and the path to the real data sets beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test imports great_expectations, dvc or deepspeed; a value already in the
# environment wins.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from kernel_env import import_triton_interpreted  # noqa: E402

import_triton_interpreted()  # before any test imports triton another way (tests/kernel_env.py says why)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (a fresh clone has no ../shared/data)")
    return SHARED_DATA
