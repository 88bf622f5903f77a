"""Run by test_engine.py (plain, or under the deepspeed launcher): fp16 with dynamic loss
scaling on real DeepSpeed, with an overflow forced at two steps.

    [deepspeed --num_gpus N] tests/train/fp16_script.py OUT_DIR

DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has AVX512-FP16 kernels (few CPUs do; the
engine itself then raises a ConfigError). This script overrides only that capability probe, so
the real fp16 optimizers (FP16_UnfusedOptimizer on one process, ZeRO's on several) and their
DynamicLossScaler run on fp16 tensors, slowly but exactly as on a GPU.

Writes OUT_DIR/fp16-rank<R>.json: per step, whether it overflowed, the loss scale after it, the
skipped-step count and whether the parameters changed; then runs the engine's own `train` loop
in fp16 into OUT_DIR/run so the test can read its metrics.jsonl.
"""

import json
import sys
from pathlib import Path

import torch
from deepspeed.accelerator import cpu_accelerator

cpu_accelerator.CPU_Accelerator.is_fp16_supported = lambda self: True

from components.model import ByteTokenizer, ModelConfig  # noqa: E402
from components.train.batches import StreamBatches  # noqa: E402
from components.train.config import TrainConfig  # noqa: E402
from components.train.engine import LanguageModeling, build_engine, train  # noqa: E402

out = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
model_cfg = ModelConfig(vocab_size=258, n_layer=1, n_head=2, n_embd=32, block_size=16)
cfg = TrainConfig(steps=8, micro_batch=2, precision="fp16", warmup_steps=1, lr=1e-2, checkpoint_every=4,
                  eval_every=0)
engine, model = build_engine(model_cfg, cfg)
rank = torch.distributed.get_rank()
g = torch.Generator().manual_seed(rank)
idx = torch.randint(0, 258, (2, 16), generator=g)
log = []
for step in range(6):
    before = [p.detach().clone() for p in engine.module.parameters()]
    _, loss = engine(idx, idx)
    overflow = step in (3, 4)
    engine.backward(loss * 1e6 if overflow else loss)  # 1e6 x the loss: fp16 gradients overflow to inf
    engine.step()
    changed = any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    log.append({"step": step, "overflow": overflow, "scale": float(engine.optimizer.loss_scale),
                "skipped": engine.skipped_steps, "changed": changed,
                "dtype": str(next(engine.module.parameters()).dtype)})
(out / f"fp16-rank{rank}.json").write_text(json.dumps(log))

text = "".join(f"{a} plus {b} is {a + b}. " for a in range(30) for b in range(0, 30, 3))
ids = torch.tensor(ByteTokenizer().encode(text), dtype=torch.long)
train(model_cfg, cfg, LanguageModeling(StreamBatches(ids, 16, 2, 0)), None, ByteTokenizer(), out / "run", progress=False)
