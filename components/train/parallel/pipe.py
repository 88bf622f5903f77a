"""3D parallelism: pipeline (DeepSpeed PipelineModule) x tensor (Megatron) x data (ZeRO-1).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 8 --module pipelines.cli train --stage base \\
        --data data/split --out runs/base --set train.pipeline_parallel=2 --set train.tensor_parallel=2

The launcher's world is laid out as DeepSpeed's PipeModelDataParallelTopology(pp, tp, dp):
rank = stage * (dp * tp) + data * tp + slice, so a tensor-parallel group is tp consecutive ranks
(one node, the fastest links) and a pipeline spans the slowest. Every rank builds the whole
single-device Transformer from the run's seed (the same weights as a one-process run), swaps the
tensor-parallel layers in (parallel/tensor.py), and hands its blocks to a PipelineModule:

    [embedding (tied)] [block 0] ... [block n-1] [final norm] [head (tied to the embedding)] -> loss

split into pp stages with the same number of blocks each ("type:BlockPipe"). DeepSpeed's
PipelineEngine runs the 1F1B schedule over `grad_accum` micro-batches, all-reduces the tied
embedding's gradient between the first and last stage, and applies ZeRO-1 over the dp ranks of
each (stage, slice). Micro-batch m of data rank r is batch (step, m * dp + r), so the global
batch is what one process sees with grad_accum * dp micro-batches: the losses match it.

ZeRO-1 runs even when dp = 1 (see `build`: DeepSpeed's gradient clipping without ZeRO miscounts
the norm across stages; with it, a pp=2 x tp=2 run scaled every gradient by 0.74 and only Adam's
scale invariance hid it, until a checkpoint's moments resumed under another topology).

Departures: every rank materialises the whole model once before sharding (fine to a few billion
parameters on a node's host memory; beyond that, build on the meta device and load shards);
activations between stages are sent whole, not split over the slice ("pipe_partitioned" off),
which costs tp times the point-to-point bytes and keeps the accounting in benchmarks/parallel.py
plain; only the language-modeling stages (base) run pipelined; GRPO generation and the later
stages stay data-parallel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from components.config import ConfigError
from components.model import ModelConfig, Transformer
from components.model.model import model_rope_tables, token_loss
from components.train.parallel.tensor import VocabParallelEmbedding, shard_model, vocab_parallel_loss


@dataclass(frozen=True)
class Topology:
    """pp x tp x dp = world size."""

    pp: int
    tp: int
    dp: int

    @classmethod
    def of(cls, cfg, world: int) -> "Topology":
        pp, tp = cfg.pipeline_parallel, cfg.tensor_parallel
        if world % (pp * tp):
            raise ConfigError(f"train.pipeline_parallel ({pp}) x train.tensor_parallel ({tp}) = {pp * tp} does not "
                              f"divide the {world} processes the launcher started; start a multiple of {pp * tp}")
        return cls(pp, tp, world // (pp * tp))

    def __str__(self) -> str:
        return f"pp={self.pp} x tp={self.tp} x dp={self.dp}"


def head_logits(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V or V/tp) of the output head: a vocabulary-parallel embedding's, a plain
    embedding used as the tied head, or a linear layer."""
    if isinstance(head, VocabParallelEmbedding):
        return head.logits(h)
    if isinstance(head, nn.Embedding):
        return F.linear(h, head.weight)
    return head(h)


class EmbedPipe(nn.Module):
    """The first stage's token embedding (and dropout); tied, it is also the last stage's head."""

    def __init__(self, wte: nn.Module, dropout: float):
        super().__init__()
        self.wte, self.drop = wte, nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(idx))  # (B, T, C)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(self.wte, h)


class HeadPipe(nn.Module):
    """The last stage's output head when it is not tied to the embedding."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(self.head, h)


class BlockPipe(nn.Module):
    """One transformer block with its RoPE tables (float32 whatever the model is cast to)."""

    def __init__(self, block: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.block, self.cfg = block, cfg
        cos, sin = model_rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.rope_cos.device
        self.rope_cos, self.rope_sin = model_rope_tables(self.cfg, device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
        return self.block(x, self.rope_cos, self.rope_sin)


class PipeLoss:
    """loss_fn(logits, (targets, weights)) of the last stage: the model's weighted token loss,
    vocabulary-parallel when the head is split."""

    def __init__(self, head: nn.Module):
        self.head = head

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, weights = labels
        if isinstance(self.head, VocabParallelEmbedding):
            return vocab_parallel_loss(logits, targets, weights, self.head)
        return token_loss(logits, targets, weights)


@dataclass
class Parallel:
    """What the training loop needs of a 3D-parallel run."""

    engine: Any
    """DeepSpeed's PipelineEngine."""
    model: Transformer
    """The tensor-parallel single-device model whose layers the pipeline holds (all of them on
    every rank; only this stage's run)."""
    topology: Topology
    names: dict[int, str]
    """id(parameter) -> its name in the single-device model (the checkpoint's key)."""
    tp_group: Any
    tp_rank: int

    @functools.cached_property
    def local_moe(self) -> set[int]:
        """ids of the MoE layers this rank's stage runs (engine.balance_experts)."""
        from components.model.model import MoE

        return {id(m) for m in self.engine.module.modules() if isinstance(m, MoE)}

    @property
    def stage(self) -> int:
        return self.engine.stage_id

    @property
    def dp_rank(self) -> int:
        return self.engine.grid.get_data_parallel_id()


def _tp_group(topo, rank: int) -> tuple[Any, int]:
    """This rank's tensor-parallel process group and its place in it (every rank creates every group)."""
    from deepspeed import comm as dist

    mine, where = None, 0
    for ranks in topo.get_axis_comm_lists("model"):
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine, where = group, ranks.index(rank)
    return mine, where


def build(model_cfg: ModelConfig, cfg, ds_config: Callable[[Any, int], dict[str, Any]],
          init: dict[str, torch.Tensor] | None = None) -> Parallel:
    """The PipelineEngine of `model_cfg` under cfg's topology, initialised from cfg.seed (or `init`)."""
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.pipe import PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if cfg.precision == "fp16":
        raise ConfigError("train.precision: fp16 is not supported with pipeline or tensor parallelism "
                          "(its loss scale is not carried across topologies); use bf16")
    deepspeed.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = Topology.of(cfg, world)
    if topo.pp > model_cfg.n_layer:
        raise ConfigError(f"train.pipeline_parallel: {topo.pp} stages for {model_cfg.n_layer} blocks (model.n_layer); "
                          f"at most one stage per block")
    ds_topo = PipeModelDataParallelTopology(num_pp=topo.pp, num_mp=topo.tp, num_dp=topo.dp)
    tp_group, tp_rank = _tp_group(ds_topo, rank)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    if init is not None:
        model.load_state_dict(init)
    shard_model(model, tp_group, tp_rank, topo.tp)
    names = {id(p): n for n, p in model.named_parameters()}
    tied = model_cfg.tie_embeddings
    layers: list[Any] = [TiedLayerSpec("embed", EmbedPipe, model.wte, model_cfg.dropout, tied_weight_attr="wte.weight")
                         if tied else EmbedPipe(model.wte, model_cfg.dropout)]
    layers += [BlockPipe(b, model_cfg) for b in model.blocks]
    layers.append(model.ln_f)
    layers.append(TiedLayerSpec("embed", EmbedPipe, model.wte, model_cfg.dropout, tied_weight_attr="wte.weight",
                                forward_fn=lambda module, h: module.logits(h)) if tied else HeadPipe(model.lm_head))
    net = PipelineModule(layers=layers, loss_fn=PipeLoss(model.lm_head), topology=ds_topo,
                         partition_method="type:BlockPipe", dynamic_shape=True)
    here = {id(p) for p in net.parameters()}  # this stage's: the model's decay / no-decay groups, cut to them
    groups = [{**g, "params": [p for p in g["params"] if id(p) in here]}
              for g in model.configure_optimizer_groups(cfg.weight_decay)]
    config = ds_config(cfg, topo.dp)
    config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    # ZeRO-1 even over one data-parallel rank: DeepSpeed 0.19.8's clipping without ZeRO
    # (runtime/utils.py clip_grad_norm_) counts the tied embedding on both end stages and the
    # replicated weights (norms) of stage 0 only; ZeRO's counts each weight once
    config["zero_optimization"] = {"stage": 1}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=[g for g in groups if g["params"]], config=config)
    return Parallel(engine, model, topo, names, tp_group, tp_rank)


@torch.no_grad()
def evaluate(engine, batches, n: int) -> float:
    """Mean loss over `n` fixed validation batches (every data rank evaluates the same ones)."""
    losses = []
    for i in range(n):
        b = batches.get(i)
        ones = torch.ones(b.idx.size(0))
        losses.append(float(engine.eval_batch(iter([(b.idx, (b.targets, ones))]), num_micro_batches=1)))
    return sum(losses) / len(losses)


def num_params(model_cfg: ModelConfig) -> int:
    """Parameters of the whole single-device model (the tied embedding once)."""
    with torch.device("meta"):
        return Transformer(model_cfg).num_params()

