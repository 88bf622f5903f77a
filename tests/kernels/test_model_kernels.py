"""The model's two paths, Triton kernels (kernels="triton", interpreted on the CPU) and plain PyTorch
(kernels="torch"), give the same logits, loss and gradients of every parameter; "auto" picks
PyTorch on the CPU; "triton" without CUDA or the interpreter is a clear error."""

from __future__ import annotations

import pytest
import torch

from kernel_env import DEVICE

from components.model import ModelConfig, Transformer
from components.model import fused

VARIANTS = [dict(attention="dense", ffn="dense"), dict(attention="dense", ffn="moe", n_experts=3, expert_top_k=2),
            dict(attention="hybrid", ffn="dense", window=4, block=4, top_k_blocks=2),
            # an imported model's shapes: grouped-query attention, q/k/v and output biases, an untied
            # head, Llama 3 RoPE scaling; and the same under the hybrid attention's kernel
            dict(attention="dense", ffn="dense", n_head=4, n_kv_head=2, qkv_bias=True, out_bias=True,
                 tie_embeddings=False, rope_type="llama3", rope_factor=8.0, rope_original_max_position=8),
            dict(attention="hybrid", ffn="dense", window=4, block=4, top_k_blocks=2, n_head=4, n_kv_head=1,
                 qkv_bias=True)]


def _pair(**kw) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=24) | kw
    on = Transformer(ModelConfig(kernels="triton", **cfg)).to(DEVICE)
    off = Transformer(ModelConfig(kernels="torch", **cfg)).to(DEVICE)
    off.load_state_dict(on.state_dict())
    return on, off


def _batch():
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 61, (2, 19), generator=g).to(DEVICE)
    tgt = torch.randint(0, 61, (2, 19), generator=g).to(DEVICE)
    tgt[0, :4] = -100
    return idx, tgt, torch.tensor([1.0, 0.5], device=DEVICE)


def _same_grads(on: Transformer, off: Transformer) -> None:
    grads_off = dict(off.named_parameters())
    for name, p in on.named_parameters():
        torch.testing.assert_close(p.grad, grads_off[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("variant", VARIANTS,
                         ids=lambda v: f"{v['attention']}-{v['ffn']}" + ("-gqa" if v.get("n_kv_head") else ""))
def test_kernels_and_pytorch_give_the_same_outputs_and_gradients(variant):
    on, off = _pair(**variant)
    idx, tgt, w = _batch()
    logits_on, loss_on = on(idx, tgt, loss_weights=w)
    logits_off, loss_off = off(idx, tgt, loss_weights=w)
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    loss_on.backward()
    loss_off.backward()
    _same_grads(on, off)


def test_the_fused_loss_needs_no_logits_and_gives_the_same_loss_and_gradients():
    """output="loss": with the kernels the loss comes from kernels/fused_linear_ce.py (no logits)."""
    on, off = _pair()
    idx, tgt, w = _batch()
    none, loss_on = on(idx, tgt, loss_weights=w, output="loss")
    _, loss_off = off(idx, tgt, loss_weights=w)
    assert none is None
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    loss_on.backward()
    loss_off.backward()
    _same_grads(on, off)
    h, _ = on(idx, output="hidden")
    assert h.shape == (2, 19, 32)
    with pytest.raises(ValueError, match="output: 'probs' is not one of logits, loss, hidden"):
        on(idx, output="probs")


def test_the_fused_distillation_kl_equals_distill_kl():
    from components.compress.distill import distill_kl

    student, _ = _pair()
    teacher, _ = _pair(n_layer=3, n_embd=48)
    idx, tgt, w = _batch()
    h_s, _ = student(idx, output="hidden")
    h_t, _ = teacher(idx, output="hidden")
    kl = fused.linear_kl(h_s.flatten(0, 1), student.lm_head.weight, h_t.flatten(0, 1), teacher.lm_head.weight,
                         tgt.flatten(), w.view(-1, 1).expand_as(tgt).flatten(), 2.0, -100)
    ref = distill_kl(student(idx)[0], teacher(idx)[0], tgt, w, 2.0)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)


def test_cached_decoding_matches_with_kernels():
    on, off = _pair()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert torch.equal(on.generate(prompt, 8, temperature=0), off.generate(prompt, 8, temperature=0))


def test_auto_uses_pytorch_on_the_cpu_and_on_without_a_gpu_is_a_clear_error(monkeypatch):
    x = torch.zeros(2)
    assert not fused.active("auto", x) and not fused.active("torch", x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="'triton' needs a CUDA device"):
        fused.active("triton", x)
    with pytest.raises(ValueError, match="kernels: 'off' is not one of auto, triton, torch"):
        fused.active("off", x)
    with pytest.raises(ValueError, match="kernels: 'fast' is not one of auto, triton, torch"):
        ModelConfig(kernels="fast").check()


def test_int8_model_uses_the_int8_kernel_with_the_same_result():
    """An INT8 model (compress.quantize) with kernels on multiplies through kernels/int8_matmul.py."""
    from components.model.int8 import QuantLinear, quantize_model

    on, off = _pair()
    q_on, _ = quantize_model(on, True, True)
    q_off, _ = quantize_model(off, True, True)
    assert {m.kernels for m in q_on.modules() if isinstance(m, QuantLinear)} == {"triton"}
    idx = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(q_on(idx)[0], q_off(idx)[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(q_on.generate(idx[:, :4], 6, temperature=0), q_off.generate(idx[:, :4], 6, temperature=0))
