"""The whole pipeline (kfp.local) from an imported model: `distillery run --base-model FOLDER` with a
tiny random-weight Qwen2 checkpoint saved by transformers; every stage, the INT8 model served by a
real tritonserver, and the result exported back to the Hugging Face layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from components.model.hf import HFImportError, download_hub, resolve_base_model
from distillery_cli import REPO, cli

pytest.importorskip("transformers")
sys.path.insert(0, str(REPO / "tests/model"))
from test_hf import make_checkpoint  # noqa: E402


def test_the_pipeline_runs_from_an_imported_model_to_triton_and_back(tmp_path):
    from transformers import AutoModelForCausalLM

    make_checkpoint("qwen2", tmp_path / "hf")
    proc = cli("run", "--out", str(tmp_path / "runs"), "--base-model", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = (tmp_path / "runs/latest").resolve()
    base = json.loads(next(run.glob("train-base/**/model/model.json")).read_text())
    assert (base["n_kv_head"], base["qkv_bias"], base["vocab_size"]) == (2, True, 300)  # the import, not scratch
    check = json.loads(next(run.glob("serve-check/**/check.json")).read_text())
    assert all(m["state"] == "READY" for m in check["models"].values())
    int8 = next(p.parent for p in run.glob("quantize/**/quantization.json"))
    proc = cli("model", "export-hf", str(int8), "--out", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "distillery_int8_dequantized" in config
    AutoModelForCausalLM.from_pretrained(tmp_path / "export")


def test_a_missing_base_model_is_one_line_before_any_step(tmp_path):
    proc = cli("run", "--out", str(tmp_path / "runs"), "--base-model", str(tmp_path / "nope"))
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "nope: no such file or folder" in proc.stderr and not (tmp_path / "runs").exists()


def test_hub_models_are_refused_offline_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HFImportError, match=r"hf://HuggingFaceTB/SmolLM2-135M: HF_HUB_OFFLINE is set.*give its folder"):
        resolve_base_model("hf://HuggingFaceTB/SmolLM2-135M", tmp_path)
    with pytest.raises(HFImportError, match="expected hf://organisation/name"):
        download_hub("hf://just-a-name", tmp_path)
    assert resolve_base_model("", tmp_path) is None
    assert not any(Path(tmp_path).iterdir())
