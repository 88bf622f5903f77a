"""`distillery` in a subprocess for the tests that run DeepSpeed (never in-process in pytest): the
tiny preset, CPU accelerator, one OpenMP thread; `ok` fails the test with the command's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def launcher(procs: int) -> list[str]:
    """`python -m` arguments of the deepspeed launcher for `procs` processes on a free port (two
    test processes launching at once would both take the default 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["-m", "deepspeed.launcher.runner", "--master_port", str(port), "--num_gpus", str(procs)]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--preset", "tiny"], env=ENV,
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc
