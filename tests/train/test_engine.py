"""The training engine on real DeepSpeed: exact resume after SIGKILL, outputs, convergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery_cli import launcher

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("train_script.py")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(out: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _curve(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r.get("val_loss")) for r in _metrics(out)]


def test_a_run_killed_mid_way_resumes_to_the_same_losses_and_parameters(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill it between checkpoints, past step 9
        if (killed / "metrics.jsonl").exists() and len(_metrics(killed)) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "model").exists()
    _run(killed)  # same command: resumes from the newest checkpoint
    assert _curve(killed) == _curve(straight)
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_and_learning(tmp_path):
    _run(tmp_path, "dense", "40")
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[-1]["val_loss"] < 0.6 * rows[0]["loss"]
    assert rows[1]["lr"] > rows[0]["lr"] and rows[-1]["lr"] < max(r["lr"] for r in rows)  # warm-up, then decay
    assert (tmp_path / "loss.png").stat().st_size > 0
    model = tmp_path / "model"
    assert json.loads((model / "model.json").read_text())["n_embd"] == 32
    assert {"model.safetensors", "model.json", "tokenizer", "manifest.json"} <= {p.name for p in model.iterdir()}
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 3  # keep_checkpoints
    # bf16 training exports DeepSpeed's fp32 master weights, not the bf16 compute copy
    weights = load_file(str(model / "model.safetensors"))
    w = weights["blocks.0.attn.c_attn.weight"]
    assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float())


def test_resuming_under_another_number_of_processes_is_refused(tmp_path):
    _run(tmp_path, "dense", "4")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    cmd = [sys.executable, *launcher(2), str(SCRIPT), str(tmp_path), "dense", "4"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert "written by 1 data-parallel processes and this run has 2" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("variant", ["moe", "hybrid"])
def test_other_variants_learn(tmp_path, variant):
    _run(tmp_path, variant, "24")
    rows = _metrics(tmp_path)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]


@pytest.mark.parametrize("procs", [1, 2])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path, procs):
    proc = subprocess.run([sys.executable, *([] if procs == 1 else launcher(procs)), str(REPO / "tests/train/fp16_script.py"), str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in range(procs):
        log = json.loads((tmp_path / f"fp16-rank{rank}.json").read_text())
        assert {r["dtype"] for r in log} == {"torch.float16"}
        initial = log[2]["scale"]
        assert initial == 2.0 ** 16 and log[2]["skipped"] == 0
        assert [r["skipped"] for r in log[3:]] == [1, 2, 2]
        assert [r["changed"] for r in log[2:]] == [True, False, False, True]  # overflowed steps skipped
        # one process: the scale halves at each overflow; ZeRO (hysteresis 2): after the second
        assert log[4]["scale"] < initial and log[4]["scale"] == log[5]["scale"]
        assert log[3]["scale"] == (initial / 2 if procs == 1 else initial)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["loss_scale"] > 0 and r["skipped_steps"] >= 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
