"""LoRA (components/model/lora.py) against peft, and an imported Hugging Face model through the
training stages with real DeepSpeed: continued pretraining, LoRA fine-tuning and LoRA GRPO, each
stage's model exported back to the Hugging Face layout."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from components.model.folder import load_model
from components.model.hf import export_hf, import_model
from components.model.lora import TARGETS, add_lora, merged_state, save_adapter
from distillery_cli import cli, ok

peft = pytest.importorskip("peft")
from test_hf import make_checkpoint  # noqa: E402  (tests/model is on the path: rootdir conftest)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    ref = make_checkpoint("llama", tmp / "hf")
    import_model(tmp / "hf", tmp / "ours")
    return tmp, ref


@pytest.mark.parametrize("targets", [TARGETS, ("q_proj", "v_proj"), ("k_proj", "down_proj")])
def test_an_adapter_we_save_loads_in_peft_with_our_merged_logits(llama, tmp_path, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _ = llama
    model, _ = load_model(tmp / "ours")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=8.0, targets=targets)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapted = model(idx)[0]
    merged = merged_state(model)
    assert merged.keys() == base.keys()
    plain, _ = load_model(tmp / "ours")
    plain.load_state_dict(merged)
    with torch.no_grad():
        ours = plain(idx)[0]
    assert float((ours - adapted).abs().max()) < 1e-5
    save_adapter(tmp_path / "adapter", model, base=str(tmp / "hf"))
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(targets)
    hf_base = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    peft_model = PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(idx).logits
    assert float((theirs - ours).abs().max()) < 1e-5


def test_lora_refuses_what_it_does_not_cover():
    from components.model import ModelConfig, Transformer

    with pytest.raises(ValueError, match="lora_targets: qkv not among"):
        add_lora(Transformer(ModelConfig()), 4, 8.0, "q_proj,qkv")
    with pytest.raises(ValueError, match="not MoE"):
        add_lora(Transformer(ModelConfig(ffn="moe")), 4, 8.0)


# ---- an imported model through the stages (DeepSpeed, CPU) ------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return ok(cli(*args))  # the tiny preset


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from components.data.config import GenerateConfig
    from components.data.generate import generate
    from components.data.load import write_jsonl

    folder = tmp_path_factory.mktemp("split")
    rows, _ = generate(GenerateConfig(rows=60, noise=0.0, max_ops=1))
    write_jsonl(folder / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:40]])
    write_jsonl(folder / "val.jsonl", rows[40:50])
    write_jsonl(folder / "test.jsonl", rows[50:])
    return folder


def test_an_imported_model_through_base_lora_finetune_lora_grpo_and_distillation(llama, split, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _ = llama
    _cli("train", "--stage", "base", "--init", str(tmp / "ours"), "--data", str(split), "--out",
         str(tmp_path / "base"), "--set", "train.steps=3", "--set", "train.warmup_steps=1",
         "--set", "model.block_size=48")
    # the same run with the base model at another path (a retried pod imports it into a new temporary
    # folder) resumes: the starting weights are matched by content
    import shutil

    shutil.copytree(tmp / "ours", tmp_path / "ours-elsewhere")
    again = _cli("train", "--stage", "base", "--init", str(tmp_path / "ours-elsewhere"), "--data", str(split),
                 "--out", str(tmp_path / "base"), "--set", "train.steps=3", "--set", "train.warmup_steps=1",
                 "--set", "model.block_size=48")
    assert "resuming from" in again.stderr
    base_cfg = json.loads((tmp_path / "base/model/model.json").read_text())
    assert base_cfg["n_kv_head"] == 2 and base_cfg["rope_type"] == "llama3"  # the imported architecture
    _cli("train", "--stage", "finetune", "--init", str(tmp_path / "base/model"), "--data", str(split), "--out",
         str(tmp_path / "ft"), "--set", "finetune.lora_rank=4", "--set", "finetune.steps=3", "--set", "finetune.warmup_steps=1",
         "--set", "finetune.lr=0.01")
    adapter = tmp_path / "ft/adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    before = load_file(str(tmp_path / "base/model/model.safetensors"))
    after = load_file(str(tmp_path / "ft/model/model.safetensors"))
    assert not all(torch.equal(before[k], after[k]) for k in before)  # the adapters were merged in
    # the adapter on the base stage's Hugging Face form gives the fine-tuned (merged) model's logits
    export_hf(tmp_path / "base/model", tmp_path / "base-hf")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf"), adapter).eval()
    merged, tok = load_model(tmp_path / "ft/model")
    ids = torch.tensor([tok.prompt_ids("Ann has 3 apples. She buys 4 more. How many apples?")])
    with torch.no_grad():
        assert float((peft_model(ids).logits - merged(ids)[0]).abs().max()) < 1e-4
    # every weight without an adapter (embeddings, norms, the head) is the base's, bit for bit
    untouched = [k for k in before if not k.endswith(("c_attn.weight", "c_proj.weight", "w_gate.weight", "w_up.weight"))]
    assert len(untouched) >= 4 and all(torch.equal(after[k], before[k]) for k in untouched)
    _cli("train", "--stage", "reinforce", "--init", str(tmp_path / "ft/model"), "--data", str(split), "--out",
         str(tmp_path / "rl"), "--set", "reinforce.lora_rank=4", "--set", "reinforce.steps=2",
         "--set", "reinforce.max_new_tokens=8")
    assert (tmp_path / "rl/adapter/adapter_model.safetensors").is_file()
    # distillation into another imported model with the same tokenizer (here a Qwen2), not a pruned teacher
    make_checkpoint("qwen2", tmp_path / "qwen-hf")
    import_model(tmp_path / "qwen-hf", tmp_path / "qwen")
    _cli("distill", "--teacher", str(tmp_path / "rl/model"), "--student", str(tmp_path / "qwen"), "--data",
         str(split), "--out", str(tmp_path / "distill"), "--set", "distill.steps=2", "--set", "distill.warmup_steps=1",
         "--set", "distill.eval_every=0")
    student = json.loads((tmp_path / "distill/model/model.json").read_text())
    assert student["qkv_bias"] and student["tie_embeddings"]  # the Qwen2 student, trained
    from components.model import ByteTokenizer, ModelConfig, Transformer
    from components.model.folder import save_model

    (tmp_path / "native").mkdir()
    native = ModelConfig(vocab_size=258, n_layer=1, n_head=4, n_embd=64, block_size=64)
    save_model(tmp_path / "native", Transformer(native).state_dict(), native, ByteTokenizer())
    proc = cli("distill", "--teacher", str(tmp_path / "rl/model"), "--student", str(tmp_path / "native"),
               "--data", str(split), "--out", str(tmp_path / "bad"))
    assert proc.returncode == 1 and "the student's tokenizer is not the teacher's" in proc.stderr
    assert not (tmp_path / "bad").exists()
    out = export_hf(tmp_path / "rl/model", tmp_path / "rl-hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_pretrained(out)
