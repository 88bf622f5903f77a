"""compress.distill: the student's shape and pruned start, the KL term, and distill -> quantize
through the CLI on real DeepSpeed (tiny preset, subprocesses)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from distillery_cli import cli, ok
from safetensors.torch import load_file

from components.compress.config import DistillConfig
from components.compress.distill import (
    distill_kl,
    kept_blocks,
    prune_from_teacher,
    student_config,
)
from components.model.int8 import QuantLinear
from components.config import ConfigError
from components.data.config import GenerateConfig
from components.data.generate import generate
from components.data.load import write_jsonl
from components.model import ModelConfig, Transformer
from components.train.batches import IGNORE
from components.model.folder import load_model

TEACHER = ModelConfig(vocab_size=97, n_layer=4, n_head=2, n_embd=32, block_size=24)


@pytest.mark.parametrize("t, s, want", [(4, 2, [0, 3]), (4, 1, [3]), (4, 4, [0, 1, 2, 3]), (12, 6, [0, 2, 4, 7, 9, 11]),
                                        (5, 3, [0, 2, 4])])
def test_kept_blocks_are_evenly_spaced_with_both_ends(t, s, want):
    assert kept_blocks(t, s) == want


def test_student_config_defaults_and_refusals():
    assert student_config(TEACHER, DistillConfig(n_layer=0)).n_layer == 2
    assert student_config(TEACHER, DistillConfig(n_layer=2, ffn_hidden=0)).hidden == TEACHER.hidden
    with pytest.raises(ConfigError, match="distill.n_layer"):
        student_config(TEACHER, DistillConfig(n_layer=5))
    with pytest.raises(ConfigError, match="distill.ffn_hidden"):
        student_config(TEACHER, DistillConfig(n_layer=2, ffn_hidden=TEACHER.hidden + 16))
    assert student_config(TEACHER, DistillConfig(n_layer=2, ffn_hidden=TEACHER.hidden + 16, init="random")).hidden \
        == TEACHER.hidden + 16


def test_pruning_nothing_gives_the_teacher_back():
    torch.manual_seed(0)
    teacher = Transformer(TEACHER).eval()
    s_cfg = student_config(TEACHER, DistillConfig(n_layer=4))
    student = Transformer(s_cfg).eval()
    student.load_state_dict(prune_from_teacher(TEACHER, teacher.state_dict(), s_cfg))
    x = torch.randint(0, 97, (2, 20))
    assert torch.equal(student(x)[0], teacher(x)[0])


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_pruned_student_keeps_the_important_neurons(ffn):
    torch.manual_seed(0)
    t_cfg = ModelConfig(**{**TEACHER.__dict__, "ffn": ffn})
    state = Transformer(t_cfg).state_dict()
    prefix = "blocks.3.ffn" if ffn == "dense" else "blocks.3.ffn.experts.1"
    state[f"{prefix}.w_up.weight"][:5] = 0.0  # five dead neurons: they must be the ones dropped
    s_cfg = student_config(t_cfg, DistillConfig(n_layer=2, ffn_hidden=t_cfg.hidden - 5))
    student_state = prune_from_teacher(t_cfg, state, s_cfg)
    Transformer(s_cfg).load_state_dict(student_state)  # strict: every key, every shape
    new = prefix.replace("blocks.3", "blocks.1")
    torch.testing.assert_close(student_state[f"{new}.w_gate.weight"], state[f"{prefix}.w_gate.weight"][5:])
    torch.testing.assert_close(student_state[f"{new}.c_proj.weight"], state[f"{prefix}.c_proj.weight"][:, 5:])
    torch.testing.assert_close(student_state["blocks.0.attn.c_attn.weight"], state["blocks.0.attn.c_attn.weight"])


def test_kl_is_zero_for_equal_logits_masks_ignored_tokens_and_matches_kl_div():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.ones(2, 5, dtype=torch.long)
    w = torch.ones(2)
    assert distill_kl(t, t, targets, w, 2.0).abs() < 1e-6
    want = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(distill_kl(s, t, targets, w, 2.0), want.mean())
    targets[1] = IGNORE  # row 1 ignored: only row 0 counts
    torch.testing.assert_close(distill_kl(s, t, targets, w, 2.0), want[0].mean())
    targets[1] = 1
    torch.testing.assert_close(distill_kl(s, t, targets, torch.tensor([1.0, 0.0]), 2.0), want[0].mean())



def test_distill_then_quantize_through_the_cli(tmp_path):
    rows, _ = generate(GenerateConfig(rows=140, noise=0.0, max_ops=1))
    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:100]])
    write_jsonl(split / "val.jsonl", rows[100:120])
    write_jsonl(split / "test.jsonl", rows[120:])
    ok(cli("train", "--stage", "base", "--data", str(split), "--out", str(tmp_path / "base")))
    ok(cli("distill", "--teacher", str(tmp_path / "base/model"), "--data", str(split), "--out",
           str(tmp_path / "distill"), "--set", "distill.teacher_data=true"))
    m = json.loads((tmp_path / "distill/metrics.json").read_text())
    assert m["student_layers"] == 1 and m["teacher_layers"] == 2
    assert m["student_params"] < 0.5 * m["teacher_params"] and m["param_ratio"] == m["student_params"] / m["teacher_params"]
    assert 0 <= m["student_accuracy"] <= 1 and 0 <= m["teacher_accuracy"] <= 1 and m["test_rows"] == 20
    metrics = [json.loads(line) for line in (tmp_path / "distill/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and all(r["kl"] >= 0 and r["ce"] > 0 for r in metrics)
    student, _ = load_model(tmp_path / "distill/model")
    assert student.cfg.n_layer == 1 and student.cfg.hidden == 64

    ok(cli("quantize", "--checkpoint", str(tmp_path / "distill/model"), "--data", str(split),
           "--out", str(tmp_path / "int8")))
    q = json.loads((tmp_path / "int8/metrics.json").read_text())
    assert q["size_ratio"] > 3.0 and q["int8_bytes"] < q["float_bytes"]
    assert abs(q["accuracy_drop"] - (q["float_accuracy"] - q["int8_accuracy"])) < 1e-12
    model, _ = load_model(tmp_path / "int8/model")
    assert isinstance(model.blocks[0].attn.c_attn, QuantLinear)

    # quantization-aware fine-tuning first: 4 fake-quantized steps on DeepSpeed, scratch not kept
    ok(cli("quantize", "--checkpoint", str(tmp_path / "distill/model"), "--data", str(split),
           "--out", str(tmp_path / "qat"), "--set", "quantize.qat_steps=4", "--set", "quantize.qat_lr=0.01"))
    assert sorted(p.name for p in (tmp_path / "qat").iterdir()) == ["manifest.json", "metrics.json", "model"]
    assert not list(tmp_path.glob(".qat.qat-*"))
    ptq = load_file(str(tmp_path / "int8/model/model.safetensors"))
    qat = load_file(str(tmp_path / "qat/model/model.safetensors"))
    assert any(not torch.equal(ptq[k], qat[k]) for k in ptq if k.endswith("weight_int8"))  # QAT moved weights

    bad = cli("quantize", "--checkpoint", str(split), "--out", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "not a model folder" in bad.stderr and str(split) in bad.stderr
    assert not (tmp_path / "nothing").exists()
