"""The kernel benchmark scripts run (tiny shapes; interpreted on the CPU) and print their tables:
they check each kernel against its reference before timing it, so a broken kernel fails here too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_runs_and_prints_its_table(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # common.py sets it on a CPU itself
    r = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--no-save"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "|---|" in r.stdout, r.stdout[-2000:]
