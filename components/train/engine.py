"""The training engine: one stage of training on DeepSpeed, resumable to the bit.

    from components.train.engine import LanguageModeling, train
    summary = train(model_cfg, train_cfg, LanguageModeling(train_batches), val_batches, tokenizer, "runs/base")

DeepSpeed owns the optimisation: AdamW (torch's), the warm-up + cosine schedule
(WarmupCosineLR), bf16 mixed precision or fp32, ZeRO stage 0/1/2, gradient accumulation and
clipping. One process is enough (this module sets up a single-rank gloo group when no launcher
did); `deepspeed --num_gpus N` starts N data-parallel ranks of the same code.

What a step computes is the stage's Objective (LanguageModeling below, GRPO, Distillation); how
it runs over the ranks is a Trainer, chosen once by `trainer`: DataParallel (below) or, with
pipeline or tensor parallelism, parallel/trainer.py's PipelineTrainer. `train`'s loop is the
same for both.

Every `checkpoint_every` steps a checkpoint is written (components/train/checkpoint.py:
safetensors + JSON, atomic). Called again on the same output folder, `train` resumes from the
newest checkpoint: batch k depends only on (seed, k), the RNG states travel in the checkpoint,
so a run killed at any moment and resumed logs the same per-step losses and ends with the same
parameters as one that never stopped. `metrics.jsonl` is cut back to the resumed step.

Outputs: checkpoints/, metrics.jsonl (step, loss, lr, tokens/s, val_loss), loss.png and plots/
(drawn from it by components/train/metrics.py), and model/ (model.safetensors, model.json, the
tokenizer), written whole at the end.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from components.artifacts import atomic_dir
from components.config import ConfigError
from components.console import Progress, log
from components.model import ModelConfig, Transformer, lora
from components.train import checkpoint, metrics, opbuild
from components.train.batches import Batch
from components.train.config import TrainConfig
from components.train.precision import resolve as resolve_precision


class Batches(Protocol):
    def get(self, step: int, micro: int = 0) -> Batch: ...

    def fingerprint(self) -> str:
        """A digest of the data and the sampler's shape: a checkpoint resumes only on the same."""


class Objective(Protocol):
    """What one optimizer step of a stage does on a data-parallel engine; the engine owns
    everything around it (resume, logging, checkpoints, evaluation, export)."""

    def step(self, engine, step: int, rank: int, world: int) -> dict[str, Any]:
        """Run `grad_accum` micro-steps (engine.backward + engine.step each); return the step's
        metrics: at least "loss" and "tokens" (this rank's trained tokens)."""

    def fingerprint(self) -> str | None:
        """A digest of the data: a checkpoint resumes only on the same."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """Extra modules whose weights a checkpoint carries (a frozen reference model...)."""


class Trainer(Protocol):
    """How a stage's optimizer steps run, chosen once per run (`trainer`): DeepSpeed engines
    holding the whole model on every rank (DataParallel, below), or DeepSpeed's PipelineEngine
    over pipeline x tensor x data-parallel ranks (components/train/parallel/trainer.py). The loop
    in `train` (resume, logging, checkpoints, evaluation, export) is the same for both and knows
    nothing of the layout."""

    model: Transformer
    """The single-device model (its parameter count, MoE layers and LoRA adapters)."""
    moe_local: set[int] | None
    """ids of the MoE layers this rank runs (None: every one; see balance_experts)."""
    batch_ranks: int | None
    """What joins the run's fingerprint (run_fingerprint's `dp`): the data-parallel ranks when any
    topology with the same global batch may resume a checkpoint; None when only the same world
    size may (check_resumable says so)."""

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (every micro-batch forward and backward, then the update) on this
        rank; the metrics: "loss" (over the global batch), "tokens" (every data-parallel rank's)
        and the stage's own."""

    def lr(self) -> float:
        """The learning rate of the step just taken."""

    def evaluate(self, batches: Batches, n: int) -> float:
        """Mean loss over `n` fixed validation batches."""

    def resume(self, path: Path, run_id: dict[str, Any]) -> int:
        """Refuse a checkpoint this run cannot continue exactly, else load it; its step."""

    def save(self, root: Path, step: int, run_id: dict[str, Any], keep: int) -> None:
        """Write checkpoint `step` under `root` (a collective)."""

    def weights(self, root: Path) -> dict[str, torch.Tensor]:
        """The trained fp32 weights by their single-device names, whole on rank 0 (a collective;
        `root`: the checkpoints, the last of which the step before wrote)."""

    def num_params(self) -> int:
        """Parameters of the single-device model."""


class LanguageModeling:
    """The base and fine-tune objective: next-token cross-entropy on `batches`, each sequence's
    loss scaled by its sample weight (targets IGNORE where no loss is taken)."""

    def __init__(self, batches: Batches):
        self.batches = batches

    def step(self, engine, step: int, rank: int, world: int) -> dict[str, Any]:
        tokens, total = 0, 0.0
        accum = engine.gradient_accumulation_steps()
        for micro in range(accum):
            b = self.batches.get(step, micro * world + rank)  # each rank its own micro-batches
            _, loss = engine(b.idx, b.targets, b.weights, output="loss")  # fused linear + CE on CUDA
            engine.backward(loss)
            engine.step()
            tokens += b.tokens
            total += loss.item()
        return {"loss": mean_over_ranks(total / accum, world), "tokens": tokens}

    def fingerprint(self) -> str | None:
        return self.batches.fingerprint()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}


class DataParallel:
    """The Trainer of every stage but a pipelined or tensor-parallel base: each rank holds the
    whole model in a DeepSpeed engine (ZeRO 0-2 across ranks); `objective` runs the micro-batches."""

    moe_local = None
    batch_ranks = None

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, objective: Objective,
                 init: dict[str, torch.Tensor] | None = None, freeze: Callable[[Transformer], None] | None = None):
        self.engine, self.model = build_engine(model_cfg, cfg, init, freeze)
        self.objective, self.fp16 = objective, cfg.precision == "fp16"
        self.extra_modules = objective.modules()
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        # the exact starting values of the frozen weights (the module holds them cast for compute)
        self.frozen = {n: init[n].float() for n, p in self.model.named_parameters() if not p.requires_grad} if init else {}

    def step(self, step: int) -> dict[str, Any]:
        result = self.objective.step(self.engine, step, self.rank, self.world)
        result["tokens"] *= self.world
        if self.fp16:
            result.update(loss_scale=float(self.engine.optimizer.loss_scale), skipped_steps=self.engine.skipped_steps)
        return result

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def evaluate(self, batches: Batches, n: int) -> float:
        return evaluate(self.engine, batches, n)

    def resume(self, path: Path, run_id: dict[str, Any]) -> int:
        check_resumable(path, run_id, self.world)
        return checkpoint.load(path, self.engine, self.extra_modules)["step"]

    def save(self, root: Path, step: int, run_id: dict[str, Any], keep: int) -> None:
        checkpoint.save(root, step, self.engine, extra=run_id, keep=keep, modules=self.extra_modules)

    def weights(self, root: Path) -> dict[str, torch.Tensor]:
        return fp32_state(self.engine, self.frozen)  # every rank: gathering ZeRO's fp32 partitions is a collective

    def num_params(self) -> int:
        return self.model.num_params()


def trainer(model_cfg: ModelConfig, cfg: TrainConfig, objective: Objective,
            init: dict[str, torch.Tensor] | None = None,
            freeze: Callable[[Transformer], None] | None = None) -> Trainer:
    """The run's Trainer: 3D-parallel when cfg asks for pipeline or tensor parallelism (the base
    stage's language modeling only), data-parallel otherwise."""
    if cfg.pipeline_parallel * cfg.tensor_parallel == 1:
        return DataParallel(model_cfg, cfg, objective, init, freeze)
    if freeze is not None or not isinstance(objective, LanguageModeling):
        raise ConfigError("train.pipeline_parallel / tensor_parallel: only the base stage's language modeling "
                          "runs pipelined or tensor-parallel; keep both at 1 for the other stages")
    from components.train.parallel.trainer import PipelineTrainer

    _single_process_group()
    return PipelineTrainer(model_cfg, cfg, objective.batches, deepspeed_config, init)


def mean_over_ranks(value: float, world: int) -> float:
    """The mean of a per-rank scalar over the data-parallel ranks (the step's loss over the whole
    global batch, not rank 0's share of it)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t) / world


def _single_process_group() -> None:
    """A one-rank gloo group when no launcher set one up (CLI, KFP component, tests); and no
    build of DeepSpeed's shared-memory op (`_skip_shm_op`), nor a wait on a dead build's lock
    (components/train/opbuild.py)."""
    _skip_shm_op()
    opbuild.guard()
    if "RANK" in os.environ or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _skip_shm_op() -> None:
    """DeepSpeed's communication backend compiles its shared-memory C++ op (`deepspeed_shm_comm`)
    on a machine's first start, 1.5 to 5 minutes on 2 cores, after probing compilers for every op
    (a few seconds at every start). The op serves only `inference_all_reduce` (DeepSpeed's
    tensor-parallel inference), which training never calls: with an empty table of compatible
    ops DeepSpeed neither probes nor builds it, and training's collectives stay torch.distributed's."""
    # DeepSpeed's own logger (INFO, with a handler of its own) passes errors only: its start-up
    # lines (the accelerator it picked, a learning rate read before the scheduler's first step)
    # are noise in every training step's output. A filter, set before DeepSpeed is imported,
    # because its import sets the logger's level.
    logging.getLogger("DeepSpeed").addFilter(_errors_only)
    import deepspeed.ops

    table = vars(deepspeed.ops)
    if "__compatible_ops__" in table:  # already probed by someone: just never build the op
        table["__compatible_ops__"]["deepspeed_shm_comm"] = False
    else:
        table["__compatible_ops__"] = {}


def deepspeed_config(cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed JSON config of a stage run by `world_size` data-parallel processes.

    One process runs ZeRO stage 0 whatever `zero_stage` says: partitioning over one rank splits
    nothing and only adds the flat-buffer copies (about 5-10 % of the step on a CPU,
    benchmarks/train_base.py); the optimizer's arithmetic is the same."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2],
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True,
                                                  "fused": True}},  # one pass per tensor, CPU and CUDA
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": cfg.steps, "warmup_num_steps": cfg.warmup_steps, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": cfg.min_lr_ratio}},
        "zero_optimization": {"stage": cfg.zero_stage if world_size > 1 else 0},
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    precision = resolve_precision(cfg.precision)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 200,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def build_engine(model_cfg: ModelConfig, cfg: TrainConfig, init: dict[str, torch.Tensor] | None = None,
                 freeze: Callable[[Transformer], None] | None = None):
    """(engine, model): the model initialised from `cfg.seed`, or loaded from the state dict
    `init` (a previous stage's weights), `freeze` applied (it clears requires_grad of what must
    not train, or swaps modules in place keeping their parameters, as QAT's fake quantizers do),
    wrapped by DeepSpeed."""
    _single_process_group()  # first: it sets up how DeepSpeed is imported
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError(f"train.precision: fp16 is not supported on this {get_accelerator().device_name()} "
                          f"accelerator; use bf16 (or fp32)")
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    if init is not None:
        model.load_state_dict(init)
    if freeze is not None:
        freeze(model)
    groups = model.configure_optimizer_groups(cfg.weight_decay)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=deepspeed_config(cfg, world))
    if world == 1:  # all-reducing one rank's gradients copies them to a flat buffer and back for nothing
        engine.enable_backward_allreduce = False  # (fp32 on 2 CPU cores: about 20 % of the step)
        # DeepSpeed clips fp32 gradients (ZeRO 0, neither bf16 nor fp16) with a Python loop of per-tensor
        # norms, an all-reduce of the total over the one-rank group and a loop of scalings; torch's foreach
        # clipping is the same arithmetic (scale = min(1, clip / (norm + 1e-6))) in a few batched calls
        engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip,
                                                                             foreach=True)
    return engine, model


@torch.no_grad()
def evaluate(engine, batches: Batches, n: int) -> float:
    """Mean loss over `n` fixed validation batches (batch i of the validation sampler)."""
    engine.eval()
    losses = []
    for i in range(n):
        b = batches.get(i)
        _, loss = engine(b.idx, b.targets, output="loss")
        losses.append(float(loss))
    engine.train()
    return sum(losses) / len(losses)


def run_fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, stage: dict[str, Any] | None = None,
                    init: dict[str, torch.Tensor] | None = None, dp: int | None = None) -> str:
    """What a checkpoint must share with the run that resumes it: every model and train setting
    except those that only say how often to save and measure or how the work is parallelised,
    the stage's own settings, and the starting weights. With `dp` (a 3D-parallel run, whose
    checkpoints any topology resumes) the global batch micro_batch x grad_accum x dp stands in
    for grad_accum."""
    import hashlib

    train = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "keep_checkpoints", "eval_every",
                                                                 "eval_batches", "pipeline_parallel", "tensor_parallel")}
    if dp is not None:
        train["global_batch"] = cfg.micro_batch * train.pop("grad_accum") * dp
    blob = json.dumps({"model": asdict(model_cfg), "train": train, "stage": stage}, sort_keys=True).encode()
    h = hashlib.sha256(blob)
    for name in sorted(init or {}):
        h.update(name.encode() + init[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_resumable(path: Path, run_id: dict[str, Any], world: int) -> None:
    """Refuse, before loading anything, a checkpoint that this run cannot continue exactly."""
    state = checkpoint.read_state(path)
    extra, saved_world = state["extra"], state["world_size"]
    fresh = "resume with the same ones, or start afresh (--fresh, or another --out)"
    if state.get("format") == "parallel":
        raise ConfigError(f"{path}: this checkpoint was written by a pipeline/tensor-parallel run "
                          f"({state['topology']}); resume it with train.pipeline_parallel or tensor_parallel above 1, "
                          f"or start afresh (--fresh, or another --out)")
    if extra.get("fingerprint") != run_id["fingerprint"]:
        raise ConfigError(f"{path}: this checkpoint was made with other model or train parameters; {fresh}")
    if saved_world != world:
        raise ConfigError(f"{path}: this checkpoint was written by {saved_world} data-parallel processes and "
                          f"this run has {world}; resume with the same number (deepspeed --num_gpus "
                          f"{saved_world}), or start afresh")
    if extra.get("data") != run_id["data"]:
        raise ConfigError(f"{path}: the training data (or tokenizer) differs from the one this checkpoint "
                          f"was trained on; resume on the same data, or start afresh (--fresh, or another --out)")


def train(model_cfg: ModelConfig, cfg: TrainConfig, objective: Objective, val_batches: Batches | None,
          tokenizer: Any, out_dir: str | os.PathLike, progress: bool = True,
          init: dict[str, torch.Tensor] | None = None, freeze: Callable[[Transformer], None] | None = None,
          stage: dict[str, Any] | None = None, adapter_base: str = "") -> dict[str, Any]:
    """Train (or resume) one stage into `out_dir`; returns the summary metrics.

    `objective`: what a step does (LanguageModeling(batches) for the base and fine-tune stages,
    GRPO, distillation...). `init` and `freeze` go to build_engine; `stage` (JSON) joins the
    run's fingerprint, so a checkpoint only resumes the same stage settings, and is recorded in
    the exported model/manifest.json. When `freeze` added LoRA adapters (components/model/lora.py),
    model/ holds the merged weights and adapter/ the adapters in PEFT's layout (`adapter_base`:
    the base model they belong to)."""
    out = Path(out_dir)
    run = trainer(model_cfg, cfg, objective, init, freeze)
    out.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank()
    start = 0
    run_id = {"fingerprint": run_fingerprint(model_cfg, cfg, stage, init, run.batch_ranks),
              "data": objective.fingerprint()}
    resume_from = checkpoint.resume_point(out / "checkpoints", log if rank == 0 else None)
    if resume_from is not None:
        start = run.resume(resume_from, run_id)
        if rank == 0:
            log.info("train: resuming from %s (step %d of %d)", resume_from, start, cfg.steps)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        metrics.cut(metrics_path, start)
    metrics_file = open(metrics_path, "a", encoding="utf-8") if rank == 0 else None
    bar = Progress(cfg.steps, stage_name(stage), "step", initial=start, enabled=progress and rank == 0)
    val_loss = None
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            result = run.step(step)
            balance_experts(run.model, run.moe_local)
            tokens = result.pop("tokens")
            record = {"step": step + 1, "loss": result.pop("loss"), "lr": run.lr(),
                      "tokens_per_s": tokens / (time.perf_counter() - t0), **result}
            last = step + 1 == cfg.steps
            if val_batches is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                val_loss = record["val_loss"] = run.evaluate(val_batches, cfg.eval_batches)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            status = f"loss {record['loss']:.3f}"
            if "reward" in record:
                status += f", reward {record['reward']:.3f}"
            if "loss_scale" in record:
                status += f", loss scale {record['loss_scale']:g}, {record['skipped_steps']} skipped"
            bar.update(status=status + (f", {record['tokens_per_s']:,.0f} tok/s" if bar.bar else ""), tokens=tokens)
            if last or (step + 1) % cfg.checkpoint_every == 0:
                run.save(out / "checkpoints", step + 1, run_id, cfg.keep_checkpoints)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    summary = metrics.summarize(metrics_path, run.num_params(), val_loss)
    state = run.weights(out / "checkpoints")
    if lora.lora_modules(run.model):
        if rank == 0:
            with atomic_dir(out / "adapter") as tmp:
                lora.save_adapter(tmp, run.model, adapter_base, state)
                (tmp / "manifest.json").write_text(json.dumps({"step": "train", "stage": stage or {}}) + "\n")
        state = lora.merged_state(run.model, state)
    if rank == 0:
        export(out / "model", state, model_cfg, tokenizer, stage)
        metrics.plot_losses(metrics_path, out / "loss.png")
        metrics.plot_data(metrics_path, out / "plots")
    return summary


def stage_name(stage: dict[str, Any] | None) -> str:
    """What a stage's progress lines are called: `train base`, `train reinforce`, `distill`..."""
    name = (stage or {}).get("name", "base")
    return name if name in ("distill", "qat") else f"train {name}"


def fp32_state(engine, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained model's fp32 weights: DeepSpeed's fp32 master copy of each trained parameter
    where it keeps one (bf16, fp16, ZeRO), the parameter itself otherwise, and the exact starting
    values of the frozen ones (the module holds them cast to bf16/fp16 for compute)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    opt = engine.optimizer
    unfused = {}  # ZeRO stage 0 with bf16/fp16: FP16_UnfusedOptimizer keeps fp32_groups beside fp16_groups
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        unfused = {id(lo): hi for los, his in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(los, his)}
    for name, p in engine.module.named_parameters():
        if name in frozen:
            state[name] = frozen[name].clone()
        elif p.requires_grad:
            master = unfused.get(id(p))
            if master is None:
                master = safe_get_full_fp32_param(p)
            if master is not None:
                state[name] = master.detach().float().reshape(p.shape).clone()
    if "lm_head.weight" in state and engine.module.cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def balance_experts(model: Transformer, local: set[int] | None = None) -> None:
    """MoE: DeepSeek-V3's aux-loss-free balancing after each step, on the expert loads of all
    ranks (summed, so every rank moves its biases the same way); a no-op for dense models.
    The loads are those of the step's last micro-batch. `local` (3D parallel: ids of the MoE
    layers this rank's pipeline stage runs): every rank holds every layer, so the others' loads,
    stale sums of an earlier step, are zeroed before the sum."""
    layers = model.moe_layers()
    if not layers:
        return
    if torch.distributed.get_world_size() > 1:
        for layer in layers:
            if local is not None and id(layer) not in local:
                layer.load.zero_()
            torch.distributed.all_reduce(layer.load)
    model.update_router_bias()


def export(folder: Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig, tokenizer: Any,
           stage: dict[str, Any] | None = None) -> None:
    """The model folder (components/model/folder.py) with the stage's manifest, whole or not at all."""
    from components.model.folder import save_model

    with atomic_dir(folder) as tmp:
        fp32 = save_model(tmp, state, model_cfg, tokenizer)
        (tmp / "manifest.json").write_text(json.dumps({"step": "train", "params": fp32.num_params(),
                                                       "stage": stage or {"name": "base"}}) + "\n")
