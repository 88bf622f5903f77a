"""Hugging Face checkpoints in and out (components/model/hf.py), against transformers itself.

Tiny random-weight Llama (grouped-query attention, untied head, Llama 3 RoPE scaling), Qwen2 (q/k/v
biases, tied head) and Mistral (a sliding window shorter than the sequence) models are built
offline from their configs and saved by transformers; we import them, compare logits and greedy
decoding with the KV cache, export them back and load the export in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from components.model import ByteTokenizer
from components.model.folder import ModelFolderError, load_model
from components.model.hf import HFImportError, export_hf, import_model
from components.model.tokenizer import as_hf_tokenizer
from distillery_cli import cli as _cli

transformers = pytest.importorskip("transformers")

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
             max_position_embeddings=512)


def _configs() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "qwen2": Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5),
        "mistral": MistralConfig(**SIZES, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False),
    }


def _tokenizer_files(folder: Path) -> None:
    """A byte-level tokenizer.json (258 ids) with a chat template, written as Hugging Face does."""
    tok = as_hf_tokenizer(ByteTokenizer())
    tok.config.update(chat_template=CHAT, bos_token=None)
    tok._files.pop("tokenizer_config.json")
    tok.save_hf(folder)


def make_checkpoint(family: str, folder: Path, dtype=torch.float32) -> torch.nn.Module:
    """A random-weight transformers model of `family` saved (safetensors) with a tokenizer in `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[family])
    model = AutoModelForCausalLM.from_config(_configs()[family], dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if name.endswith("bias") else 0.08)  # biases nonzero: they must land right
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(folder)
    _tokenizer_files(folder)
    return model.float()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def imported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(request.param, tmp / "hf")
    import_model(tmp / "hf", tmp / "ours")
    return request.param, tmp, ref


def test_import_gives_transformers_logits(imported):
    family, tmp, ref = imported
    model, tok = load_model(tmp / "ours")
    assert tok.kind == "hf" and tok.vocab_size == 258
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > sliding window 8
    with torch.no_grad():
        ours, theirs = model(idx)[0], ref(idx).logits
    assert float((ours - theirs).abs().max()) < 1e-5, family


def test_greedy_decoding_with_the_kv_cache_equals_transformers_generate(imported):
    family, tmp, ref = imported
    model, _ = load_model(tmp / "ours")
    idx = torch.randint(0, 258, (1, 7), generator=torch.Generator().manual_seed(2))
    ours = model.generate(idx, 32, temperature=0.0)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    theirs = ref.generate(idx, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(idx))
    assert ours.tolist() == theirs.tolist(), family


def test_export_loads_in_transformers_with_equal_logits_and_the_same_bits(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, tmp, ref = imported
    out = export_hf(tmp / "ours", tmp / "export")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, ref(idx).logits)
    original, exported = load_file(str(tmp / "hf/model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) and original[k].dtype == exported[k].dtype for k in original)
    tok = AutoTokenizer.from_pretrained(out)
    _, ours = load_model(tmp / "ours")
    text = "Ann has 3 apples and buys 12 more. How many now?"
    assert tok(text, add_special_tokens=False).input_ids == ours.encode(text)
    messages = [{"role": "user", "content": text}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours.chat(messages)


def test_bf16_checkpoints_round_trip_bit_identical(tmp_path):
    make_checkpoint("qwen2", tmp_path / "hf", dtype=torch.bfloat16)
    import_model(tmp_path / "hf", tmp_path / "ours")
    out = export_hf(tmp_path / "ours", tmp_path / "export", shard_bytes=40_000)  # several shards
    original = load_file(str(tmp_path / "hf/model.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    exported = {}
    for f in set(index["weight_map"].values()):
        exported.update(load_file(str(out / f)))
    assert original.keys() == exported.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(original[k], exported[k]) for k in original)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_model_trained_here_exports_with_its_own_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.model import ModelConfig, Transformer
    from components.model.folder import save_model

    cfg = ModelConfig(vocab_size=258, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, ffn_hidden=48)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    (tmp_path / "m").mkdir()
    save_model(tmp_path / "m", model.state_dict(), cfg, ByteTokenizer())
    out = export_hf(tmp_path / "m", tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 258, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((back(idx).logits - model(idx)[0]).abs().max()) < 1e-5
    text = "héllo, 12 + 30 = 42"
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False).input_ids == ByteTokenizer().encode(text)


def test_an_int8_folder_exports_dequantized_and_says_so(tmp_path, imported):
    from transformers import AutoModelForCausalLM

    from components.model.folder import save_quantized
    from components.model.int8 import quantize_model

    family, tmp, _ = imported
    if family != "llama":
        pytest.skip("one family is enough")
    model, tok = load_model(tmp / "ours")
    q, spec = quantize_model(model)
    (tmp_path / "q").mkdir()
    save_quantized(q, spec, tok, tmp_path / "q")
    out = export_hf(tmp_path / "q", tmp_path / "hf")
    assert "distillery_int8_dequantized" in json.loads((out / "config.json").read_text())
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 258, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((back(idx).logits - q(idx)[0]).abs().max()) < 1e-4


# ---- refusals: one line naming the file, nothing written ---------------------------------------

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "hf"
    make_checkpoint("qwen2", folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _bad_cases(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    cases = {}
    f = _copy(good, tmp / "arch")
    _edit_config(f, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    cases["arch"] = (f, r"config.json: architecture 'GPT2LMHeadModel' is not supported")
    f = _copy(good, tmp / "remote")
    _edit_config(f, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    cases["remote"] = (f, r"config.json: asks for the checkpoint's own code")
    f = _copy(good, tmp / "pickle")
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    cases["pickle"] = (f, r"pytorch_model.bin: a PyTorch pickle; .*Convert it to safetensors")
    f = _copy(good, tmp / "shape")
    state = load_file(str(f / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, str(f / "model.safetensors"))
    cases["shape"] = (f, r"model.safetensors: tensor model.layers.1.self_attn.k_proj.weight has shape \(16, 64\), "
                         r"config.json implies \(32, 64\)")
    f = _copy(good, tmp / "shard")
    state = load_file(str(f / "model.safetensors"))
    names = sorted(state)
    save_file({k: state[k] for k in names[:5]}, str(f / "model-00001-of-00002.safetensors"))
    (f / "model.safetensors").unlink()
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in names[:5]},
        **{k: "model-00002-of-00002.safetensors" for k in names[5:]}}}))
    cases["shard"] = (f, r"model-00002-of-00002.safetensors: a shard named by the index is missing")
    f = _copy(good, tmp / "rope")
    _edit_config(f, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    cases["rope"] = (f, r"config.json: rope_scaling: rope type 'yarn' is not supported")
    return cases


def test_bad_checkpoints_are_refused_in_one_line_with_nothing_written(good, tmp_path):
    for name, (folder, message) in _bad_cases(good, tmp_path).items():
        with pytest.raises(HFImportError, match=message):
            import_model(folder, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists(), name
    folder, message = _bad_cases(good, tmp_path / "cli")["pickle"]
    proc = _cli("model", "import", str(folder), "--out", str(tmp_path / "cli-out"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pytorch_model.bin" in proc.stderr and not (tmp_path / "cli-out").exists()


def test_the_cli_imports_and_exports(good, tmp_path):
    proc = _cli("model", "import", str(good), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert "Qwen2ForCausalLM" in proc.stdout
    proc = _cli("model", "export-hf", str(tmp_path / "m"), "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf/config.json").is_file() and (tmp_path / "hf/tokenizer.json").is_file()
    with pytest.raises(ModelFolderError):
        load_model(tmp_path / "hf")  # a Hugging Face folder is not one of ours: import it


# ---- config.json, whatever it holds: a ModelConfig or one HFImportError, never a traceback ------

from hypothesis import given, settings, strategies as st  # noqa: E402

from components.model.hf import config_from_hf  # noqa: E402

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=True), st.text(max_size=8),
                    st.lists(st.one_of(st.integers(0, 3), st.text(max_size=3), st.lists(st.integers(), max_size=1)),
                             max_size=3),
                    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=3),
                                                                   st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                   max_size=1)), max_size=2))
_KEYS = ["architectures", "model_type", "rope_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
         "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
         "hidden_act", "sliding_window", "use_sliding_window", "auto_map"]


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(["llama", "qwen2", "mistral"]), changes=st.dictionaries(st.sampled_from(_KEYS), _VALUES,
                                                                                   max_size=4))
def test_any_config_json_is_a_model_config_or_one_named_error(base, changes):
    hf = {**_configs()[base].to_dict(), **changes}
    try:
        cfg = config_from_hf(hf, "config.json")
    except HFImportError as err:
        assert str(err).startswith("config.json: ") and "\n" not in str(err)
    else:
        cfg.check()
        assert cfg.vocab_size > 0 and cfg.n_head % cfg.kv_heads == 0


def test_written_folders_are_readable_by_a_server_running_as_another_user(imported, tmp_path):
    """safetensors creates its files 0600; a Triton or vLLM pod reading the volume under another uid
    could not open them. atomic_dir gives every file the read bits the umask allows."""
    import os
    import stat

    family, tmp, _ = imported
    if family != "qwen2":
        pytest.skip("one family is enough")
    out = export_hf(tmp / "ours", tmp_path / "hf")
    mask = os.umask(0o022)
    os.umask(mask)
    for folder in (tmp / "ours", out):
        for path in folder.rglob("*"):
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044 & ~mask, path


@settings(max_examples=150, deadline=None)
@given(scaling=st.fixed_dictionaries({}, optional={
    "rope_type": st.one_of(st.sampled_from(["default", "linear", "llama3", "yarn", "dynamic"]), _VALUES),
    "type": _VALUES, "factor": _VALUES, "low_freq_factor": _VALUES, "high_freq_factor": _VALUES,
    "original_max_position_embeddings": _VALUES}))
def test_any_rope_scaling_is_a_model_config_or_one_named_error(scaling):
    hf = {**_configs()["llama"].to_dict(), "rope_parameters": None, "rope_scaling": scaling}
    try:
        config_from_hf(hf, "config.json")
    except HFImportError as err:
        assert str(err).startswith("config.json: ") and "\n" not in str(err)


def test_the_generate_model_and_serve_checks_reference_read_a_chat_model_the_same_way(imported, tmp_path):
    """Triton's generate model makes a chat model's text the user's turn; serve.check's in-process
    reference must read its probes the same way, or a real chat model could never pass the check."""
    from components.serve.check import reference_outputs
    from components.serve.config import CheckConfig
    from components.serve.triton_model import generate_batch, prompt_ids, text_ids

    family, tmp, _ = imported
    if family != "llama":
        pytest.skip("one family is enough")
    model, tok = load_model(tmp / "ours")
    prompt = "What is 2 + 3?"
    assert text_ids(tok, prompt) == tok.prompt_ids(prompt) != tok.encode(prompt)  # the chat template applies
    ref = reference_outputs(tmp / "ours", CheckConfig(prompts=[prompt], max_tokens=12))
    served = generate_batch(model, tok, [prompt_ids(prompt.encode(), tok, model.cfg.block_size, 12)], [12], 0.0, None)
    assert ref["generate"] == served
