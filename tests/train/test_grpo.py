"""GRPO's pieces: group advantages, the k3 KL, the clipped loss and its gradient, completion
masks, log-probs; fine-tune masking of prompt tokens; function-preserving growth; freezing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.model import ModelConfig, Transformer
from components.train.batches import IGNORE, RowBatches
from components.train.grpo import completion_mask, group_advantages, grpo_loss, kl_k3, token_logprobs
from components.train.pretrained import deepen, freeze_below


@given(st.lists(st.lists(st.floats(0, 2, allow_nan=False), min_size=2, max_size=8), min_size=1, max_size=4)
       .filter(lambda g: len({len(x) for x in g}) == 1))
@settings(max_examples=60, deadline=None)
def test_advantages_have_zero_mean_per_group(groups):
    a = group_advantages(torch.tensor(groups, dtype=torch.float64))
    assert torch.allclose(a.mean(dim=1), torch.zeros(len(groups), dtype=torch.float64), atol=1e-9)
    for row, adv in zip(groups, a):
        if max(row) - min(row) > 1e-3:
            assert abs(float(adv.std(unbiased=False)) - 1) < 0.1  # unit scale once rewards differ
        else:
            assert adv.abs().max() < 1e-6 or max(row) != min(row)


def test_equal_rewards_give_zero_advantage():
    assert torch.equal(group_advantages(torch.ones(2, 4)), torch.zeros(2, 4))
    assert torch.equal(group_advantages(torch.ones(2, 4), scale=False), torch.zeros(2, 4))


@given(st.lists(st.floats(0, 2, allow_nan=False), min_size=2, max_size=8))
@settings(max_examples=60, deadline=None)
def test_unscaled_advantages_are_rewards_minus_the_group_mean(rewards):
    r = torch.tensor([rewards], dtype=torch.float64)
    assert torch.allclose(group_advantages(r, scale=False), r - r.mean(), atol=1e-12)


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(3, 5, 7), -1)
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))
    other = torch.log_softmax(torch.randn(3, 5, 7), -1)
    assert (kl_k3(logp, other) >= 0).all() and kl_k3(logp, other).sum() > 0
    # unbiased: the mean of k3 over samples from pi approaches KL(pi || ref)
    p, r = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    draws = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_k3(p.log()[draws], r.log()[draws]).mean()
    assert abs(float(estimate) - float((p * (p / r).log()).sum())) < 0.01


def test_the_clip_stops_the_gradient_beyond_the_trust_region():
    mask = torch.ones(2, 3)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0: both clipped, no gradient from the surrogate
    logp = torch.tensor([[1.5] * 3, [0.5] * 3]).log().requires_grad_()
    loss, info = grpo_loss(logp, old, logp.detach(), adv, mask, clip=0.2, kl_coef=0.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp)) and info["clipped"] == 1.0
    # inside the region the gradient pushes logp up for A > 0 and down for A < 0
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, info = grpo_loss(logp, old, logp.detach(), adv, mask, clip=0.2, kl_coef=0.0)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all() and info["clipped"] == 0.0
    assert info["kl"] == 0.0


def test_masked_tokens_do_not_count():
    logp = torch.zeros(1, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0]])
    loss, _ = grpo_loss(logp, torch.zeros(1, 4), torch.full((1, 4), -1.0), torch.tensor([1.0]), mask, 0.2, 0.1)
    loss.backward()
    assert (logp.grad[0, 2:] == 0).all() and (logp.grad[0, :2] != 0).all()


@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_token_normalisation_cancels_a_shared_token_and_sequence_normalisation_does_not(norm):
    """Two completions of lengths 3 and 1 open with the same token (one parameter, theta) and
    have advantages +1 and -1: the token is neither better nor worse, so its gradient should be 0."""
    theta = torch.zeros((), requires_grad=True)
    rest = torch.zeros(2, 2)
    logp = torch.cat([theta.expand(2, 1), rest], dim=1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo_loss(logp, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, 0.2, 0.0, norm)
    loss.backward()
    if norm == "token":
        assert theta.grad == 0
    else:  # -(1/3 - 1/1) / 2: the short, worse completion pushes the shared token down
        torch.testing.assert_close(theta.grad, torch.tensor(1 / 3))


def test_completion_mask_keeps_the_first_eos_and_nothing_after():
    c = torch.tensor([[5, 6, 0, 0, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    assert completion_mask(c, eos_id=0).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def _model(n_layer=2, **over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=40, n_layer=n_layer, n_head=2, n_embd=16, block_size=24, **over)).eval()


def test_token_logprobs_are_those_of_the_completion_tokens():
    m = _model()
    seq = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    lp = token_logprobs(m, seq, prompt_len=4)
    assert lp.shape == (2, 6)
    full = torch.log_softmax(m(seq)[0].float(), -1)
    torch.testing.assert_close(lp[:, 0], full[torch.arange(2), 3, seq[:, 4]])
    assert (lp <= 0).all()


def test_finetune_batches_take_no_loss_on_prompt_tokens():
    rows = [[1, 2, 3, 10, 11, 12], [4, 5, 13, 14]]
    b = RowBatches(rows, [1.0, 1.0], 16, 2, 0, pad_id=0, loss_from=[3, 2]).get(0)
    for i, pick in enumerate(RowBatches(rows, [1.0, 1.0], 16, 2, 0, pad_id=0).pick(0)):
        start = [3, 2][pick]
        t = b.targets[i].tolist()
        assert all(x == IGNORE for x in t[:start - 1])
        assert t[start - 1:len(rows[pick]) - 1] == rows[pick][start:]
    # the prompt's tokens are inputs only: another prompt gives the same loss-taking targets
    other = RowBatches([[39, 38, 37, 10, 11, 12], [36, 35, 13, 14]], [1.0, 1.0], 16, 2, 0, pad_id=0,
                       loss_from=[3, 2]).get(0)
    assert torch.equal(other.targets, b.targets) and not torch.equal(other.idx, b.idx)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
@pytest.mark.parametrize("old, extra", [(2, 1), (2, 2), (3, 4)])
def test_deepening_preserves_the_function(ffn, old, extra):
    m = _model(old, ffn=ffn)
    cfg, state = deepen(m.cfg, m.state_dict(), extra)
    assert cfg.n_layer == old + extra
    grown = Transformer(cfg).eval()
    grown.load_state_dict(state)
    idx = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(grown(idx)[0], m(idx)[0], atol=1e-5, rtol=1e-5)


def test_freeze_below_leaves_the_top_blocks_and_final_norm():
    m = _model(4)
    freeze_below(m, 2)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "blocks.3.", "ln_f.")) for n in trainable)
    assert not m.wte.weight.requires_grad and not m.lm_head.weight.requires_grad  # tied
    groups = m.configure_optimizer_groups(0.1)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in m.parameters() if p.requires_grad}


def test_grpo_refuses_data_without_a_usable_prompt():
    from components.data.load import DataError
    from components.model import ByteTokenizer
    from components.train.config import ReinforceConfig
    from components.train.grpo import GRPO

    rows = [{"prompt": "x" * 30, "response": "y\n#### 3", "answer": "3"}, {"prompt": "short", "answer": None}]
    with pytest.raises(DataError, match="prompt of at most 4 tokens"):
        GRPO(ReinforceConfig(select_samples=0), rows, ByteTokenizer(), _model(), block_size=20)
    ok = GRPO(ReinforceConfig(select_samples=0), rows, ByteTokenizer(), _model(), block_size=64)
    assert len(ok.prompts) == 1 and ok.skipped == 1  # the row without an answer


def _grpo(rows, prompts_per_step=4, group_size=3):
    from components.model import ByteTokenizer
    from components.train.config import ReinforceConfig
    from components.train.grpo import GRPO

    cfg = ReinforceConfig(prompts_per_step=prompts_per_step, group_size=group_size, max_new_tokens=6, select_samples=0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=16, block_size=64))
    return GRPO(cfg, rows, ByteTokenizer(), model, block_size=64)


def test_a_steps_prompts_share_a_length_and_every_prompt_is_equally_likely():
    # 12 prompts in 3 length buckets of 2, 4 and 6 prompts
    rows = [{"prompt": "p" * n + str(i), "answer": "1"} for n, count in ((5, 2), (9, 4), (14, 6)) for i in range(count)]
    grpo = _grpo(rows)
    counts: dict[str, int] = {}
    for step in range(3000):
        drawn = grpo.draw(step, rank=0)
        assert len(drawn) == 4 and len({len(p.ids) for p in drawn}) == 1
        for p in drawn:
            counts[bytes(p.ids)] = counts.get(bytes(p.ids), 0) + 1
    assert len(counts) == 12
    expected = 3000 * 4 / 12
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts  # about 9 sd wide
    assert grpo.draw(7, rank=0) == grpo.draw(7, rank=0) != grpo.draw(7, rank=1)


def test_a_sampled_batch_holds_one_group_per_prompt_cut_to_its_own_length():
    rows = [{"prompt": f"q{i}xx", "answer": "1"} for i in range(5)]
    grpo = _grpo(rows, prompts_per_step=3, group_size=4)
    grpo.sample(grpo.reference, step=0, rank=0, world=1)
    assert len(grpo.batch) == 3
    for r in grpo.batch:
        assert r.seq.shape[0] == 4 and r.mask.shape == r.old_logp.shape == r.ref_logp.shape
        assert r.seq.shape[1] == r.prompt_len + r.mask.shape[1] and bool(r.mask.sum(dim=1).max() == r.mask.shape[1])
        torch.testing.assert_close(r.old_logp, r.ref_logp)  # the policy is the reference here
        assert abs(float(r.advantages.mean())) < 1e-6
    assert 0 <= grpo.batch_stats["accuracy"] <= 1 and grpo.batch_stats["time_generate"] > 0


@pytest.mark.parametrize("bad, field", [
    ({"group_size": 1}, "group_size"), ({"steps": 3}, "multiples of updates_per_batch"),
    ({"clip": 1.5}, "clip"), ({"kl_coef": -0.1}, "kl_coef"), ({"temperature": 0}, "temperature"),
    ({"loss_norm": "batch"}, "loss_norm"), ({"accuracy_weight": 0, "format_weight": 0}, "accuracy_weight"),
    ({"reward": "coin"}, "reward"), ({"select_min": 0.8, "select_max": 0.2}, "select_min"),
    ({"select_max": 1.5}, "select_max"), ({"select_samples": -1}, "select_samples"),
    ({"resample_rounds": -1}, "resample_rounds"), ({"select_prompts": -2}, "select_prompts"),
])
def test_reinforce_config_names_a_bad_field(bad, field):
    from components.config import ConfigError
    from components.train.config import ReinforceConfig

    with pytest.raises(ConfigError, match=field):
        ReinforceConfig(**bad).check()


class Scripted(Transformer):
    """A real tiny transformer (its forward scores the rollouts) whose sampling is scripted:
    `script(prompt text, row in the decode, call number)` is the completion each row gets."""

    def __init__(self, script):
        torch.manual_seed(0)
        super().__init__(ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=16, block_size=64))
        self.script, self.calls = script, 0

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, generator=None):
        from components.model import ByteTokenizer

        tok, rows = ByteTokenizer(), []
        for j, row in enumerate(idx.tolist()):
            text = self.script(tok.decode(row).rstrip("\n"), j, self.calls)
            rows.append(row + (tok.encode(text) + [tok.eos_id])[:max_new_tokens])
        self.calls += 1
        width = max(map(len, rows))
        return torch.tensor([r + [tok.eos_id] * (width - len(r)) for r in rows])


# prompts "aN?" (answer 1: always right), "bN?" (answer 2: right on even rows of a decode, half
# the time), "cN?" (answer 3: never right); the model always answers 1 or 2
ROWS = [{"id": f"{k}{i}", "prompt": f"{k}{i}?", "answer": {"a": "1", "b": "2", "c": "3"}[k]}
        for k in "abc" for i in range(4)]


def _answers(prompt, row, call):
    return "so\n#### 1" if prompt.startswith("a") or (prompt.startswith("b") and row % 2) else "so\n#### 2"


def _scripted_grpo(rows=ROWS, **cfg):
    from components.model import ByteTokenizer
    from components.train.config import ReinforceConfig
    from components.train.grpo import GRPO

    config = ReinforceConfig(**{"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 12, "select_samples": 0, **cfg})
    config.check()
    return GRPO(config, rows, ByteTokenizer(), Scripted(_answers), block_size=64)


def test_selection_keeps_the_prompts_solved_sometimes_and_counts_the_bands():
    grpo = _scripted_grpo(select_samples=4, select_min=0.1, select_max=0.9)
    assert sorted(p.id for p in grpo.prompts) == ["b0", "b1", "b2", "b3"]  # a: always, c: never solved
    sel = grpo.selection
    assert sel["bands"] == {"never": 4, "sometimes": 4, "always": 4} and sel["kept"] == 4 and sel["prompts"] == 12
    assert {r["id"]: r["rate"] for r in sel["rows"]} == {f"{k}{i}": {"a": 1.0, "b": 0.5, "c": 0.0}[k]
                                                          for k in "abc" for i in range(4)}
    assert abs(sel["mean_rate"] - 0.5) < 1e-9 and sel["kept_mean_rate"] == 0.5
    # the bounds are inclusive: [0.5, 1] keeps the half-solved and the always-solved prompts
    assert len(_scripted_grpo(select_samples=4, select_min=0.5, select_max=1.0).prompts) == 8
    # a subset: 6 of the 12 measured, the same 6 for the same seed
    sub = _scripted_grpo(select_samples=4, select_prompts=6, select_min=0.0, select_max=1.0)
    assert sub.selection["prompts"] == 6 and len(sub.prompts) == 6
    again = _scripted_grpo(select_samples=4, select_prompts=6, select_min=0.0, select_max=1.0)
    assert [p.id for p in again.prompts] == [p.id for p in sub.prompts]
    off = _scripted_grpo(select_samples=0)
    assert len(off.prompts) == 12 and off.selection is None


def test_selection_that_keeps_nothing_is_a_clear_error():
    from components.data.load import DataError

    with pytest.raises(DataError, match=r"4 never solved, 4 sometimes, 4 always.*select_samples=0"):
        _scripted_grpo(select_samples=4, select_min=0.6, select_max=0.9)


def test_dynamic_sampling_replaces_groups_of_equal_rewards():
    # without selection, a draw of "a" or "c" prompts gives flat groups: they are dropped and
    # replaced while rounds remain, and only "b" groups (rewards 1.5 / 0.5) reach the update
    grpo = _scripted_grpo(dynamic_sampling=True, resample_rounds=20)
    for step in range(6):
        grpo.sample(grpo.reference, step=step, rank=0, world=1)
        assert len(grpo.batch) == 2
        for r in grpo.batch:
            assert r.advantages.abs().sum() > 0  # every group in the update has signal
        s = grpo.batch_stats
        assert 0 <= s["dropped"] < 1 and 0 <= s["flat_groups"] <= 1 and s["sample_rounds"] >= 1
        # every group beyond the two that trained was a dropped flat one
        assert abs(s["dropped"] - s["flat_groups"]) < 1e-6
    # no rounds left: flat groups fill the batch, as without dynamic sampling
    off = _scripted_grpo(rows=[r for r in ROWS if r["id"][0] != "b"], dynamic_sampling=True, resample_rounds=2)
    off.sample(off.reference, step=0, rank=0, world=1)
    assert len(off.batch) == 2 and all(r.advantages.abs().sum() == 0 for r in off.batch)
    assert off.batch_stats["flat_groups"] == 1.0 and off.batch_stats["sample_rounds"] == 3


def test_a_random_reward_replaces_the_accuracy_term_but_the_logged_accuracy_is_real():
    grpo = _scripted_grpo(reward="random", dynamic_sampling=False)
    texts = ["so\n#### 1", "so\n#### 2"] * 20
    g = torch.Generator().manual_seed(0)
    total, acc, fmt = grpo.rewards(texts, "1", g)
    assert acc.tolist() == [1.0, 0.0] * 20 and fmt.tolist() == [1.0] * 40
    coin = (total - 0.5).tolist()  # accuracy_weight 1 times the coin, plus format_weight 0.5
    assert set(coin) == {0.0, 1.0} and coin != acc.tolist() and 10 < sum(coin) < 30
    real = _scripted_grpo(dynamic_sampling=False).rewards(texts, "1", g)[0]
    assert (real - 0.5).tolist() == acc.tolist()
