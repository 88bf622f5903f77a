"""`distillery train --stage base` end to end through the CLI, in a subprocess (DeepSpeed sets
up its process group there, not in the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from components.data.config import GenerateConfig
from components.data.generate import generate
from components.data.load import write_jsonl

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ARGS = ["--preset", "tiny", "--set", "tokenizer={kind: bpe, vocab_size: 300}", "--set", "train.steps=6",
        "--set", "train.checkpoint_every=3", "--set", "train.eval_every=3"]


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--stage", "base", "--data", str(data), "--out", str(out)]
    return subprocess.run(cmd + ARGS + list(extra), env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_train_resume_keeps_the_tokenizer_and_refuses_foreign_folders(tmp_path):
    rows, _ = generate(GenerateConfig(rows=120, noise=0.0))
    data = tmp_path / "split"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:100]])
    write_jsonl(data / "val.jsonl", rows[100:])
    out = tmp_path / "base"
    first = _train(data, out)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "train.base" and manifest["metrics"]["steps"] == 6
    vocab = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert (out / "model" / "tokenizer" / "tokenizer.json").read_bytes() == vocab
    stamp = (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns

    again = _train(data, out)  # same parameters: resumes (at the end), the tokenizer is not retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == stamp
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["val_loss"] > 0  # the logged validation loss, though no step ran

    changed = _train(data, out, "--set", "train.lr=0.01")
    assert changed.returncode == 2 and "other model or train parameters" in changed.stderr

    write_jsonl(data / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:99]])  # one row fewer
    other_data = _train(data, out)
    assert other_data.returncode == 2 and "training data" in other_data.stderr
    assert json.loads((out / "manifest.json").read_text()) == manifest  # nothing rewritten

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff")
    refused = _train(data, foreign)
    assert refused.returncode == 1 and "no manifest.json" in refused.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


def _split(tmp_path: Path) -> Path:
    rows, _ = generate(GenerateConfig(rows=120, noise=0.0))
    data = tmp_path / "split"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:100]])
    write_jsonl(data / "val.jsonl", rows[100:])
    return data


def test_a_damaged_newest_checkpoint_is_set_aside_and_training_ends_as_if_it_never_was(tmp_path):
    from components.artifacts import hold

    data, out = _split(tmp_path), tmp_path / "base"
    assert _train(data, out).returncode == 0
    straight = (out / "model" / "model.safetensors").read_bytes()
    newest = out / "checkpoints" / "step-00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short, as a full disk or a lost page leaves it
    with hold(out):  # another process holds the folder: refused at once, nothing touched
        busy = _train(data, out)
    assert busy.returncode == 1 and f"in use by process {os.getpid()}" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and newest.is_dir()
    again = _train(data, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000006: damaged, model.safetensors does not match its recorded hash" in again.stderr
    assert "resuming from" in again.stderr and "step-00000003" in again.stderr
    assert (out / "checkpoints" / ".damaged-step-00000006").is_dir()
    assert (out / "model" / "model.safetensors").read_bytes() == straight  # steps 4-6 again, bit for bit
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
