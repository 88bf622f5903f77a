"""The model's two paths, Triton kernels (kernels="on", interpreted on the CPU) and plain PyTorch
(kernels="off"), give the same logits, loss and gradients of every parameter; "auto" picks
PyTorch on the CPU; "on" without CUDA or the interpreter is a clear error."""

from __future__ import annotations

import pytest
import torch

from kernel_env import DEVICE

from components.model import ModelConfig, Transformer
from components.model import fused

VARIANTS = [dict(attention="dense", ffn="dense")]


def _pair(**kw) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=24) | kw
    on = Transformer(ModelConfig(kernels="on", **cfg)).to(DEVICE)
    off = Transformer(ModelConfig(kernels="off", **cfg)).to(DEVICE)
    off.load_state_dict(on.state_dict())
    return on, off


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_kernels_and_pytorch_give_the_same_outputs_and_gradients(variant):
    on, off = _pair(**variant)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 61, (2, 19), generator=g).to(DEVICE)
    tgt = torch.randint(0, 61, (2, 19), generator=g).to(DEVICE)
    tgt[0, :4] = -100
    w = torch.tensor([1.0, 0.5], device=DEVICE)
    logits_on, loss_on = on(idx, tgt, loss_weights=w)
    logits_off, loss_off = off(idx, tgt, loss_weights=w)
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-6)
    loss_on.backward()
    loss_off.backward()
    grads_off = dict(off.named_parameters())
    for name, p in on.named_parameters():
        torch.testing.assert_close(p.grad, grads_off[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_cached_decoding_matches_with_kernels():
    on, off = _pair()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert torch.equal(on.generate(prompt, 8, temperature=0), off.generate(prompt, 8, temperature=0))


def test_auto_uses_pytorch_on_the_cpu_and_on_without_a_gpu_is_a_clear_error(monkeypatch):
    x = torch.zeros(2)
    assert not fused.active("auto", x) and not fused.active("off", x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="'on' needs a CUDA device"):
        fused.active("on", x)
    with pytest.raises(ValueError, match="kernels: 'fast' is not one of auto, on, off"):
        ModelConfig(kernels="fast").check()
