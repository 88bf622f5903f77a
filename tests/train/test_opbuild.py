"""DeepSpeed's start-up op builds on real processes: a dead build's lock never holds up a training
start, a live one is left alone, and a failed, stuck or foreign-held build is one line
(components/train/opbuild.py). Each test has a torch extensions folder of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.train import opbuild

REPO = Path(__file__).resolve().parents[2]
OP = "deepspeed_shm_comm"
START = """
from components.model import ModelConfig
from components.train.config import TrainConfig
from components.train.engine import build_engine
build_engine(ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=32, block_size=16),
             TrainConfig(steps=2, micro_batch=2, warmup_steps=1, eval_every=0))
print("STARTED")
"""
# a torch FileBaton held the way a build holds it (created, kept open) until the process ends
HOLD = "import sys, time; from torch.utils.file_baton import FileBaton; " \
       "assert FileBaton(sys.argv[1]).try_acquire(); print('held', flush=True); time.sleep(120)"


def _env(ext: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": str(ext), **extra}


def _opbuild(ext: Path, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "ops", *args], env=_env(ext, **extra),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _dead_lock(ext: Path) -> Path:
    """The lock a build killed mid-way leaves: torch's `lock` file, held by no one."""
    (ext / OP).mkdir(parents=True)
    lock = ext / OP / "lock"
    lock.touch()
    return lock


@pytest.fixture
def holder(tmp_path):
    """A live process holding <ext>/deepspeed_shm_comm/lock as a build does; SIGKILLed at the end."""
    lock = tmp_path / "ext" / OP / "lock"
    lock.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc, lock
    proc.kill()
    proc.wait()


def _compiler(tmp_path: Path, body: str) -> str:
    """A C++ compiler that answers torch's version probes (the real c++) and does `body` when asked
    to compile."""
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-c" ] && {{ {body}; }}; done\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    return str(cxx)


def test_a_dead_builds_lock_does_not_hold_up_a_training_start(tmp_path):
    lock = _dead_lock(tmp_path / "ext")
    proc = subprocess.run([sys.executable, "-c", START], env=_env(tmp_path / "ext"), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "STARTED" in proc.stdout, proc.stderr[-3000:]
    assert f"warning: train: removed {lock}, the lock of a {OP} build that was stopped" in proc.stderr
    assert not lock.exists()


def test_a_live_builds_lock_is_left_alone_and_removed_once_its_holder_is_gone(tmp_path, holder):
    proc, lock = holder
    out = _opbuild(tmp_path / "ext")
    assert out.returncode == 0 and f"{lock}: a build in progress (pid {proc.pid})" in out.stdout, out.stderr
    assert lock.exists()
    proc.send_signal(signal.SIGKILL)  # the build is killed mid-way: its lock stays behind
    proc.wait()
    assert lock.exists()
    out = _opbuild(tmp_path / "ext")
    assert out.returncode == 0 and out.stderr.startswith(f"warning: train: removed {lock}"), out.stderr
    assert not lock.exists()


def test_a_failed_build_is_one_line_naming_the_compilers_output(tmp_path):
    cxx = _compiler(tmp_path, 'echo "shm.cpp:1:1: error: this compiler refuses" >&2; exit 1')
    out = _opbuild(tmp_path / "ext", "--build", OP, CXX=cxx)
    log = tmp_path / "ext" / OP / opbuild.LOG_NAME
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"distillery: DeepSpeed's {OP} op failed to build (exit status 1); the compiler's output is in {log}; "
        f"fix what it says, then run `{sys.executable} -m pipelines.cli ops --build {OP}`"]
    assert "error: this compiler refuses" in log.read_text()
    assert not (tmp_path / "ext" / OP / "lock").exists()


def test_a_stuck_build_is_stopped_within_the_limit_in_one_line(tmp_path):
    cxx = _compiler(tmp_path, "exec sleep 300")
    t0 = time.monotonic()
    out = _opbuild(tmp_path / "ext", "--build", OP, CXX=cxx, DISTILLERY_OP_BUILD_TIMEOUT="6")
    assert time.monotonic() - t0 < 60
    log = tmp_path / "ext" / OP / opbuild.LOG_NAME
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"distillery: DeepSpeed's {OP} op did not finish building in 6 s (stopped; its output is in {log}); build it "
        f"alone with `{sys.executable} -m pipelines.cli ops --build {OP}` "
        f"($DISTILLERY_OP_BUILD_TIMEOUT sets the limit)"]
    assert not (tmp_path / "ext" / OP / "lock").exists()  # the next start does not wait on it
    left = subprocess.run(["pgrep", "-f", cxx], capture_output=True, text=True).stdout  # ninja's compilers too
    assert not left.strip(), left


def test_a_foreign_build_that_never_ends_is_one_line_naming_its_process(tmp_path, holder):
    proc, lock = holder
    out = _opbuild(tmp_path / "ext", "--build", OP, DISTILLERY_OP_BUILD_TIMEOUT="3")
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"distillery: {lock}: process {proc.pid} has held DeepSpeed's {OP} build lock for over 3 s; "
        f"stop it (kill {proc.pid}) or remove the lock (rm {lock}) and run again"]
    assert lock.exists() and proc.poll() is None  # a live build is never broken into


def test_the_build_folder_is_torchs(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert str(opbuild.build_dir(OP)) == _get_build_directory(OP, verbose=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert str(opbuild.build_dir(OP)) == _get_build_directory(OP, verbose=False) == str(tmp_path / OP)
