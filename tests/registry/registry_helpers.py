"""Helpers of the registry tests: tiny model folders (real safetensors) and a snapshot of
everything a refused operation must leave unchanged."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


METRICS = {"accuracy": 0.41, "pass@1": 0.35, "format_rate": 0.99, "params": 1234, "size_bytes": 5678, "p95_ms": 12.5}


def make_model(folder: Path, seed: int = 0, metrics: dict | None = None, check: dict | None = None) -> Path:
    """A small model folder: model.json, model.safetensors, tokenizer/, metrics.json, check.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (folder / "model.json").write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 16}))
    save_file({"wte.weight": rng.standard_normal((16, 8), dtype=np.float32),
               "lm_head.weight": rng.standard_normal((16, 8), dtype=np.float32)}, str(folder / "model.safetensors"))
    tok = folder / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))
    (tok / "tokenizer_meta.json").write_text(json.dumps({"kind": "byte", "vocab_size": 16, "eos_id": 1, "pad_id": 0}))
    (folder / "metrics.json").write_text(json.dumps(metrics if metrics is not None else METRICS))
    (folder / "check.json").write_text(json.dumps(check if check is not None else {"passed": True, "p95_ms": 12.5}))
    return folder


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def snapshot(root: Path) -> dict:
    """HEAD, the index, every tag (name -> object), `git status`, and every work-tree file's hash."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".git":
            continue
        files[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return {"head": git(root, "rev-parse", "HEAD"), "index": git(root, "ls-files", "-s"),
            "tags": git(root, "for-each-ref", "refs/tags", "--format=%(refname) %(objectname)"),
            "status": git(root, "status", "--porcelain", "--ignored", "--untracked-files=all"), "files": files}
