"""Shared serving fixtures: two tiny random model folders and ONE real tritonserver for the session.

The server is the real binary from the nvidia-pytriton wheel with the python backend (no mocks);
each test module exports under its own model name into the shared repository, so tests do not
disturb one another's versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from components.serve.config import ExportConfig, ServerConfig
from components.serve.export import export_repository
from components.serve.server import TritonServer

TEXTS = [f"{a} + {b} = {a + b} #### {a + b}" for a in range(12) for b in range(12)] + [
    "What is 3 * 4?", "The answer is 12.", "hello world"]
BLOCK = 64
EXPORT = ExportConfig(max_batch_size=8, max_queue_delay_us=2000, torch_threads=1, max_tokens_default=8,
                      max_tokens_limit=32)


def write_model_folder(folder: Path, seed: int) -> Path:
    """model.json, model.safetensors and tokenizer/ of a tiny random model (2 layers, width 32)."""
    from safetensors.torch import save_model

    from components.model import BPETokenizer, ModelConfig, Transformer

    tok = BPETokenizer.train(TEXTS, vocab_size=300, min_frequency=1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # sharper logits than the 0.02 init: greedy text then varies with prompt and seed
        model.lm_head.weight.mul_(20)
    folder.mkdir(parents=True)
    save_model(model, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n", encoding="utf-8")
    tok.save(folder / "tokenizer")
    (folder / "manifest.json").write_text(json.dumps({"step": "test", "seed": seed}) + "\n")
    return folder


@pytest.fixture(scope="session")
def export_cfg() -> ExportConfig:
    """The export settings of the session's repository (small limits, batching on)."""
    return EXPORT


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("models") / "a", seed=1)


@pytest.fixture(scope="session")
def other_model_folder(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("models") / "b", seed=2)


@pytest.fixture(scope="session")
def repository(tmp_path_factory, model_folder) -> Path:
    """The session's repository with version 1 of `distillery` exported from `model_folder`."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    export_repository(model_folder, repo, cfg=EXPORT)
    return repo


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    """One tritonserver for every serving test, `distillery_generate` and `_score` loaded."""
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(repository, ServerConfig(startup_timeout_s=60), log_path=log) as srv:
        srv.load("distillery_generate")
        srv.load("distillery_score")
        yield srv
