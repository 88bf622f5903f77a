"""GGUF files in (llama.cpp's format): a Llama or Qwen2 model's metadata as a Hugging Face config,
its tensors dequantized with the `gguf` package under Hugging Face's names (q and k rows put back
from llama.cpp's order), and its byte-level BPE vocabulary, merges, special tokens and chat
template as a Hugging Face tokenizer. components/model/hf.py imports the result like a folder.

    hf_config, tensors, tokenizer = read_gguf(Path("model.gguf"))
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch

from components.model.folder import HFImportError
from components.model.tokenizer import VOCAB_FILE, HFTokenizer


def _gguf_pre_tokenizer(pre: str | None):
    """The pre-tokenizer llama.cpp uses for a GGUF's tokenizer.ggml.pre (byte-level BPE)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # each digit its own piece, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    split = {"llama3": llama3, "llama-v3": llama3, "llama-bpe": llama3, "qwen2": qwen2}.get(pre)
    if split is None:
        raise HFImportError(f"tokenizer.ggml.pre {pre!r}: this GGUF's pre-tokenizer is not supported; "
                            f"supported: smollm, llama-bpe, qwen2, gpt2")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gguf_tokenizer(fields: dict, where: str) -> HFTokenizer:
    """A Hugging Face tokenizer (tokenizer.json and tokenizer_config.json texts) from a GGUF's
    byte-level BPE vocabulary, merges, special ids and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise HFImportError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (byte-level BPE, 'gpt2', only)")
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(fields.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3]
    if control:
        tok.add_special_tokens(control)

    def token(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
              "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
              "chat_template": fields.get("tokenizer.chat_template"), "tokenizer_class": "PreTrainedTokenizerFast"}
    files = {VOCAB_FILE: tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
    return HFTokenizer.from_files(files, where)


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q and k rows (its RoPE rotates adjacent pairs, transformers'
    the two halves of each head)."""
    return w.reshape(heads, w.size(0) // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


GGUF_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
              "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
              "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
              "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
              "attn_v.bias": "self_attn.v_proj.bias",
              "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
              "ffn_down.weight": "mlp.down_proj.weight"}


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], HFTokenizer]:
    """(Hugging Face config dict, Hugging Face tensors in fp32, tokenizer) of a llama or qwen2 GGUF
    file, its quantized tensors dequantized with the `gguf` package."""
    import numpy as np
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, struct.error) as err:
        raise HFImportError(f"{path}: not a readable GGUF file: {err}") from None
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we read
            continue
    arch = fields.get("general.architecture")
    families = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    if arch not in families:
        raise HFImportError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(families)}")

    def meta(key: str, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise HFImportError(f"{path}: no {arch}.{key} in the GGUF metadata")
        return value

    tok = _gguf_tokenizer(fields, str(path))
    n_head = int(meta("attention.head_count"))
    names = {t.name for t in reader.tensors}
    hf = {"architectures": [families[arch]], "model_type": arch, "hidden_act": "silu",
          "vocab_size": len(fields["tokenizer.ggml.tokens"]), "hidden_size": int(meta("embedding_length")),
          "intermediate_size": int(meta("feed_forward_length")), "num_hidden_layers": int(meta("block_count")),
          "num_attention_heads": n_head, "num_key_value_heads": int(meta("attention.head_count_kv", n_head)),
          "max_position_embeddings": int(meta("context_length", 2048)),
          "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
          "rope_theta": float(meta("rope.freq_base", 10000.0)), "tie_word_embeddings": "output.weight" not in names,
          "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
          "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"), "torch_dtype": "bfloat16"}
    if fields.get(f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise HFImportError(f"{path}: RoPE scaling {fields[f'{arch}.rope.scaling.type']!r} in a GGUF is not supported")
    from components.console import Progress

    n_kv = hf["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}
    bar = Progress(len(reader.tensors), f"import {path.name}", unit="tensor")
    for t in reader.tensors:
        bar.update()
        qtype = GGMLQuantizationType(t.tensor_type)
        try:
            array = np.asarray(dequantize(t.data, qtype), dtype=np.float32) if qtype not in (
                GGMLQuantizationType.F32, GGMLQuantizationType.F16) else np.asarray(t.data, dtype=np.float32)
        except NotImplementedError:
            raise HFImportError(f"{path}: tensor {t.name} is quantized as {qtype.name}, which the gguf package "
                                f"cannot dequantize") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        w = torch.from_numpy(array.reshape(shape).copy())
        if t.name == "token_embd.weight":
            tensors["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            tensors["model.norm.weight"] = w
        elif t.name == "output.weight":
            tensors["lm_head.weight"] = w
        elif (m := re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)) and m.group(2) in GGUF_NAMES:
            name = GGUF_NAMES[m.group(2)]
            if arch == "llama" and name.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                w = _unpermute(w, n_head if "q_proj" in name else n_kv)
            tensors[f"model.layers.{m.group(1)}.{name}"] = w
        elif t.name == "rope_freqs.weight":  # llama.cpp's form of Llama 3.1's RoPE scaling
            raise HFImportError(f"{path}: RoPE frequency factors (rope_freqs, Llama 3.1 scaling) in a GGUF are not "
                                f"supported; import the model's Hugging Face folder instead")
        else:
            raise HFImportError(f"{path}: unexpected tensor {t.name!r} for a {arch} GGUF")
    bar.close()
    return hf, tensors, tok
