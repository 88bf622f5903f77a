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

# Under pytest-xdist, each of N workers gets a share of the cores (its subprocesses inherit the
# setting): N processes at 2 threads each on 2 cores would only wait on each other.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

from kernel_env import import_triton_interpreted  # noqa: E402

import_triton_interpreted()  # before any test imports triton another way (tests/kernel_env.py says why)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The longest files (a minute or more each on 2 cores: whole pipelines, DeepSpeed processes), run
# first. `make test` runs pytest-xdist with `--dist loadfile --no-loadscope-reorder`, which hands
# out files in collection order, one at a time as a worker frees; started last (or, as xdist's
# reorder by test count would have it, after every file with more tests), they ran one after
# another at the end while the other worker idled.
LONG_FIRST = ("pipelines/test_dvc.py", "pipelines/test_run.py", "pipelines/test_run_base_model.py", "pipelines/test_kfp.py", "parallel/test_parallel.py",
              "train/test_checkpoint.py", "train/test_stages.py", "compress/test_distill.py", "train/test_engine.py")


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).resolve().parent

    def rank(item) -> int:
        path = Path(item.path).resolve()
        rel = path.relative_to(tests).as_posix() if path.is_relative_to(tests) else ""
        return LONG_FIRST.index(rel) if rel in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (a fresh clone has no ../shared/data)")
    return SHARED_DATA
