"""Batches for training: from a token stream (plain text) or from tokenized rows (JSONL).

Batch k is a pure function of (seed, k): the sampler draws from a generator seeded with both,
so a run resumed at step k sees exactly the batches an uninterrupted run would have seen,
with nothing to store but the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


def _generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


@dataclass
class Batch:
    idx: torch.Tensor  # (B, T) input token ids
    targets: torch.Tensor  # (B, T) next tokens, IGNORE where padded
    weights: torch.Tensor  # (B,) sample weights from the data filter

    @property
    def tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


class StreamBatches:
    """Random windows of `seq_len + 1` tokens from one long stream (a text corpus)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch: int, seed: int):
        if tokens.numel() <= seq_len + 1:
            raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch, self.seed = tokens, seq_len, batch, seed

    def get(self, step: int, micro: int = 0) -> Batch:
        g = _generator(self.seed, step, micro)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch,), generator=g)
        window = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        return Batch(window[:, :-1], window[:, 1:].clone(), torch.ones(self.batch))


class RowBatches:
    """Rows (each a token list with a weight), sampled whole, right-padded to the longest."""

    def __init__(self, rows: list[list[int]], weights: list[float], seq_len: int, batch: int, seed: int,
                 pad_id: int):
        if not rows:
            raise ValueError("no rows to train on")
        self.rows = [r[:seq_len + 1] for r in rows]
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.seq_len, self.batch, self.seed, self.pad_id = seq_len, batch, seed, pad_id

    def get(self, step: int, micro: int = 0) -> Batch:
        g = _generator(self.seed, step, micro)
        pick = torch.randint(0, len(self.rows), (self.batch,), generator=g).tolist()
        width = max(len(self.rows[i]) for i in pick) - 1
        idx = torch.full((self.batch, width), self.pad_id, dtype=torch.long)
        targets = torch.full((self.batch, width), IGNORE, dtype=torch.long)
        for b, i in enumerate(pick):
            row = torch.tensor(self.rows[i], dtype=torch.long)
            idx[b, :len(row) - 1] = row[:-1]
            targets[b, :len(row) - 1] = row[1:]
        return Batch(idx, targets, self.weights[pick])
