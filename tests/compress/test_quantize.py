"""INT8 weight-only quantization and the INT8 KV cache: the rounding bound, the swapped modules
against the float model, the artifact written and read back strictly, and QAT's fake quantizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from components.compress.quantize import FakeQuantLinear, fake_quantize
from components.model import ByteTokenizer, ModelConfig, Transformer
from components.model.folder import ModelFolderError, load_model, load_pretrained, save_quantized
from components.model.int8 import (
    Int8LayerCache, QuantLinear, dequantize_rows, quantizable, quantize_model, quantize_rows, weight_bytes,
)


def tiny(ffn: str = "dense", tie: bool = True, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"vocab_size": 258, "n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 40, "ffn": ffn,
                         "tie_embeddings": tie, **kw})
    return Transformer(cfg).eval()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 33), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 10_000))
def test_rows_round_to_within_half_a_step(rows, cols, scale, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (rows,)
    assert int(q.abs().max()) <= 127
    err = (w - dequantize_rows(q, s)).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    # each row's largest magnitude lands on +-127: the whole int8 range is used
    assert bool((q.abs().amax(dim=1) == 127).all())


def test_zero_rows_stay_zero():
    q, s = quantize_rows(torch.zeros(3, 5))
    assert torch.equal(q, torch.zeros(3, 5, dtype=torch.int8)) and bool((s > 0).all())


@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 3, 48)])
def test_quant_linear_is_the_dequantized_matmul(shape):
    lin = torch.nn.Linear(48, 37, bias=False)
    q = QuantLinear.from_linear(lin)
    x = torch.randn(*shape)
    ref = F.linear(x, dequantize_rows(q.weight_int8, q.scale))
    torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)
    assert q(x).shape == (*shape[:-1], 37)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_quantized_model_tracks_the_float_model(ffn):
    model = tiny(ffn)
    q, spec = quantize_model(model)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in spec["modules"])  # original untouched
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in spec["modules"])
    if ffn == "moe":
        assert not any(n.endswith("router") for n in spec["modules"])
    x = torch.randint(0, 258, (3, 23))
    a, _ = model(x)
    b, _ = q(x)
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    # greedy decoding with the INT8 cache agrees with the float model on nearly every token
    g_f = model.generate(x[:, :4], 20, temperature=0)
    g_q = q.generate(x[:, :4], 20, temperature=0)
    assert (g_f == g_q).float().mean() > 0.9


def test_weights_shrink_about_fourfold():
    model = tiny(n_embd=128, block_size=32)
    q, _ = quantize_model(model)
    ratio = weight_bytes(model) / weight_bytes(q)
    assert 3.5 <= ratio < 4.0  # int8 + one fp32 scale per row, the norms stay fp32


def test_int8_kv_cache_matches_a_full_forward():
    q, _ = quantize_model(tiny())
    x = torch.randint(0, 258, (2, 30))
    full, _ = q(x)
    cache = q.new_cache(2)
    assert isinstance(cache.layers[0], Int8LayerCache)
    parts = [q(x[:, :11], cache=cache)[0]] + [q(x[:, t:t + 1], cache=cache)[0] for t in range(11, 30)]
    stepped = torch.cat(parts, dim=1)
    torch.testing.assert_close(stepped, full, rtol=0, atol=0.02 * float(full.detach().abs().max()))
    layer = cache.layers[0]
    fp32_bytes = 2 * layer.k.numel() * 4
    d = q.cfg.head_dim  # per (token, head): d int8 values and one fp32 scale, against d fp32 values
    assert fp32_bytes / layer.nbytes() == pytest.approx(4 * d / (d + 4))


def test_cache_refuses_overflow():
    cache = Int8LayerCache(1, 2, 4, 8, torch.float32, "cpu")
    cache.append(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="KV cache full"):
        cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))


@pytest.fixture
def saved(tmp_path):
    model = tiny()
    q, spec = quantize_model(model)
    save_quantized(q, spec, ByteTokenizer(), tmp_path)
    return tmp_path, model, q


def test_artifact_round_trips_through_load_model(saved):
    folder, _, q = saved
    spec = json.loads((folder / "quantization.json").read_text())
    assert spec["kv_cache"] == "int8" and spec["embedding"] is True
    state = load_file(str(folder / "model.safetensors"))
    assert state["blocks.0.attn.c_attn.weight_int8"].dtype == torch.int8
    assert "lm_head.weight" not in state and "wte.weight" not in state  # the tied head is the int8 embedding
    loaded, tok = load_model(folder)  # dispatches on quantization.json
    x = torch.randint(0, 258, (2, 17))
    assert torch.equal(loaded(x)[0], q(x)[0])
    assert tok.vocab_size == 258


def test_training_refuses_a_quantized_folder(saved):
    with pytest.raises(ModelFolderError, match="INT8-quantized"):
        load_pretrained(saved[0])


def test_tampered_artifacts_are_refused_naming_the_file(saved):
    folder = saved[0]
    spec = json.loads((folder / "quantization.json").read_text())
    (folder / "quantization.json").write_text(json.dumps({**spec, "modules": spec["modules"] + ["blocks.9.x"]}))
    with pytest.raises(ModelFolderError, match="quantization.json"):
        load_model(folder)
    (folder / "quantization.json").write_text(json.dumps(spec))
    state = load_file(str(folder / "model.safetensors"))
    state["blocks.0.attn.c_attn.weight_int8"] = state["blocks.0.attn.c_attn.weight_int8"].float()  # not int8
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError, match="model.safetensors.*does not match"):
        load_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x80\x04not safetensors")  # e.g. a pickle
    with pytest.raises(ModelFolderError, match="not a readable safetensors"):
        load_model(folder)


def test_a_pretrained_models_shapes_quantize_and_load_back(tmp_path):
    """Grouped-query attention, q/k/v and output biases (kept float) and an untied head (an INT8
    linear of its own beside the INT8 embedding): saved, loaded, and close to the float model."""
    model = tiny(tie=False, n_head=4, n_kv_head=2, qkv_bias=True, out_bias=True)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_attn.bias.normal_(0, 0.5)
            block.attn.c_proj.bias.normal_(0, 0.5)
    q, spec = quantize_model(model)
    assert type(q.lm_head) is QuantLinear and q.lm_head.weight_int8.data_ptr() != q.wte.weight_int8.data_ptr()
    assert q.blocks[0].attn.c_attn.bias.dtype == torch.float32
    save_quantized(q, spec, ByteTokenizer(), tmp_path)
    loaded, _ = load_model(tmp_path)
    idx = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got, back = model(idx)[0], q(idx)[0], loaded(idx)[0]
    assert torch.equal(got, back)
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_untied_embedding_quantization_can_be_left_float():
    q, spec = quantize_model(tiny(tie=False), embedding=False)
    assert type(q.lm_head) is torch.nn.Linear and type(q.wte) is torch.nn.Embedding
    assert len(spec["modules"]) == 2 * 5 and quantizable(q) == []  # every block linear is INT8 now


def test_fake_quant_forward_is_int8_and_gradient_is_straight_through():
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 8, bias=False)
    fq = FakeQuantLinear(16, 8, bias=False)
    fq.weight = lin.weight
    x = torch.randn(5, 16)
    torch.testing.assert_close(fq(x), QuantLinear.from_linear(lin)(x), rtol=1e-4, atol=1e-5)
    fq(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(5, 8).T @ x)  # d/dW of sum(x W^T), as if unrounded


def test_fake_quantize_keeps_state_dict_keys():
    model = tiny()
    keys = set(model.state_dict())
    fake_quantize(model)
    assert set(model.state_dict()) == keys
    assert isinstance(model.blocks[0].attn.c_attn, FakeQuantLinear)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_embd", [48, 40])  # 40: not a multiple of 16 (torch's CPU bf16 kernel is wrong there)
def test_low_precision_generation_matches_the_fp32_int8_model(dtype, n_embd):
    q, _ = quantize_model(tiny(n_embd=n_embd))
    x = torch.randint(0, 258, (2, 9))
    ref, _ = q(x)
    low = copy.deepcopy(q).to(dtype)
    assert low.blocks[0].attn.c_attn.scale.dtype == torch.float32  # scales stay fp32 when the model is cast
    logits, _ = low(x)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), ref, rtol=0, atol=0.05 * float(ref.detach().abs().max()))
    out = low.generate(x[:, :3], 6, temperature=0)  # the INT8 cache, the embedding and the head in `dtype`
    assert out.shape == (2, 9)


def test_int8_model_exports_to_onnx_and_matches_onnxruntime(saved, tmp_path):
    from components.serve.export import export_onnx

    folder = saved[0]
    path = export_onnx(folder, tmp_path / "score.onnx")  # verifies against torch with onnxruntime itself
    import onnx

    graph = onnx.load(str(path)).graph
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)  # weights stay int8


def test_quantize_refuses_an_int8_folder_and_data_without_test_rows(saved, tmp_path):
    from components.compress.config import QuantizeConfig
    from components.compress.quantize import run
    from components.data.load import DataError

    with pytest.raises(ModelFolderError, match="already INT8"):
        run(QuantizeConfig(), saved[0], None, tmp_path / "again")
    with pytest.raises(DataError, match="test.jsonl"):
        run(QuantizeConfig(), saved[0].parent, tmp_path, tmp_path / "out")
    assert not (tmp_path / "again").exists() and not (tmp_path / "out").exists()
