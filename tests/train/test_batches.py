"""The base stage's samplers: determinism, the difficulty curriculum, the sequence-length warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import ConfigError
from components.train.batches import (IGNORE, Curriculum, RowBatches, StreamBatches, bigram_nll, difficulty,
                                      rank01)
from components.train.config import TrainConfig

PAD = 0


def _rows(n: int = 200, seed: int = 0, vocab: int = 50) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(2, 40))).tolist() for _ in range(n)]


def _batches(rows, start=0.1, growth=10, seq_len=64, batch=8, seed=0, weights=None, seq_start=0, seq_steps=0):
    cur = Curriculum(start, growth, seq_start, seq_steps)
    w = weights if weights is not None else [1.0] * len(rows)
    return RowBatches(rows, w, seq_len, batch, seed, PAD, difficulty(rows), cur)


def test_same_seed_step_micro_gives_the_same_batch_and_micro_changes_it():
    rows = _rows()
    a, b = _batches(rows), _batches(rows)
    for step in (0, 3, 50):
        x, y = a.get(step, 1), b.get(step, 1)
        assert torch.equal(x.idx, y.idx) and torch.equal(x.targets, y.targets) and torch.equal(x.weights, y.weights)
    assert a.pick(20, 0) != a.pick(20, 1)
    assert a.pick(20, 0) != _batches(rows, seed=1).pick(20, 0)
    b.get(7, 3)  # order of calls does not matter: no sampler state
    assert a.pick(5, 2) == b.pick(5, 2)


def test_early_steps_draw_only_from_the_easiest_rows_and_the_pool_grows_to_all():
    rows = _rows(300)
    rb = _batches(rows, start=0.1, growth=10)
    d = difficulty(rows)
    easiest = set(np.lexsort((np.arange(len(rows)), d))[:30].tolist())
    assert set(rb.pool(0).tolist()) == easiest
    drawn = {i for m in range(40) for i in rb.pick(0, m)}
    assert drawn <= easiest and len(drawn) > 15
    assert max(d[list(drawn)]) <= np.sort(d)[29]
    sizes = [len(rb.pool(s)) for s in range(15)]
    assert sizes[0] == 30 and sizes == sorted(sizes) and sizes[10] == sizes[14] == 300
    assert sizes[5] == 165  # f(5) = 0.1 + 0.9 * 0.5
    late = {i for m in range(200) for i in rb.pick(12, m)}
    assert len(late - easiest) > 100


def test_curriculum_start_one_draws_from_all_rows_at_step_zero():
    rows = _rows(100)
    rb = RowBatches(rows, [1.0] * 100, 64, 8, 0, PAD, difficulty(rows), Curriculum(1.0, 10))
    assert len(rb.pool(0)) == 100
    assert len({i for m in range(100) for i in rb.pick(0, m)}) > 80
    plain = RowBatches(rows, [1.0] * 100, 64, 8, 0, PAD)  # no curriculum: the same draws
    assert rb.pick(0, 0) == plain.pick(0, 0)


def test_a_curriculum_needs_difficulty():
    with pytest.raises(ValueError, match="difficulty"):
        RowBatches(_rows(5), [1.0] * 5, 64, 2, 0, PAD, None, Curriculum(0.5, 10))


def test_bigram_proxy_ranks_random_rows_harder_than_repetitive_ones():
    rng = np.random.default_rng(1)
    repetitive = [[5, 6] * 15 for _ in range(20)] + [[7] * 30 for _ in range(20)]
    random = [rng.integers(0, 256, 30).tolist() for _ in range(40)]
    rows = repetitive + random  # all of length 30: only the bigram term separates them
    nll = bigram_nll(rows, 256)
    assert nll[40:].min() > nll[:40].max()
    d = difficulty(rows, 256)
    assert d[40:].min() > d[:40].max()
    assert 0 <= d.min() and d.max() <= 1


def test_difficulty_counts_length_too():
    rows = [[3, 4] * k for k in range(1, 30)]  # same bigram mix, growing length
    d = difficulty(rows)
    assert d[0] < d[-1] and np.argmin(d) == 0


def test_rank01_ties_share_a_rank():
    assert rank01(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [5 / 6, 0.0, 5 / 6, 1 / 3]
    assert rank01(np.array([7])).tolist() == [0.0]


def _bigram_reference(rows, V):
    from collections import Counter
    pairs = Counter((a, b) for r in rows for a, b in zip(r, r[1:]))
    ctx = Counter(a for r in rows for a in r[:-1])
    return [np.mean([-np.log((pairs[a, b] + 1) / (ctx[a] + V)) for a, b in zip(r, r[1:])]) if len(r) > 1 else 0.0
            for r in rows]


@pytest.mark.parametrize("V", [60, 5000])  # dense counts, sparse counts
def test_bigram_nll_matches_a_plain_reference(V):
    rows = _rows(60, vocab=50) + [[3], []]
    assert np.allclose(bigram_nll(rows, V), _bigram_reference(rows, V))
    with pytest.raises(ValueError):
        bigram_nll([[1, 99]], 50)


def test_seq_len_warm_up_is_monotone_in_multiples_of_eight_and_reaches_block_size():
    cur = Curriculum(seq_len_start=32, seq_len_warmup_steps=50)
    lengths = [cur.seq_len(s, 192) for s in range(80)]
    assert lengths[0] == 32 and lengths == sorted(lengths)
    assert all(L % 8 == 0 for L in lengths) and lengths[50] == lengths[-1] == 192
    assert Curriculum().seq_len(0, 100) == 100
    assert Curriculum(seq_len_start=300, seq_len_warmup_steps=5).seq_len(0, 64) == 64  # clamped


def test_rows_are_cut_to_the_warm_up_length_and_targets_ignore_padding():
    rows = [list(range(1, 101)), [9, 8, 7]]
    rb = RowBatches(rows, [0.5, 2.0], 64, 2, 0, PAD, difficulty(rows), Curriculum(1.0, 0, 16, 10))
    for step, L in ((0, 16), (10, 64)):
        for m in range(6):
            b, pick = rb.get(step, m), rb.pick(step, m)
            assert b.idx.shape == b.targets.shape and b.idx.shape[1] <= L
            for r, i in enumerate(pick):
                n = min(len(rows[i]), L + 1) - 1
                assert b.idx[r, :n].tolist() == rows[i][:n] and b.targets[r, :n].tolist() == rows[i][1:n + 1]
                assert (b.targets[r, n:] == IGNORE).all() and (b.idx[r, n:] == PAD).all()
            assert b.weights.tolist() == [[0.5, 2.0][i] for i in pick]
            assert b.tokens == sum(min(len(rows[i]), L + 1) - 1 for i in pick)


def test_stream_windows_follow_the_warm_up():
    tokens = torch.arange(1000)
    cur = Curriculum(seq_len_start=8, seq_len_warmup_steps=4)
    sb = StreamBatches(tokens, 32, 3, 0, cur)
    assert [sb.get(s).idx.shape[1] for s in range(6)] == [cur.seq_len(s, 32) for s in range(6)]
    assert sb.get(0).idx.shape == (3, 8) and sb.get(4).idx.shape == (3, 32)
    b = sb.get(2, 1)
    assert torch.equal(b.targets, b.idx + 1) and torch.equal(sb.get(2, 1).idx, b.idx)
    plain = StreamBatches(tokens, 32, 3, 0)  # no warm-up: the windows the stage always drew
    assert plain.get(0).idx.shape == (3, 32)


def test_train_config_fields_and_checks():
    cfg = TrainConfig(steps=100)
    assert cfg.curriculum_start == 0.1 and cfg.curriculum_steps == 0
    assert cfg.seq_len_start == 0 and cfg.seq_len_warmup_steps == 0
    cfg.check()
    assert Curriculum.from_config(cfg).growth_steps == 50
    assert Curriculum.from_config(TrainConfig(steps=100, curriculum_steps=30)).growth_steps == 30
    for bad in (dict(curriculum_start=0.0), dict(curriculum_start=1.5), dict(curriculum_steps=101),
                dict(seq_len_start=4, seq_len_warmup_steps=10), dict(seq_len_start=32),
                dict(seq_len_warmup_steps=10), dict(seq_len_start=32, seq_len_warmup_steps=200)):
        with pytest.raises(ConfigError):
            TrainConfig(steps=100, **bad).check()
    TrainConfig(steps=100, curriculum_start=1.0, seq_len_start=32, seq_len_warmup_steps=40).check()


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=50), min_size=1, max_size=60),
       start=st.floats(0.01, 1.0), growth=st.integers(0, 20), step=st.integers(0, 40), micro=st.integers(0, 5),
       seq_len=st.integers(8, 48), seq_start=st.sampled_from([0, 8, 16]), seed=st.integers(0, 3))
def test_property_picks_stay_in_the_pool_and_shapes_agree(rows, start, growth, step, micro, seq_len, seq_start,
                                                          seed):
    cur = Curriculum(start, growth, seq_start, 10 if seq_start else 0)
    w = [float(i % 3) for i in range(len(rows))]
    rb = RowBatches(rows, w, seq_len, 4, seed, PAD, difficulty(rows, 31), cur)
    pool = set(rb.pool(step).tolist())
    n = cur.pool_size(step, len(rows))
    d = difficulty(rows, 31)
    assert len(pool) == n and pool == set(np.lexsort((np.arange(len(rows)), d))[:n].tolist())
    pick = rb.pick(step, micro)
    assert len(pick) == 4 and set(pick) <= pool
    b = rb.get(step, micro)
    L = cur.seq_len(step, seq_len)
    assert b.idx.shape == b.targets.shape == (4, max(min(len(rows[i]), L + 1) for i in pick) - 1)
    assert b.idx.shape[1] <= L and b.weights.shape == (4,) and b.weights.tolist() == [w[i] for i in pick]
    assert b.tokens == sum(min(len(rows[i]), L + 1) - 1 for i in pick)
