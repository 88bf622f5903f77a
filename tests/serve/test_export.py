"""serve.export without a server: repository layout, config.pbtxt, version numbers, atomicity,
the backend's request validation helpers, and the ONNX scoring graph against torch (onnxruntime)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from components.serve.errors import ExportError
from components.serve import export as ex
from components.serve.config import ExportConfig
from components.serve.triton_model import RequestError, generate_params, score_ids


def _entries(repo):
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))


def test_layout_config_and_next_free_versions(tmp_path, model_folder, export_cfg):
    repo = tmp_path / "repo"
    ex.export_repository(model_folder, repo, cfg=export_cfg)
    ex.export_repository(model_folder, repo, cfg=export_cfg)
    for kind in ("generate", "score"):
        mdir = repo / f"distillery_{kind}"
        assert ex.versions(mdir) == [1, 2]
        for v in (1, 2):
            vdir = mdir / str(v)
            assert (vdir / "model.py").read_text() == ex.BACKEND_SOURCE.read_text()
            assert {p.name for p in (vdir / "model_folder").iterdir()} == {p.name for p in model_folder.iterdir()}
            copied = (vdir / "model_folder/model.safetensors").read_bytes()
            assert copied == (model_folder / "model.safetensors").read_bytes()
        config = text_format.Parse((mdir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert config.name == f"distillery_{kind}" and config.backend == "python"
        assert config.max_batch_size == export_cfg.max_batch_size
        assert config.dynamic_batching.max_queue_delay_microseconds == export_cfg.max_queue_delay_us
        assert config.version_policy.latest.num_versions == 1
        assert config.parameters["kind"].string_value == kind
    gen = text_format.Parse((repo / "distillery_generate/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in gen.input] == [
        ("text_input", "TYPE_STRING", [1])]
    sco = text_format.Parse((repo / "distillery_score/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in sco.output] == [
        ("logprobs", "TYPE_FP32", [-1])]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_explicit_version_and_no_overwrite(tmp_path, model_folder, export_cfg):
    repo = tmp_path / "repo"
    ex.export_repository(model_folder, repo, version=5, cfg=export_cfg)
    ex.export_repository(model_folder, repo, cfg=export_cfg)
    assert ex.versions(repo / "distillery_score") == [5, 6]
    with pytest.raises(ExportError, match="never overwritten"):
        ex.export_repository(model_folder, repo, version=6, cfg=export_cfg)
    no_batching = ExportConfig(dynamic_batching=False)
    ex.export_repository(model_folder, repo, name="plain", cfg=no_batching)
    config = text_format.Parse((repo / "plain_score/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert not config.HasField("dynamic_batching")


def test_a_failed_export_leaves_nothing_half_written(tmp_path, model_folder, export_cfg, monkeypatch):
    repo = tmp_path / "repo"
    ex.export_repository(model_folder, repo, cfg=export_cfg)
    before = _entries(repo)

    real_write = ex._write_version

    def fail_on_score(stage, kind, *args):
        real_write(stage, kind, *args)
        if kind == "score":
            raise OSError("disk full (injected)")

    monkeypatch.setattr(ex, "_write_version", fail_on_score)
    with pytest.raises(OSError, match="injected"):
        ex.export_repository(model_folder, repo, cfg=export_cfg)
    assert _entries(repo) == before
    monkeypatch.undo()

    real_replace, calls = os.replace, []

    def fail_second_commit(src, dst):  # generate's version is already renamed in when score's fails
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", fail_second_commit)
    with pytest.raises(OSError, match="injected"):
        ex.export_repository(model_folder, repo, cfg=export_cfg)
    monkeypatch.undo()
    assert _entries(repo) == before
    ex.export_repository(model_folder, repo, cfg=export_cfg)  # and the next export works
    assert ex.versions(repo / "distillery_generate") == ex.versions(repo / "distillery_score") == [1, 2]


def test_not_a_model_folder_is_refused(tmp_path, model_folder):
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / "model.json").unlink()
    with pytest.raises(ValueError, match="model.json"):
        ex.export_repository(broken, tmp_path / "repo")
    assert not (tmp_path / "repo" / "distillery_generate").exists()


def test_request_validation_helpers():
    assert generate_params('{"max_tokens": 4, "temperature": 0.5, "seed": 3}', 8, 16) == (4, 0.5, 3)
    assert generate_params(None, 8, 16) == (8, 0.0, None)
    for bad in ({"max_tokens": 17}, {"max_tokens": 0}, {"max_tokens": "4"}, {"temperature": "hot"},
                {"temperature": -1}, {"seed": -2}, {"max_token": 4}, {"temperature": True}):
        with pytest.raises(RequestError):
            generate_params(bad, 8, 16)
    ok = np.zeros((2, 5), dtype=np.int64)
    assert score_ids(ok, vocab_size=10, block_size=8) is ok
    for bad in (np.zeros((1, 1), np.int64), np.zeros((1, 9), np.int64), np.full((1, 3), 10, np.int64),
                np.full((1, 3), -1, np.int64), np.zeros((1, 3), np.int32), np.zeros(3, np.int64)):
        with pytest.raises(RequestError):
            score_ids(bad, vocab_size=10, block_size=8)


def test_onnx_scoring_graph_matches_torch(tmp_path, model_folder, export_cfg):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    summary = ex.run(dataclasses.replace(export_cfg, onnx=True), model_folder, tmp_path / "repo")
    path = tmp_path / "repo/distillery_score/1/model.onnx"
    assert summary["version"] == 1 and summary["onnx"] == str(path) and path.is_file()
    assert not (tmp_path / "repo/distillery_generate/1/model.onnx").exists()
    err = ex.verify_onnx(model_folder, path, shapes=((1, 2), (4, 13), (2, 0)), seed=7)  # 0: block_size
    assert err < 1e-4, err
    # a graph that does not match the model is caught: verify against the other weights
    with pytest.raises(ValueError, match="differs from torch"):
        _verify_against(path, tmp_path, model_folder)


def _verify_against(onnx_path, tmp_path, model_folder):
    """export_onnx's own check, run on a folder whose weights differ from the graph's."""
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(model_folder, other)
    state = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}, str(other / "model.safetensors"))
    err = ex.verify_onnx(other, onnx_path)
    if err > 1e-4:
        raise ValueError(f"differs from torch by {err}")
