"""GGUF import (components/model/hf.py read_gguf) on small files written here with the `gguf`
package as llama.cpp's converter writes them (q and k rows permuted for its RoPE, byte-level BPE
vocabulary in the metadata): the logits equal the transformers model the file was made from;
quantization types the gguf package cannot dequantize, other architectures and RoPE frequency
tables are refused by name with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.model.folder import load_model
from components.model.hf import HFImportError, import_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}<|assistant|>"


def _byte_tokens() -> list[str]:
    from components.model.tokenizer import _bytes_to_unicode

    return list(_bytes_to_unicode().values()) + ["<eos>", "<pad>"] + [f"<unused{i}>" for i in range(42)]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of q/k rows (the inverse of ours)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, arch: str = "llama", bad_type: str | None = None, rope_freqs: bool = False) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    tokens = _byte_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3] + [1] * 42)
    writer.add_token_merges([])
    writer.add_eos_token_id(256)
    writer.add_pad_token_id(257)
    writer.add_chat_template(CHAT)
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        w = t.float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            out = f"blk.{layer}.{names[module]}.{kind}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                w = _permute(w, H if module.endswith("q_proj") else K)
        if bad_type and out == "blk.0.ffn_up.weight":  # raw blocks of a type gguf cannot dequantize
            qtype = gguf.GGMLQuantizationType[bad_type]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(out, raw, raw_shape=raw.shape, raw_dtype=qtype)
            continue
        writer.add_tensor(out, np.ascontiguousarray(w))
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", np.ones(cfg.head_dim // 2, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def test_a_gguf_imports_with_the_logits_of_the_model_it_was_made_from(reference, tmp_path):
    write_gguf(tmp_path / "m.gguf", reference)
    import_model(tmp_path / "m.gguf", tmp_path / "ours")
    model, tok = load_model(tmp_path / "ours")
    assert (model.cfg.n_kv_head, model.cfg.tie_embeddings) == (2, False)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((model(idx)[0] - reference(idx).logits).abs().max()) < 1e-5
    text = "héllo 12 + 30"
    assert tok.decode(tok.encode(text)) == text and tok.encode(text) == list(text.encode("utf-8"))
    assert tok.chat([{"role": "user", "content": "hi"}]) == "<|user|>hi<eos><|assistant|>"
    assert tok.eos_id == 256 and tok.pad_id == 257


@pytest.mark.parametrize("case, message", [
    ("Q8_1", r"m.gguf: tensor blk.0.ffn_up.weight is quantized as Q8_1, which the gguf package cannot dequantize"),
    ("arch", r"m.gguf: GGUF architecture 'gemma' is not supported"),
    ("rope_freqs", r"m.gguf: RoPE frequency factors \(rope_freqs"),
])
def test_unsupported_ggufs_are_refused_by_name_with_nothing_written(reference, tmp_path, case, message):
    write_gguf(tmp_path / "m.gguf", reference, arch="gemma" if case == "arch" else "llama",
               bad_type=case if case.startswith("Q") else None, rope_freqs=case == "rope_freqs")
    with pytest.raises(HFImportError, match=message):
        import_model(tmp_path / "m.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(HFImportError, match="not a readable GGUF"):
        (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
        import_model(tmp_path / "junk.gguf", tmp_path / "out")
