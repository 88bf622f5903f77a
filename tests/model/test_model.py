"""The transformer on CPU: shapes, causality of every variant, the hybrid attention against dense,
RoPE, the weighted loss, DeepSeek-V3 routing and its bias balancing, tying, gradients,
activation checkpointing, and a tiny convergence run per variant."""

from __future__ import annotations

import copy

import pytest
import torch

from components.config import ConfigError, from_dict
from components.model import ModelConfig, Transformer
from components.model.model import MoE, apply_rope, hybrid_mask, rope_tables

VARIANTS = {
    "dense": dict(attention="dense", ffn="dense"),
    "hybrid": dict(attention="hybrid", ffn="dense", window=6, block=4, top_k_blocks=2),
    "moe": dict(attention="dense", ffn="moe", n_experts=4, expert_top_k=2),
    "hybrid-moe": dict(attention="hybrid", ffn="moe", window=6, block=4, top_k_blocks=1),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: OpenMP's fork/join costs more than it saves (2-3x slower on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**over) -> ModelConfig:
    base = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=32)
    return ModelConfig(**{**base, **over})


def model_of(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**over)).eval()


def tokens(B: int = 2, T: int = 32, V: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- config ----------------------------------------------------------------------------------


def test_config_from_dict_and_checks():
    cfg = from_dict(ModelConfig, {"n_embd": 64, "n_head": 4, "attention": "hybrid"})
    assert cfg.head_dim == 16 and cfg.hidden % 16 == 0 and cfg.hidden >= 4 * 64 * 2 // 3
    assert ModelConfig(ffn_hidden=40).hidden == 40
    for bad in (
        {"n_embd": 30, "n_head": 4},  # not divisible
        {"n_embd": 12, "n_head": 4},  # head dim 3 is odd
        {"attention": "sparse"},
        {"ffn": "mlp"},
        {"expert_top_k": 5, "n_experts": 4},
        {"window": 0},
        {"block": 0},
    ):
        with pytest.raises(ConfigError):
            from_dict(ModelConfig, bad)
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        from_dict(ModelConfig, {"n_layers": 2})


# ---- shapes and causality --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_loss(variant):
    m = model_of(**VARIANTS[variant])
    idx = tokens(3, 20)
    logits, loss = m(idx)
    assert logits.shape == (3, 20, 64) and loss is None
    _, loss = m(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert m.expert_load().shape == ((2, 4) if "moe" in variant else (0, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    m = model_of(**VARIANTS[variant])
    idx = tokens(2, 32)
    ref, _ = m(idx)
    for t in (5, 17, 31):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(32 - t)) % 64
        out, _ = m(changed)
        assert torch.equal(out[:, :t], ref[:, :t]), f"position < {t} saw a future token"
        assert not torch.allclose(out[:, t], ref[:, t])


def test_hybrid_with_a_wide_window_is_dense():
    dense = model_of(seed=3)
    hybrid = model_of(seed=3, attention="hybrid", window=32, block=4, top_k_blocks=2)
    idx = tokens(2, 32)
    torch.testing.assert_close(hybrid(idx)[0], dense(idx)[0], atol=1e-6, rtol=0)


def test_hybrid_with_a_small_window_differs_from_dense():
    dense = model_of(seed=3)
    hybrid = model_of(seed=3, attention="hybrid", window=4, block=4, top_k_blocks=1)
    idx = tokens(2, 32)
    a, b = hybrid(idx)[0], dense(idx)[0]
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # the window still covers every key there
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_hybrid_mask_is_window_plus_top_k_earlier_blocks():
    torch.manual_seed(0)
    B, H, T, D, window, block, k = 2, 3, 29, 8, 5, 4, 2
    q, keys = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    mask = hybrid_mask(q, keys, window, block, k)
    assert mask.shape == (B, H, T, T) and mask.dtype == torch.bool
    i = torch.arange(T)
    assert not (mask & (i[None, :] > i[:, None])).any()  # nothing from the future
    diff = i[:, None] - i[None, :]
    assert mask[..., (diff >= 0) & (diff < window)].all()  # the whole window
    blocks = keys[:, :, : (T // block) * block].reshape(B, H, T // block, block, D).mean(3)
    for t in range(T):
        outside = mask[:, :, t, : max(0, t - window + 1)]  # keys before the window
        eligible = max(0, (t - window + 1) // block)  # whole blocks ending before the window
        n_sel = min(k, eligible)
        assert (outside.sum(-1) == n_sel * block).all()
        if n_sel:
            best = (q[:, :, t, None, :] * blocks[:, :, :eligible]).sum(-1).topk(n_sel).indices  # (B, H, n_sel)
            expect = torch.zeros(B, H, T, dtype=torch.bool)
            for j in range(n_sel):
                for o in range(block):
                    expect.scatter_(-1, best[..., j : j + 1] * block + o, True)
            assert torch.equal(outside, expect[..., : outside.size(-1)])


def test_rope_score_depends_only_on_position_difference():
    torch.manual_seed(0)
    D, T = 16, 24
    cos, sin = rope_tables(T, D, 10000.0)
    q = torch.randn(D).expand(1, 1, T, D)  # the same vector at every position
    k = torch.randn(D).expand(1, 1, T, D)
    s = (apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1))[0, 0]  # (T, T)
    for delta in (-7, 0, 3, 11):
        diag = torch.diagonal(s, offset=-delta)  # entries with query - key == delta
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=0)
    assert not torch.allclose(torch.diagonal(s, 0)[0], torch.diagonal(s, -3)[0])
    torch.testing.assert_close(apply_rope(q, cos, sin)[..., 0, :], q[..., 0, :])  # position 0 is not rotated


# ---- loss ------------------------------------------------------------------------------------


def test_loss_weights_and_ignore_index():
    m = model_of()
    idx, tgt = tokens(3, 16, seed=1), tokens(3, 16, seed=2)
    _, plain = m(idx, tgt)
    _, ones = m(idx, tgt, loss_weights=torch.ones(3))
    torch.testing.assert_close(ones, plain)
    _, scaled = m(idx, tgt, loss_weights=torch.full((3,), 2.5))
    torch.testing.assert_close(scaled, plain)  # weights are relative within the batch
    _, dropped = m(idx, tgt, loss_weights=torch.tensor([1.0, 0.0, 1.0]))
    _, without = m(idx[[0, 2]], tgt[[0, 2]])
    torch.testing.assert_close(dropped, without)
    _, half = m(idx[:2], tgt[:2], loss_weights=torch.tensor([3.0, 1.0]))
    _, l0 = m(idx[:1], tgt[:1])
    _, l1 = m(idx[1:2], tgt[1:2])
    torch.testing.assert_close(half, 0.75 * l0 + 0.25 * l1)
    masked = tgt.clone()
    masked[:, 8:] = -1
    _, ign = m(idx, masked, ignore_index=-1)
    _, head = m(idx, torch.where(torch.arange(16) < 8, tgt, -100))
    _, ref = m(idx[:, :8], tgt[:, :8])
    torch.testing.assert_close(ign, ref)
    torch.testing.assert_close(head, ref)


# ---- mixture of experts ----------------------------------------------------------------------


def moe_layer(seed: int = 0, **over) -> MoE:
    torch.manual_seed(seed)
    cfg = tiny(ffn="moe", n_experts=6, expert_top_k=2, **over)
    return Transformer(cfg).blocks[0].ffn


def test_routing_picks_top_k_distinct_experts_with_gates_summing_to_one():
    moe = moe_layer()
    x = torch.randn(200, 32)
    idx, gates = moe.route(x)
    assert idx.shape == gates.shape == (200, 2)
    assert (idx[:, 0] != idx[:, 1]).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(200))
    scores = torch.sigmoid(moe.router(x))
    assert torch.equal(idx.sort(-1).values, scores.topk(2, -1).indices.sort(-1).values)
    moe(x.view(4, 50, 32))
    assert moe.load.sum() == 200 * 2 and torch.equal(moe.load, torch.bincount(idx.flatten(), minlength=6))


def test_bias_steers_selection_not_gates():
    moe = moe_layer()
    x = torch.randn(100, 32)
    scores = torch.sigmoid(moe.router(x))
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, 10.0]))  # forces experts 4 and 5
    idx, gates = moe.route(x)
    assert torch.equal(idx.sort(-1).values, torch.tensor([4, 5]).expand(100, 2))
    expect = scores.gather(-1, idx)
    torch.testing.assert_close(gates, expect / expect.sum(-1, keepdim=True))  # un-biased scores
    all_on = copy.deepcopy(moe)
    all_on.top_k = 6  # every expert is selected, so a bias can change nothing

    def gate_matrix() -> torch.Tensor:  # (N, E) gate of each expert, whatever the slot order
        idx, gates = all_on.route(x)
        return torch.zeros(100, 6).scatter(-1, idx, gates)

    before = gate_matrix()
    all_on.expert_bias.copy_(torch.randn(6))
    torch.testing.assert_close(gate_matrix(), before)


def test_bias_is_a_saved_buffer_and_update_moves_it_toward_underloaded_experts():
    moe = moe_layer(moe_bias_update=0.05)
    names = [n for n, _ in moe.named_parameters()]
    assert not any("bias" in n for n in names)
    assert "expert_bias" in moe.state_dict() and "load" not in moe.state_dict()
    with torch.no_grad():
        moe.router.weight[0, 0] = 3.0  # with x[..., 0] ~ 4, expert 0 draws every token's top score
    x = torch.randn(4, 64, 32)
    x[..., 0] += 4.0
    moe(x)
    load = moe.load.clone()
    assert load[0] == 256
    moe.update_router_bias()
    expect = 0.05 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(moe.expert_bias, expect)
    assert moe.expert_bias[0] < 0 and moe.expert_bias[load.argmin()] > 0
    seen = []
    for _ in range(60):  # repeated steps balance the load on this fixed input (sign steps oscillate)
        moe(x)
        moe.update_router_bias()
        seen.append(moe.load.float())
    late = torch.stack(seen[-30:]).mean(0)  # balanced would be 256 * 2 / 6 ~ 85 each
    assert late.max() < 0.6 * 256 and late.min() > 0.1 * 256, late


def test_model_level_bias_update_and_expert_load():
    m = model_of(**VARIANTS["moe"], moe_bias_update=0.01)
    m(tokens(2, 32))
    load = m.expert_load()
    assert load.shape == (2, 4) and (load.sum(-1) == 2 * 32 * 2).all()
    m.update_router_bias()
    for layer, row in zip(m.moe_layers(), load, strict=True):
        torch.testing.assert_close(layer.expert_bias, 0.01 * torch.sign(row.float().mean() - row.float()))
    m0 = model_of(**VARIANTS["moe"], moe_bias_update=0.0)
    m0(tokens(2, 32))
    m0.update_router_bias()
    assert all((layer.expert_bias == 0).all() for layer in m0.moe_layers())


def test_bf16_cast_keeps_rope_and_expert_bias_float32():
    m = model_of(**VARIANTS["moe"]).to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32 and m.moe_layers()[0].expert_bias.dtype == torch.float32
    assert m.wte.weight.dtype == torch.bfloat16
    logits, loss = m(tokens(2, 16), tokens(2, 16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


# ---- parameters and gradients ----------------------------------------------------------------


def test_tied_embeddings_share_storage():
    m = model_of()
    assert m.lm_head.weight is m.wte.weight
    assert m.lm_head.weight.data_ptr() == m.wte.weight.data_ptr()
    untied = model_of(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() == m.num_params() + 64 * 32


def test_optimizer_groups_and_init():
    m = model_of(**VARIANTS["moe"])
    decay, no_decay = m.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each parameter once
    assert any(p is m.wte.weight for p in no_decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"] if p is not m.wte.weight)
    assert all(p.dim() == 2 for p in decay["params"])
    torch.optim.AdamW(m.configure_optimizer_groups(0.1), lr=1e-3)
    big = Transformer(ModelConfig(n_layer=8, n_embd=128, n_head=4))
    assert abs(big.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(big.blocks[0].attn.c_proj.weight.std().item() - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    m = model_of(**VARIANTS[variant]).train()
    _, loss = m(tokens(4, 32), tokens(4, 32, seed=5))
    loss.backward()
    loads = {id(layer): layer.load for layer in m.moe_layers()}
    for name, p in m.named_parameters():
        layer = m.blocks[int(name.split(".")[1])].ffn if ".experts." in name else None
        if layer is not None and loads[id(layer)][int(name.split(".")[4])] == 0:
            assert p.grad is None, f"{name}: never selected yet has a gradient"
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"


@pytest.mark.parametrize("variant", ["dense", "hybrid-moe"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(variant):
    plain = model_of(**VARIANTS[variant]).train()
    ckpt = model_of(**VARIANTS[variant], activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    idx, tgt = tokens(2, 32), tokens(2, 32, seed=7)
    losses = []
    for m in (plain, ckpt):
        _, loss = m(idx, tgt)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_generate_appends_tokens_and_greedy_is_deterministic():
    m = model_of()
    idx = tokens(2, 5)
    out = m.generate(idx, 40, temperature=0.8, top_k=5)  # runs past block_size (32): the context is cropped
    assert out.shape == (2, 45) and torch.equal(out[:, :5], idx) and out.max() < 64
    assert torch.equal(m.generate(idx, 6, temperature=0), m.generate(idx, 6, temperature=0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_gives_the_logits_of_a_full_forward(variant):
    """Prefill 9 tokens, then feed the rest one at a time (and a chunk of 3): every position's
    logits equal those of one forward over the whole sequence (hybrid's block choice included)."""
    m = model_of(**VARIANTS[variant]).eval()
    idx = tokens(2, 24)
    full, _ = m(idx)
    cache = m.new_cache(2)
    parts = [m(idx[:, :9], cache=cache)[0]]
    parts += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 21)]
    parts.append(m(idx[:, 21:24], cache=cache)[0])
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["dense", "hybrid-moe"])
def test_cached_greedy_generation_equals_the_uncached_one(variant):
    m = model_of(**VARIANTS[variant]).eval()
    idx = tokens(3, 6)
    cached = m.generate(idx, 20, temperature=0)  # 26 <= block_size: KV cache
    slow = idx
    for _ in range(20):  # the definition: argmax of a full forward, token by token
        slow = torch.cat((slow, m(slow)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, slow)


def test_generation_stops_rows_at_eos_and_sampling_follows_the_generator():
    m = model_of().eval()
    idx = tokens(4, 3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = m.generate(idx, 12, temperature=1.0, generator=g1)
    assert torch.equal(a, m.generate(idx, 12, temperature=1.0, generator=g2))
    eos = int(a[0, 5])  # a token row 0 is known to produce at step 3
    out = m.generate(idx, 12, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(5))
    for row in out[:, 3:]:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]):] == eos).all()  # eos, then only eos
    assert (out[0, 3:6] == a[0, 3:6]).all() and (out[0, 6:] == eos).all()
    with pytest.raises(ValueError, match="at least one prompt token"):
        m.generate(idx[:, :0], 3)


# ---- convergence -----------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


@pytest.mark.parametrize("variant", ["dense", "moe", "hybrid"])
def test_tiny_model_learns_a_repeated_sentence(variant):
    """80 AdamW steps on a repeated sentence bring the byte-level loss below 30 % of the start."""
    over = dict(VARIANTS[variant], vocab_size=256, block_size=48, moe_bias_update=0.01)
    if variant == "hybrid":
        over.update(window=8, block=8, top_k_blocks=2)
    m = model_of(seed=0, **over).train()
    data = torch.tensor(list(TEXT.encode()))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.configure_optimizer_groups(0.01), lr=3e-3)
    losses = []
    for _ in range(80):
        start = torch.randint(0, len(data) - 49, (8,), generator=g)
        batch = torch.stack([data[s : s + 49] for s in start])
        _, loss = m(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.update_router_bias()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"{variant}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
