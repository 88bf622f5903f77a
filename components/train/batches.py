"""Batches for training: from a token stream (plain text) or from tokenized rows (JSONL).

Batch k is a pure function of (seed, k, micro): the sampler draws from a generator seeded with
them, and the curriculum below depends only on the step, so a run resumed at step k sees exactly
the batches an uninterrupted run would have seen, with nothing to store but the step.

The base stage's curriculum (easy and short first, after the DeepSeek reports' progressive
training; `Curriculum`, set from TrainConfig):

- rows are ordered by a difficulty score (`difficulty`: the mean of two ranks, the row's token
  length and its mean per-token loss under an add-one bigram model fitted on all rows), and at
  step s a row is drawn only from the easiest fraction f(s) of them, growing linearly from
  `curriculum_start` to all rows over `curriculum_steps`;
- sequences are cut to L(s) tokens, growing linearly from `seq_len_start` to the model's
  block size over `seq_len_warmup_steps` (a multiple of 8 on the way); a text stream gets only
  this warm-up (its windows are L(s) tokens long).

Departures: the paper's curricula are over data mixtures and context-length extension stages;
this is the single-corpus version, with a bigram proxy standing in for a reference model's loss.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

IGNORE = -100


def generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T) input token ids
    targets: torch.Tensor  # (B, T) next tokens, IGNORE where padded
    weights: torch.Tensor  # (B,) sample weights from the data filter

    @property
    def tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


# ---- difficulty ----------------------------------------------------------------------------

def rank01(values: np.ndarray) -> np.ndarray:
    """Ranks of `values` scaled to [0, 1] (smallest 0, largest 1); ties share their mean rank."""
    values = np.asarray(values)
    n = values.size
    if n <= 1:
        return np.zeros(n)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts - 1) / 2)[inverse] / (n - 1)


def bigram_nll(rows: Sequence[Sequence[int]], vocab_size: int | None = None) -> np.ndarray:
    """(N,) each row's mean per-token negative log-likelihood (nats) under an add-one smoothed
    bigram model of token ids fitted on all `rows`: p(b | a) = (c(a, b) + 1) / (c(a) + V).

    Vectorised over the concatenated rows: pair counts by a dense bincount of a * V + b for a small
    V, else by a unique over the pairs that occur (memory linear in the tokens, not V^2); one
    to two seconds for 50k rows of 5M tokens. A row with fewer than two tokens scores 0."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    V = int(vocab_size if vocab_size is not None else (flat.max() + 1 if flat.size else 1))
    if flat.size and (flat.min() < 0 or flat.max() >= V):
        raise ValueError(f"token ids must lie in [0, {V})")
    row_of = np.repeat(np.arange(len(rows)), lengths)  # (total,) row index of each token
    inside = row_of[1:] == row_of[:-1]  # pair (t, t+1) lies within one row
    a, b, pair_row = flat[:-1][inside], flat[1:][inside], row_of[1:][inside]
    key = a * V + b
    if V * V <= 1 << 22:  # a small vocabulary (bytes): dense pair counts
        count = np.bincount(key, minlength=V * V)[key]
    else:  # sparse: only the pairs that occur (torch's unique is several times faster than numpy's)
        _, inverse, counts = torch.unique(torch.from_numpy(key), return_inverse=True, return_counts=True)
        count = counts[inverse].numpy()
    ctx_count = np.bincount(a, minlength=V)
    nll = -np.log((count + 1) / (ctx_count[a] + V))  # (pairs,)
    pairs = np.bincount(pair_row, minlength=len(rows))
    total = np.bincount(pair_row, weights=nll, minlength=len(rows))
    return np.where(pairs > 0, total / np.maximum(pairs, 1), 0.0)


def difficulty(rows: Sequence[Sequence[int]], vocab_size: int | None = None) -> np.ndarray:
    """(N,) difficulty in [0, 1]: the mean of the rank-normalised token length and the
    rank-normalised bigram loss (`bigram_nll`). Short rows of common token pairs come first;
    long rows of rare or random pairs last."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    return (rank01(lengths) + rank01(bigram_nll(rows, vocab_size))) / 2


# ---- schedule ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curriculum:
    """What the sampler may draw at step s: the pool fraction f(s) and the sequence length L(s).

    The defaults switch both off (all rows, full length from step 0)."""

    start: float = 1.0
    """f(0): the easiest fraction of rows drawn from at the first step (1.0: all rows)."""
    growth_steps: int = 0
    """f(s) reaches 1 at this step (0 with start < 1: all rows from step 1)."""
    seq_len_start: int = 0
    """L(0) in tokens (0: no warm-up)."""
    seq_len_warmup_steps: int = 0
    """L(s) reaches the full length at this step (0: no warm-up)."""

    @classmethod
    def from_config(cls, cfg) -> "Curriculum":
        """From a TrainConfig (curriculum_start, curriculum_steps, seq_len_start, seq_len_warmup_steps)."""
        growth = cfg.curriculum_steps or max(1, cfg.steps // 2)
        return cls(cfg.curriculum_start, growth, cfg.seq_len_start, cfg.seq_len_warmup_steps)

    @property
    def active(self) -> bool:
        return self.start < 1.0

    def fraction(self, step: int) -> float:
        """f(s) = start + (1 - start) * min(1, s / growth_steps)."""
        if not self.active:
            return 1.0
        if self.growth_steps <= 0:
            return self.start if step <= 0 else 1.0
        return self.start + (1.0 - self.start) * min(1.0, step / self.growth_steps)

    def pool_size(self, step: int, n: int) -> int:
        """How many of the `n` rows (the easiest first) step `step` may draw from: ceil(f(s) n), >= 1."""
        return max(1, min(n, math.ceil(self.fraction(step) * n - 1e-9)))

    def seq_len(self, step: int, full: int) -> int:
        """L(s): linear from seq_len_start to `full` over seq_len_warmup_steps, rounded to the
        nearest multiple of 8 (at least 8, at most `full`); `full` from the warm-up's end on."""
        if self.seq_len_start <= 0 or self.seq_len_warmup_steps <= 0 or step >= self.seq_len_warmup_steps:
            return full
        raw = self.seq_len_start + (full - self.seq_len_start) * step / self.seq_len_warmup_steps
        return min(full, max(8, 8 * int(raw / 8 + 0.5)))


# ---- samplers ------------------------------------------------------------------------------

class StreamBatches:
    """Random windows of `L(s) + 1` tokens from one long stream (a text corpus); L(s) is
    `seq_len` unless the curriculum warms the length up."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch: int, seed: int,
                 curriculum: Curriculum | None = None):
        if tokens.numel() <= seq_len + 1:
            raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch, self.seed = tokens, seq_len, batch, seed
        self.curriculum = curriculum or Curriculum()

    def get(self, step: int, micro: int = 0) -> Batch:
        g = generator(self.seed, step, micro)
        L = self.curriculum.seq_len(step, self.seq_len)
        starts = torch.randint(0, self.tokens.numel() - L - 1, (self.batch,), generator=g)
        window = torch.stack([self.tokens[s:s + L + 1] for s in starts.tolist()])  # (B, L+1)
        return Batch(window[:, :-1], window[:, 1:].clone(), torch.ones(self.batch))

    def fingerprint(self) -> str:
        """What a resumed run must train on to continue this one: the token stream and shape."""
        return _digest(self.tokens.numpy().tobytes(), (self.seq_len, self.batch, self.seed, self.curriculum))


class RowBatches:
    """Rows (each a token list with a weight), sampled whole, right-padded to the longest.
    With `loss_from`, row i takes no loss on its first loss_from[i] tokens (fine-tuning: the prompt).

    With a curriculum and a `difficulty` per row, step s draws only from the easiest
    `pool_size(s)` rows (ordered by difficulty, ties by row index), and cuts each row to
    L(s) + 1 tokens."""

    def __init__(self, rows: list[list[int]], weights: list[float], seq_len: int, batch: int, seed: int,
                 pad_id: int, difficulty: Sequence[float] | np.ndarray | None = None,
                 curriculum: Curriculum | None = None, loss_from: Sequence[int] | None = None):
        if not rows:
            raise ValueError("no rows to train on")
        if len(weights) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(weights)} weights")
        if loss_from is not None and len(loss_from) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(loss_from)} loss_from positions")
        self.rows = [r[:seq_len + 1] for r in rows]
        self.loss_from = list(loss_from) if loss_from is not None else None
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.seq_len, self.batch, self.seed, self.pad_id = seq_len, batch, seed, pad_id
        self.curriculum = curriculum or Curriculum()
        if self.curriculum.active and difficulty is None:
            raise ValueError("a curriculum over rows needs their difficulty")
        if difficulty is not None and len(difficulty) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(difficulty)} difficulty scores")
        if self.curriculum.active:  # easiest first, ties by row index
            d = np.asarray(difficulty, dtype=np.float64)
            self.order = torch.from_numpy(np.lexsort((np.arange(len(rows)), d)).astype(np.int64))
        else:  # the pool is every row at every step: sample row indices directly
            self.order = torch.arange(len(rows))

    def pool(self, step: int) -> torch.Tensor:
        """The row indices step `step` may draw from (easiest first)."""
        return self.order[:self.curriculum.pool_size(step, len(self.rows))]

    def pick(self, step: int, micro: int = 0) -> list[int]:
        """The row indices of batch (step, micro): a pure function of (seed, step, micro)."""
        g = generator(self.seed, step, micro)
        n = self.curriculum.pool_size(step, len(self.rows))
        return self.order[torch.randint(0, n, (self.batch,), generator=g)].tolist()

    def get(self, step: int, micro: int = 0) -> Batch:
        pick = self.pick(step, micro)
        L = self.curriculum.seq_len(step, self.seq_len)
        rows = [self.rows[i][:L + 1] for i in pick]
        width = max(len(r) for r in rows) - 1
        idx = torch.full((self.batch, width), self.pad_id, dtype=torch.long)
        targets = torch.full((self.batch, width), IGNORE, dtype=torch.long)
        for b, r in enumerate(rows):
            row = torch.tensor(r, dtype=torch.long)
            idx[b, :len(row) - 1] = row[:-1]
            targets[b, :len(row) - 1] = row[1:]
            if self.loss_from is not None:  # no loss on predicting tokens before loss_from (the prompt)
                targets[b, :max(0, self.loss_from[pick[b]] - 1)] = IGNORE
        return Batch(idx, targets, self.weights[pick])

    def fingerprint(self) -> str:
        """What a resumed run must train on to continue this one: rows, weights, order, shape."""
        rows = np.concatenate([np.asarray(r + [-1], dtype=np.int64) for r in self.rows]
                              + [np.asarray(self.loss_from or [], dtype=np.int64)])
        return _digest(rows.tobytes() + self.weights.numpy().tobytes() + self.order.numpy().tobytes(),
                       (self.seq_len, self.batch, self.seed, self.pad_id, self.curriculum))


def _digest(data: bytes, shape: tuple) -> str:
    import hashlib

    return hashlib.sha256(data + repr(shape).encode()).hexdigest()[:16]


def val_batches(rows: list[dict], tok, seq: int, micro_batch: int, seed: int) -> RowBatches | None:
    """Validation: the response tokens of the val rows (prompts excluded, as in fine-tuning)."""
    if not rows:
        return None
    ids, starts = encode_pairs(rows, tok)
    return RowBatches(ids, [1.0] * len(ids), seq, micro_batch, seed + 1, tok.pad_id, loss_from=starts)


def encode_pairs(rows: list[dict], tok) -> tuple[list[list[int]], list[int]]:
    """Each row as token ids (`prompt \\n response <eos>`, or the chat template of a pretrained
    model's tokenizer: Tokenizer.pair_ids), and where its response starts."""
    ids, starts = [], []
    for r in rows:
        full, start = tok.pair_ids(r.get("prompt") or "", r.get("response") or "")
        ids.append(full)
        starts.append(start)
    return ids, starts
