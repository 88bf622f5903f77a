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


@pytest.mark.parametrize("variant", ["moe", "hybrid"])
def test_other_variants_learn(tmp_path, variant):
    _run(tmp_path, variant, "24")
    rows = _metrics(tmp_path)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
