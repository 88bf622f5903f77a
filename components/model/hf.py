"""Hugging Face checkpoints in and out: the Llama family (LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM) as transformers defines it, and GGUF files of it.

    import_model("path/to/hf-folder", "models/qwen")     # or a .gguf file (gguf_file.py); writes a model folder
    export_hf("runs/finetune/model", "exports/hf")       # what AutoModelForCausalLM.from_pretrained reads

The mapping is exact: a Hugging Face model's q/k/v projections are concatenated into our fused
`c_attn` (query rows, then key rows, then value rows), every other tensor is renamed; export splits
and renames back, in the checkpoint's own dtype, so import then export gives the same bits.

Only safetensors are read, and no checkpoint code is run: a pytorch_model.bin (a pickle) and a
config.json that asks for its own code (auto_map) are refused by name, and so is every
architecture, activation, bias or RoPE scaling this mapping does not cover. Nothing is written
unless the whole import or export succeeds (components.artifacts.atomic_dir).

The imported model folder is an ordinary one (model.json, model.safetensors in fp32, tokenizer/);
its tokenizer/ also keeps the checkpoint's config.json and generation_config.json, so every stage
hands them on and the export writes the same architecture back.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from components.model.config import ModelConfig
from components.model.folder import HFImportError, ModelFolderError, load_model
from components.model.tokenizer import VOCAB_FILE, HFTokenizer, as_hf_tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
ROPE_TYPES = {"default", "linear", "llama3"}
MAX_SEQ_LEN = 8192
"""The longest context an import keeps by default (block_size): the RoPE tables and the KV cache
are sized by it; `--max-seq-len` raises it up to the checkpoint's max_position_embeddings."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 2 * 1024 ** 3
"""Export: the most bytes of tensors per safetensors file (transformers' default is 5 GB; 2 GB
keeps every shard under the 2 GiB that some readers and object stores handle in one piece)."""


# ---- config ---------------------------------------------------------------------------------------

def config_from_hf(hf: dict, where: str, max_seq_len: int = MAX_SEQ_LEN) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (dict); refuses what the mapping does not cover."""
    def fail(message: str):
        raise HFImportError(f"{where}: {message}")

    if hf.get("auto_map") or hf.get("trust_remote_code"):
        fail("asks for the checkpoint's own code (auto_map); distillery never runs remote code. "
             "Supported: " + ", ".join(ARCHITECTURES))
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    family = ARCHITECTURES.get(arch) if arch else None
    if family is None or hf.get("model_type", family) != family:
        fail(f"architecture {arch or hf.get('model_type')!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def num(key: str, default=None, kind=int):
        value = hf.get(key, default)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or (kind is int and value != int(value)):
            fail(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {str(value)[:40]!r}")
        return kind(value)

    if hf.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    if hf.get("mlp_bias"):
        fail("mlp_bias: feed-forward biases are not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        fail("use_sliding_window: Qwen2's per-layer sliding window is not supported")
    n_embd, n_head = num("hidden_size"), num("num_attention_heads")
    head_dim = num("head_dim", 0) if hf.get("head_dim") is not None else n_embd // max(n_head, 1)
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(scaling, dict) or not isinstance(rope, dict):
        fail("rope_scaling: expected a mapping")
    rope.update(scaling)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        fail(f"rope_scaling: rope type {rope_type!r} is not supported; supported: {', '.join(sorted(ROPE_TYPES))}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    max_pos = num("max_position_embeddings", 2048)
    window = hf.get("sliding_window", 4096) if family == "mistral" else None  # transformers' default
    attention_bias = bool(hf.get("attention_bias", False))
    try:
        cfg = ModelConfig(
            vocab_size=num("vocab_size"), n_layer=num("num_hidden_layers"), n_head=n_head,
            n_kv_head=num("num_key_value_heads", n_head), n_embd=n_embd,
            head_size=head_dim if head_dim * n_head != n_embd else 0,
            block_size=min(max_pos, max_seq_len), ffn_hidden=num("intermediate_size"),
            qkv_bias=family == "qwen2" or attention_bias, out_bias=attention_bias,
            sliding_window=int(window) if isinstance(window, int) and window < min(max_pos, max_seq_len) else 0,
            rope_theta=float(theta), rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", max_pos)),
            norm_eps=num("rms_norm_eps", 1e-6, float), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dropout=0.0,
        )
        cfg.check()
    except HFImportError:
        raise
    except (ValueError, TypeError, OverflowError) as err:  # a number of the wrong kind or out of range
        fail(str(err))
    return cfg


def config_to_hf(cfg: ModelConfig, original: dict | None, dtype: str) -> dict:
    """A config.json for `cfg`: the imported checkpoint's own (its other keys kept) with our sizes
    written over it, or a new LlamaForCausalLM one for a model trained here."""
    if cfg.ffn != "dense" or cfg.attention != "dense":
        raise ModelFolderError(f"model.json: ffn {cfg.ffn!r} / attention {cfg.attention!r} have no Hugging Face "
                               f"Llama equivalent (export needs ffn dense and attention dense)")
    hf = dict(original or {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"})
    family = ARCHITECTURES.get((hf.get("architectures") or ["LlamaForCausalLM"])[0], "llama")
    biases = {"llama": {(False, False), (True, True)},  # attention_bias sets q, k, v and o together
              "qwen2": {(True, False)}, "mistral": {(False, False)}}[family]
    if (cfg.qkv_bias, cfg.out_bias) not in biases:
        raise ModelFolderError(f"model.json: qkv_bias {cfg.qkv_bias} with out_bias {cfg.out_bias} cannot be "
                               f"written as a {family} config")
    hf.update(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta, torch_dtype=dtype,
    )
    layer_types = hf.get("layer_types")  # per-layer lists follow the depth (a distilled student is shallower)
    if isinstance(layer_types, list) and len(layer_types) != cfg.n_layer:
        if len(set(layer_types)) > 1:
            raise ModelFolderError(f"config.json: layer_types differ per layer {layer_types[:4]}..., and this model "
                                   f"has {cfg.n_layer} layers instead of {len(layer_types)}")
        hf["layer_types"] = layer_types[:1] * cfg.n_layer
    hf.setdefault("max_position_embeddings", cfg.block_size)
    hf.pop("rope_parameters", None)
    hf.pop("dtype", None)
    if family == "llama":
        hf["attention_bias"] = cfg.qkv_bias
    if family == "mistral":
        hf.setdefault("sliding_window", cfg.sliding_window or None)
    if cfg.rope_type == "default":
        hf["rope_scaling"] = None
    else:
        hf["rope_scaling"] = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
        if cfg.rope_type == "llama3":
            hf["rope_scaling"].update(low_freq_factor=cfg.rope_low_freq_factor,
                                      high_freq_factor=cfg.rope_high_freq_factor,
                                      original_max_position_embeddings=cfg.rope_original_max_position)
    return hf


# ---- tensors --------------------------------------------------------------------------------------

_RENAME = {
    "input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
    "mlp.gate_proj.weight": "ffn.w_gate.weight", "mlp.up_proj.weight": "ffn.w_up.weight",
    "mlp.down_proj.weight": "ffn.c_proj.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer that old checkpoints saved


def hf_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of `cfg` holds, with its shape."""
    C, D, H, K = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.kv_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, C), "model.norm.weight": (C,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, C)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                    p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (K * D, C),
                    p + "self_attn.v_proj.weight": (K * D, C), p + "self_attn.o_proj.weight": (C, H * D),
                    p + "mlp.gate_proj.weight": (cfg.hidden, C), p + "mlp.up_proj.weight": (cfg.hidden, C),
                    p + "mlp.down_proj.weight": (C, cfg.hidden)})
        if cfg.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (H * D,), p + "self_attn.k_proj.bias": (K * D,),
                        p + "self_attn.v_proj.bias": (K * D,)})
        if cfg.out_bias:
            out[p + "self_attn.o_proj.bias"] = (C,)
    return out


def hf_to_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) from a Hugging Face checkpoint's tensors (already checked by name and shape)."""
    state = {"wte.weight": tensors["model.embed_tokens.weight"], "ln_f.weight": tensors["model.norm.weight"]}
    state["lm_head.weight"] = state["wte.weight"] if cfg.tie_embeddings else tensors["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        for theirs, ours in _RENAME.items():
            if p + theirs in tensors:
                state[q + ours] = tensors[p + theirs]
        state[q + "attn.c_attn.weight"] = torch.cat([tensors[f"{p}self_attn.{n}.weight"] for n in _QKV])
        if cfg.qkv_bias:
            state[q + "attn.c_attn.bias"] = torch.cat([tensors[f"{p}self_attn.{n}.bias"] for n in _QKV])
    return {k: v.float() for k, v in state.items()}


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Hugging Face checkpoint's tensors (in `dtype`) from our float state dict."""
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        for theirs, ours in _RENAME.items():
            if q + ours in state:
                out[p + theirs] = state[q + ours]
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            parts = state[f"{q}attn.c_attn.{kind}"].split((H * D, K * D, K * D))
            out.update({f"{p}self_attn.{n}.{kind}": t for n, t in zip(_QKV, parts)})
    return {k: v.detach().to(dtype).contiguous() for k, v in out.items()}


def read_safetensors(src: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors from model.safetensors or the shards of model.safetensors.index.json,
    each checked against the names and shapes that config.json implies."""
    from safetensors import SafetensorError, safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise HFImportError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
        if pickles:
            raise HFImportError(f"{src / pickles[0]}: a PyTorch pickle; distillery never unpickles checkpoints. "
                                f"Convert it to safetensors first (transformers: model.save_pretrained(dir, "
                                f"safe_serialization=True), in an environment you trust)")
        raise HFImportError(f"{src}: no model.safetensors or model.safetensors.index.json")
    from components.console import Progress

    expected = hf_names(cfg)
    tensors: dict[str, torch.Tensor] = {}
    bar = Progress(len(expected), f"import {src.name}", unit="tensor")
    for name in files:
        path = src / name
        if Path(name).name != name or not path.is_file():
            raise HFImportError(f"{path}: a shard named by the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if _IGNORED.match(key) or (key == "lm_head.weight" and cfg.tie_embeddings):
                        continue
                    if key not in expected:
                        raise HFImportError(f"{path}: unexpected tensor {key!r} for this config.json "
                                            f"(another architecture, or more layers than num_hidden_layers?)")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise HFImportError(f"{path}: tensor {key} has shape {shape}, config.json implies "
                                            f"{expected[key]}")
                    tensors[key] = f.get_tensor(key)
                    bar.update()
        except SafetensorError as err:
            raise HFImportError(f"{path}: not a readable safetensors file: {err}") from None
    bar.close()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise HFImportError(f"{src}: {len(missing)} tensors missing, e.g. {missing[0]} (a missing shard?)")
    return tensors


# ---- import and export ---------------------------------------------------------------------------

HUB = "hf://"
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
"""What a Hub download fetches: configs, safetensors weights, the tokenizer; never *.bin or code."""


def resolve_base_model(source: str, work: str | os.PathLike) -> Path | None:
    """The model folder a pipeline's `base_model` names: "" -> None (train from scratch); one of
    our model folders (model.json) -> itself; a Hugging Face folder or .gguf file (a mounted volume)
    -> imported into `work`/imported; hf://org/name[@revision] -> downloaded from the Hugging Face
    Hub (token: $HF_TOKEN, from a Kubernetes Secret on a cluster) into `work`/hub, then imported."""
    source = source.strip()
    if not source:
        return None
    work = Path(work)
    if source.startswith(HUB):
        source = str(download_hub(source, work / "hub"))
    path = Path(source)
    if path.is_dir() and (path / "model.json").is_file():
        return path
    return import_model(path, work / "imported")


def download_hub(uri: str, dest: Path) -> Path:
    """Download hf://org/name[@revision] (safetensors, configs and tokenizer only) into `dest`."""
    repo, _, revision = uri[len(HUB):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HFImportError(f"{uri}: expected hf://organisation/name[@revision]")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise HFImportError(f"{uri}: HF_HUB_OFFLINE is set, so nothing is downloaded; download the model elsewhere "
                            f"and give its folder (a mounted volume) instead")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=revision or None, local_dir=dest,
                                      allow_patterns=HUB_FILES, token=os.environ.get("HF_TOKEN") or None))
    except Exception as err:  # the hub client raises many kinds: offline, 401, 404, timeouts
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise HFImportError(f"{uri}: cannot download from the Hugging Face Hub ({reason}); offline machines: "
                            f"download the model elsewhere and give its folder instead; private models: set "
                            f"HF_TOKEN (on a cluster, the cluster.hf_secret Secret)") from None

def read_checkpoint(src: str | os.PathLike, max_seq_len: int = MAX_SEQ_LEN) -> tuple[ModelConfig, dict, HFTokenizer, dict]:
    """(our config, our fp32 state dict, tokenizer, the Hugging Face config dict) of a Hugging Face
    model folder or a GGUF file; every problem is an HFImportError naming the file."""
    src = Path(src)
    if not src.exists():
        raise HFImportError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix != ".gguf":
            raise HFImportError(f"{src}: give a Hugging Face model folder or a .gguf file")
        from components.model.gguf_file import read_gguf

        hf, tensors, tok = read_gguf(src)
        tok.keep_file("config.json", json.dumps(hf, indent=2))
        cfg = config_from_hf(hf, str(src), max_seq_len)
        expected = hf_names(cfg)
        for key, shape in expected.items():
            if key not in tensors:
                raise HFImportError(f"{src}: no tensor for {key}")
            if tuple(tensors[key].shape) != shape:
                raise HFImportError(f"{src}: tensor {key} has shape {tuple(tensors[key].shape)}, the metadata "
                                    f"implies {shape}")
        return cfg, hf_to_state(tensors, cfg), tok, hf
    config_path = src / "config.json"
    if not config_path.is_file():
        hint = "; it is a distillery model folder already: every stage takes it as it is" \
            if (src / "model.json").is_file() else ""
        raise HFImportError(f"{src}: not a Hugging Face model folder (no config.json){hint}")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
        assert isinstance(hf, dict)
    except (ValueError, AssertionError):
        raise HFImportError(f"{config_path}: not a JSON object") from None
    cfg = config_from_hf(hf, str(config_path), max_seq_len)
    try:
        tok = HFTokenizer.load(src)
    except (OSError, ValueError) as err:
        raise HFImportError(f"{src}: tokenizer: {err}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise HFImportError(f"{src / VOCAB_FILE}: {tok.vocab_size} token ids, more than the vocab_size "
                            f"{cfg.vocab_size} of config.json")
    tensors = read_safetensors(src, cfg)
    return cfg, hf_to_state(tensors, cfg), tok, hf


def import_model(src: str | os.PathLike, out: str | os.PathLike, max_seq_len: int = MAX_SEQ_LEN) -> Path:
    """Write the model folder of a Hugging Face checkpoint or GGUF file `src` to `out`, atomically."""
    from components.artifacts import atomic_dir, write_json
    from components.model.folder import save_model

    cfg, state, tok, hf = read_checkpoint(src, max_seq_len)
    with atomic_dir(out, inputs=(src,)) as tmp:
        save_model(tmp, state, cfg, tok)
        write_json(tmp / "manifest.json", {"step": "import", "source": str(src), "architecture": hf["architectures"][0],
                                           "parameters": sum(v.numel() for k, v in state.items()
                                                             if not (cfg.tie_embeddings and k == "lm_head.weight"))})
    return Path(out)


def export_hf(model_folder: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
              shard_bytes: int = SHARD_BYTES) -> Path:
    """Write any stage's model folder as a Hugging Face one (config.json, generation_config.json,
    safetensors sharded by size with an index, the tokenizer files and chat template) to `out`,
    atomically. An INT8 folder is dequantized (said so in config.json). `dtype`: the checkpoint's
    own (imported models), else float32."""
    from safetensors.torch import save_file

    from components.artifacts import atomic_dir, write_json
    from components.model.int8 import dequantized_state

    folder = Path(model_folder)
    model, tok = load_model(folder)
    original = None
    if isinstance(tok, HFTokenizer) and tok.file("config.json"):  # an imported model's own config
        original = json.loads(tok.file("config.json"))
    dtype = dtype or (original or {}).get("torch_dtype") or (original or {}).get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ModelFolderError(f"{folder}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    quantized = (folder / "quantization.json").is_file()
    cfg = model.cfg
    hf = config_to_hf(cfg, original, dtype)
    if quantized:
        hf["distillery_int8_dequantized"] = ("weights were INT8 (per-channel, symmetric) in distillery and are "
                                             "written here dequantized; the INT8 rounding is in the values")
    tensors = state_to_hf(dequantized_state(model) if quantized else model.state_dict(), cfg, DTYPES[dtype])
    hf_tok = tok if isinstance(tok, HFTokenizer) else as_hf_tokenizer(tok)
    with atomic_dir(out, inputs=(model_folder,)) as tmp:
        shards, size = [[]], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if len(shards) == 1:
            save_file({k: tensors[k] for k in shards[0]}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: tensors[k] for k in names}, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, file))
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                        "weight_map": weight_map})
        hf_tok.save_hf(tmp)
        hf.setdefault("bos_token_id", hf_tok.bos_id)
        hf["eos_token_id"] = hf.get("eos_token_id", hf_tok.eos_id)
        write_json(tmp / "config.json", hf)
        if not (tmp / "generation_config.json").exists():
            write_json(tmp / "generation_config.json", {"bos_token_id": hf_tok.bos_id,
                                                        "eos_token_id": list(hf_tok.eos_ids)})
        write_json(tmp / "manifest.json", {"step": "export-hf", "source": str(model_folder), "dtype": dtype,
                                           "int8_dequantized": quantized, "model": asdict(cfg)})
    return Path(out)


