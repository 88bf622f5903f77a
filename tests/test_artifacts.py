"""Output folders held by one process at a time: a second is refused, a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from components.artifacts import OutputError, atomic_dir, hold

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from components.artifacts import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""
CONTENDER = """
import os, sys
from components.artifacts import OutputError, hold
inside, won = sys.argv[1] + ".inside", 0
for _ in range(300):
    try:
        with hold(sys.argv[1]):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if the other is inside too
            os.close(fd)
            os.unlink(inside)
            won += 1
    except OutputError:
        pass
print(won)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    out = tmp_path / "runs" / "base"
    proc = _holder(out)
    try:
        with pytest.raises(OutputError) as err:
            with hold(out):
                pass
        assert f"{out}: in use by process {proc.pid} on " in str(err.value) and "another output folder" in str(err.value)
        with pytest.raises(OutputError, match="in use by process"):
            with atomic_dir(out):
                pass
        assert not out.exists()  # the refused step wrote nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / "runs" / ".base.lock").exists()  # what the killed holder left: a file, no lock
    with hold(out):
        with hold(out):  # re-entrant in one process
            pass
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1" and not (tmp_path / "runs" / ".base.lock").exists()


def test_two_processes_contending_are_never_inside_at_once(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), results  # O_EXCL never failed: never both inside
    assert all(int(r) >= 1 for r in results)
