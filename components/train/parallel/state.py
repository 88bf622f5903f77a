"""Checkpoints of a 3D-parallel run that any other topology resumes.

    <root>/step-00000120/
        model-stage000.safetensors      fp32 master weights of stage 0's parameters, whole
        optimizer-stage000.safetensors  their AdamW moments, whole ("exp_avg.<name>", "exp_avg_sq.<name>")
        ...                             one pair per pipeline stage
        buffers.safetensors             the model's persistent buffers (MoE expert biases)
        rng-rank00000.safetensors       each rank's RNG (restored only under the same topology)
        state.json                      step, topology, AdamW's step, scheduler, counters, extra

Every tensor is stored under its name in the single-device model, whole: ZeRO-1's partitions are
gathered over the data-parallel ranks (DeepSpeed's safe_get_full_* helpers) and tensor-parallel
shards joined over the slice (parallel/tensor.py `join`). So the folder is what a one-process run
would hold, and loading cuts it again for the loading run's topology (`split`, then
safe_set_full_*). The tied embedding, held by the first and the last stage, is written by both
with the same values and read once. Written atomically like every checkpoint
(components/train/checkpoint.py `begin` / `publish`).

Resuming under another topology continues the same optimisation: same weights, moments, step,
learning-rate schedule and batches (batch k is a function of the seed and k). What does not carry
over is each rank's random stream (dropout), and the order of floating-point sums, so losses
match to rounding, not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from components.config import ConfigError
from components.train import checkpoint
from components.train.parallel.pipe import Parallel
from components.train.parallel.tensor import join, split

MOMENTS = ("exp_avg", "exp_avg_sq")


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _link_states(engine) -> None:
    """Give every parameter AdamW state (zeros before the first step) and (re)link DeepSpeed's
    per-parameter views of it. DeepSpeed 0.19.8 links them once, right after the first param
    group's first step, when the second group has no state yet: its parameters' moments were
    then unreachable through safe_get_full_optimizer_state ("exp_avg not found")."""
    opt = _torch_optimizer(engine)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _whole(par: Parallel, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
    """The fp32 master (key None) or moment `key` of `p`, gathered over dp (ZeRO-1's partitions:
    the 3D path always runs ZeRO, pipe.build), joined over tp."""
    from deepspeed import comm as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    local = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    local = local.detach().float().reshape(p.shape).contiguous()
    shard = getattr(p, "tp_shard", None)
    if shard is None or par.topology.tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(par.topology.tp)]
    dist.all_gather(parts, local, group=par.tp_group, log_name="ckpt.all_gather")
    return join(parts, shard)


def _params(par: Parallel) -> list[tuple[str, torch.nn.Parameter]]:
    """This stage's trained parameters with their single-device names (tied copies once)."""
    seen, out = set(), []
    for p in par.engine.module.parameters():
        name = par.names[id(p)]
        if name not in seen:
            seen.add(name)
            out.append((name, p))
    return out


def _adam_step(engine) -> float:
    for state in _torch_optimizer(engine).state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def save(root: str | Path, step: int, par: Parallel, extra: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` (a collective: every rank calls it)."""
    from deepspeed import comm as dist

    engine, rank = par.engine, dist.get_rank()
    tmp = checkpoint.begin(root, step)
    _link_states(engine)
    weights, moments = {}, {}
    for name, p in _params(par):  # the same order on every rank of a (stage, slice): collectives line up
        weights[name] = _whole(par, p, None)
        for key in MOMENTS:
            moments[f"{key}.{name}"] = _whole(par, p, key)
    if par.dp_rank == 0 and par.tp_rank == 0:
        save_file(weights, str(tmp / f"model-stage{par.stage:03d}.safetensors"))
        save_file(moments, str(tmp / f"optimizer-stage{par.stage:03d}.safetensors"))
    rng: dict[str, torch.Tensor] = {}
    rng_json = checkpoint.rng_state(rng)
    save_file(rng, str(tmp / f"rng-rank{rank:05d}.safetensors"), metadata={"rng": json.dumps(rng_json)})
    if rank == 0:
        params = {n for n, _ in par.model.named_parameters()}
        buffers = {n: b.detach().cpu().contiguous().clone() for n, b in par.model.state_dict().items()
                   if n not in params and not n.startswith("lm_head.")}
        save_file(buffers, str(tmp / "buffers.safetensors"))
        topo = par.topology
        state = {"step": step, "format": "parallel", "topology": {"pp": topo.pp, "tp": topo.tp, "dp": topo.dp},
                 "world_size": topo.pp * topo.tp * topo.dp, "adam_step": _adam_step(engine),
                 "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                 "counters": {c: getattr(engine, c) for c in ("global_steps", "skipped_steps")},
                 "extra": extra}
        checkpoint.write_json(tmp / "state.json", state)
    return checkpoint.publish(root, step, keep)


def is_parallel(path: str | Path) -> bool:
    return (Path(path) / "state.json").is_file()


def full_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every fp32 weight of a parallel checkpoint, by its single-device name, plus the buffers."""
    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("model-stage*.safetensors")):
        for name, t in load_file(str(f)).items():
            out.setdefault(name, t)
    out.update(load_file(str(path / "buffers.safetensors")))
    return out


def check_resumable(path: Path, run_id: dict[str, Any]) -> None:
    """Refuse, before loading anything, a checkpoint that this run cannot continue."""
    if not is_parallel(path):
        raise ConfigError(f"{path}: this checkpoint was written by a data-parallel run (pipeline_parallel = "
                          f"tensor_parallel = 1); resume it with those settings, or start afresh (--fresh, or another --out)")
    state = checkpoint.read_state(path)
    fresh = "resume with the same ones, or start afresh (--fresh, or another --out)"
    if state["extra"].get("fingerprint") != run_id["fingerprint"]:
        raise ConfigError(f"{path}: this checkpoint was made with other model or train parameters "
                          f"(the global batch included: micro_batch x grad_accum x data-parallel ranks); {fresh}")
    if state["extra"].get("data") != run_id["data"]:
        raise ConfigError(f"{path}: the training data (or tokenizer) differs from the one this checkpoint was "
                          f"trained on; {fresh}")


def load(path: str | Path, par: Parallel) -> dict[str, Any]:
    """Restore weights, moments, AdamW's step, the schedule and counters from `path` into this run's
    topology; the RNG too when the topology is the one that saved it. Returns {"step", "extra"}."""
    from deepspeed import comm as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    path = Path(path)
    state = checkpoint.read_state(path)
    weights = full_weights(path)
    moments: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("optimizer-stage*.safetensors")):
        for name, t in load_file(str(f)).items():
            moments.setdefault(name, t)
    engine, topo = par.engine, par.topology
    _link_states(engine)
    for name, p in _params(par):
        if name not in weights:
            raise ConfigError(f"{path}: no weight {name!r} in the checkpoint (another model?)")
        shard = getattr(p, "tp_shard", None)

        def mine(t: torch.Tensor) -> torch.Tensor:
            return split(t, shard, par.tp_rank, topo.tp) if shard is not None and topo.tp > 1 else t.clone()

        w = mine(weights[name])
        with torch.no_grad():
            p.data.copy_(w.to(p.dtype).reshape(p.shape))
        safe_set_full_fp32_param(p, w)
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, mine(moments[f"{key}.{name}"]), key)
    for opt_state in _torch_optimizer(engine).state.values():  # AdamW's bias correction
        if "step" in opt_state:
            step = opt_state["step"]
            opt_state["step"] = torch.full_like(step, state["adam_step"]) if torch.is_tensor(step) else state["adam_step"]
    for name, value in load_file(str(path / "buffers.safetensors")).items():  # MoE expert biases
        par.model.get_buffer(name).copy_(value)
    if engine.lr_scheduler is not None and state["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        # the param groups' lr is the optimizer's, not the scheduler's, state: set it for this step
        engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
    for name, value in state["counters"].items():
        setattr(engine, name, value)
    engine.global_samples = state["step"] * engine.train_batch_size()
    saved = state["topology"]
    if (saved["pp"], saved["tp"], saved["dp"]) == (topo.pp, topo.tp, topo.dp):
        rng = path / f"rng-rank{dist.get_rank():05d}.safetensors"
        with safe_open(str(rng), framework="pt") as f:
            rng_json = json.loads(f.metadata()["rng"])
        checkpoint.set_rng_state(rng_json, load_file(str(rng)))
    return {"step": state["step"], "extra": state["extra"]}
