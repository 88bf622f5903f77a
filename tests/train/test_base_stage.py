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
