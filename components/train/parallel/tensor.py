"""Tensor parallelism (Megatron-LM, arXiv 1909.08053), swapped into the single-device model.

    shard_model(model, group)   # in place: every block's linears, the embedding and the head

Each rank of a tensor-parallel group of size tp keeps 1/tp of every block's matrices:

- attention: `c_attn` is column-parallel by heads (this rank's q, k and v heads), `c_proj`
  row-parallel; the attention itself runs on n_head/tp local heads with no communication;
- feed-forward (SwiGLU, and each MoE expert): `w_gate`, `w_up` column-parallel, `c_proj`
  row-parallel; MoE routers, norms and the expert biases stay whole (replicated);
- the tied embedding / output head is vocabulary-parallel: rows [start, end) of the vocabulary
  per rank (padded to a multiple of tp with rows that are never looked up and whose logits are
  -inf), and the loss is the vocabulary-parallel cross-entropy, so no rank holds (B, T, V).

Communication per block and micro-batch: forward, one all-reduce of (B, T, C) after each
row-parallel layer; backward, one all-reduce of (B, T, C) at the input of the attention's and of
the feed-forward's column-parallel layers (`_CopyToTP`; gate and up share one, as Megatron's fused
gate/up projection does: 2 instead of 3 per block, benchmarks/parallel.py); plus the embedding's forward all-reduce, the head's backward one, and three
(B, T) all-reduces in the loss. Every collective goes through `deepspeed.comm` with a
`tp.`-prefixed name, so DeepSpeed's comms logger counts it (benchmarks/parallel.py).

Sharded parameters carry `model_parallel = True` (DeepSpeed's gradient-norm clipping then sums
their norms over the group and counts replicated ones once) and `tp_shard` (how to rebuild the
whole tensor, components/train/parallel/state.py). Departures from Megatron: no sequence
parallelism, no fused qkv split across GQA groups (the model has no GQA), no padding of the
vocabulary in the checkpoint (padding rows exist only in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.config import ConfigError


def _all_reduce(x: torch.Tensor, group, name: str, op=None) -> torch.Tensor:
    from deepspeed import comm as dist

    dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group, log_name=name)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous(), ctx.group, "tp.all_reduce.grad"), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (the partial sums of a row-parallel layer); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.contiguous(), group, "tp.all_reduce.act")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


@dataclass(frozen=True)
class Shard:
    """How a parameter is split over the tensor-parallel group: along `dim`, each segment of the
    whole tensor (sizes `segments` along `dim`; empty: one segment) split separately (the fused
    projection's query, key and value parts, which differ in size under grouped-query attention);
    or, with `full`, vocabulary rows padded to a multiple of the group (`full` rows before padding)."""

    dim: int
    segments: tuple[int, ...] = ()
    full: int = 0


def _mark(p: nn.Parameter, shard: Shard) -> nn.Parameter:
    p.model_parallel = True  # deepspeed.runtime.utils.is_model_parallel_parameter
    p.tp_shard = shard
    return p


def split(full: torch.Tensor, shard: Shard, rank: int, size: int) -> torch.Tensor:
    """This rank's part of the whole tensor `full` (a copy), padded along a vocabulary dim."""
    if shard.full:  # vocabulary rows, padded to a multiple of size
        per = -(-shard.full // size)
        out = full.new_zeros((per,) + tuple(full.shape[1:]))
        part = full[rank * per: min((rank + 1) * per, shard.full)]
        out[: part.size(0)] = part
        return out
    chunks = full.split(list(shard.segments), dim=shard.dim) if shard.segments else (full,)
    return torch.cat([c.chunk(size, dim=shard.dim)[rank] for c in chunks], dim=shard.dim).clone()


def join(parts: list[torch.Tensor], shard: Shard) -> torch.Tensor:
    """The whole tensor from every rank's part, in rank order (the inverse of `split`)."""
    if shard.full:
        return torch.cat(parts, dim=0)[: shard.full]
    local = [s // len(parts) for s in shard.segments] or [parts[0].size(shard.dim)]
    pieces = [p.split(local, dim=shard.dim) for p in parts]  # [rank][segment]
    return torch.cat([torch.cat([pc[s] for pc in pieces], dim=shard.dim) for s in range(len(local))],
                     dim=shard.dim)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T: this rank's output features (rows of W); the output stays split."""

    def __init__(self, linear: nn.Linear, group, rank: int, size: int, segments: tuple[int, ...] = (),
                 copy_input: bool = True):
        super().__init__()
        self.group, self.copy_input = group, copy_input
        shard = Shard(dim=0, segments=tuple(segments))
        self.weight = _mark(nn.Parameter(split(linear.weight.data, shard, rank, size)), shard)
        self.bias = None if linear.bias is None else _mark(nn.Parameter(split(linear.bias.data, shard, rank, size)),
                                                           shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # copy_input False: the caller copied x once for several column-parallel layers (SwiGLU's
        # gate and up), so their input gradients are summed before the one all-reduce
        return F.linear(_CopyToTP.apply(x, self.group) if self.copy_input else x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T: this rank's input features (columns of W)."""

    def __init__(self, linear: nn.Linear, group, rank: int, size: int):
        super().__init__()
        self.group = group
        shard = Shard(dim=1)
        self.weight = _mark(nn.Parameter(split(linear.weight.data, shard, rank, size)), shard)
        self.bias = linear.bias  # replicated, added once after the reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + per) of the (padded) vocabulary; `forward` looks tokens up, `logits`
    is the tied output head's local (B, T, per) slice."""

    def __init__(self, weight: torch.Tensor, group, rank: int, size: int):
        super().__init__()
        self.group, self.vocab = group, weight.size(0)
        shard = Shard(dim=0, full=self.vocab)
        self.weight = _mark(nn.Parameter(split(weight.data, shard, rank, size)), shard)
        self.per = self.weight.size(0)
        self.start = rank * self.per
        self.real = max(0, min(self.per, self.vocab - self.start))  # rows of real tokens here

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.start
        outside = (local < 0) | (local >= self.per)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        x = x.masked_fill(outside[..., None], 0.0)
        return _ReduceFromTP.apply(x, self.group)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = F.linear(_CopyToTP.apply(h, self.group), self.weight)  # (B, T, per)
        if self.real < self.per:  # padding rows: never the answer
            out = out.clone()
            out[..., self.real:] = float("-inf")
        return out


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy (N,) from vocabulary-split logits (N, V/tp): the max, the target's
    logit and the sum of exponentials are all-reduced; nothing of size V is gathered."""

    @staticmethod
    def forward(ctx, logits, target, start, group):
        from deepspeed import comm as dist

        logits = logits.float()
        m = logits.max(dim=-1).values  # (N,)
        _all_reduce(m, group, "tp.all_reduce.loss", op=dist.ReduceOp.MAX)
        z = logits - m[:, None]
        local = target - start
        inside = (local >= 0) & (local < logits.size(-1))
        rows = torch.arange(z.size(0), device=z.device)
        picked = torch.where(inside, z[rows, local.clamp(0, logits.size(-1) - 1)], torch.zeros_like(m))
        exp = z.exp()
        total = exp.sum(dim=-1)
        both = torch.stack([picked, total])  # one all-reduce for the target logit and the sum
        _all_reduce(both, group, "tp.all_reduce.loss")
        picked, total = both
        ctx.save_for_backward(exp / total[:, None], local, inside)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, inside = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.size(0), device=g.device)[inside]
        g[rows, local[inside]] -= 1.0
        return g * grad[:, None], None, None, None


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                        embedding: VocabParallelEmbedding, ignore_index: int = -100) -> torch.Tensor:
    """The model's loss (Transformer.forward) from local logits (B, T, V/tp): the mean token
    cross-entropy over targets that are not `ignore_index`, each weighted by its sequence's weight."""
    B, T, _ = logits.shape
    ce = _VocabParallelCE.apply(logits.reshape(B * T, -1), targets.reshape(B * T), embedding.start,
                                embedding.group).view(B, T)
    w = (targets != ignore_index).float()
    if weights is not None:
        w = w * weights.float().view(B, 1)
    return (ce * w).sum() / w.sum().clamp_min(1e-12)


def check_divisible(model_cfg, tp: int) -> None:
    """Refuse a model whose heads or feed-forward width do not split over `tp` ranks."""
    for name, value in (("model.n_head", model_cfg.n_head), ("model.n_kv_head", model_cfg.kv_heads),
                        ("model.ffn_hidden (the SwiGLU width)", model_cfg.hidden)):
        if value % tp:
            raise ConfigError(f"{name}: {value} is not divisible by train.tensor_parallel {tp}")


def shard_model(model: nn.Module, group, rank: int, size: int) -> nn.Module:
    """Swap tensor-parallel layers into the single-device Transformer `model`, in place."""
    from components.model.model import MoE, SwiGLU

    if size == 1:
        return model
    check_divisible(model.cfg, size)

    def swiglu(ffn: SwiGLU) -> None:
        ffn.w_gate = ColumnParallelLinear(ffn.w_gate, group, rank, size, copy_input=False)
        ffn.w_up = ColumnParallelLinear(ffn.w_up, group, rank, size, copy_input=False)
        ffn.c_proj = RowParallelLinear(ffn.c_proj, group, rank, size)
        ffn.register_forward_pre_hook(lambda module, args: (_CopyToTP.apply(args[0], group), *args[1:]))

    for block in model.blocks:
        attn = block.attn
        q, kv = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
        attn.c_attn = ColumnParallelLinear(attn.c_attn, group, rank, size, segments=(q, kv, kv))
        attn.c_proj = RowParallelLinear(attn.c_proj, group, rank, size)
        attn.n_head //= size  # the attention runs on this rank's query and key/value heads
        attn.n_kv_head //= size
        ffn = block.ffn
        for expert in ([*ffn.experts, *([ffn.shared] if ffn.shared is not None else [])]
                       if isinstance(ffn, MoE) else [ffn]):
            swiglu(expert)
    tied = model.cfg.tie_embeddings
    model.wte = VocabParallelEmbedding(model.wte.weight, group, rank, size)
    # the head: the embedding's own `logits` when tied, else a vocabulary-parallel matrix of its own
    model.lm_head = model.wte if tied else VocabParallelEmbedding(model.lm_head.weight, group, rank, size)
    return model
