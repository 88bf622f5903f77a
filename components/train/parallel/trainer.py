"""The Trainer (components/train/engine.py) of a 3D-parallel run: the base stage's language
modeling on DeepSpeed's PipelineEngine over pipeline x tensor x data-parallel ranks.

The model is built by parallel/pipe.py `build`, its checkpoints written and read by
parallel/state.py (whole tensors under single-device names, so any topology resumes them).
Micro-batch m of data rank r is batch (step, m * dp + r): the global batch is what one process
sees with grad_accum * dp micro-batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from components.model import ModelConfig
from components.train import checkpoint
from components.train.parallel import pipe, state


class PipelineTrainer:
    """Every rank runs its pipeline stage's slice of the model; `batches` is the stage's sampler."""

    def __init__(self, model_cfg: ModelConfig, cfg, batches, ds_config: Callable[[Any, int], dict[str, Any]],
                 init: dict[str, torch.Tensor] | None = None):
        self.par = pipe.build(model_cfg, cfg, ds_config, init)
        self.model, self.model_cfg, self.batches = self.par.model, model_cfg, batches
        self.batch_ranks = self.par.topology.dp

    @property
    def moe_local(self) -> set[int]:
        return self.par.local_moe

    def step(self, step: int) -> dict[str, Any]:
        engine, dp = self.par.engine, self.par.topology.dp
        micro = [self.batches.get(step, m * dp + self.par.dp_rank) for m in range(engine.gradient_accumulation_steps())]
        loss = engine.train_batch(iter([(b.idx, (b.targets, b.weights)) for b in micro]))
        return {"loss": float(loss), "tokens": sum(b.tokens for b in micro) * dp}

    def lr(self) -> float:
        return self.par.engine.get_lr()[0]

    def evaluate(self, batches, n: int) -> float:
        return pipe.evaluate(self.par.engine, batches, n)

    def resume(self, path: Path, run_id: dict[str, Any]) -> int:
        state.check_resumable(path, run_id)
        return state.load(path, self.par)["step"]

    def save(self, root: Path, step: int, run_id: dict[str, Any], keep: int) -> None:
        state.save(root, step, self.par, extra=run_id, keep=keep)

    def weights(self, root: Path) -> dict[str, torch.Tensor]:
        """Rank 0: the last checkpoint's weights, whole (the loop saves one at the last step)."""
        if torch.distributed.get_rank() != 0:
            return {}
        weights = state.full_weights(checkpoint.latest(root))
        if self.model_cfg.tie_embeddings:
            weights["lm_head.weight"] = weights["wte.weight"]
        return weights

    def num_params(self) -> int:
        return pipe.num_params(self.model_cfg)
