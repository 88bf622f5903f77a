"""Run under the deepspeed launcher by test_checkpoint.py: train a small model for 10 steps
straight, and again as 5 steps + checkpoint + a fresh engine loading it + 5 steps; write both
loss curves and final parameters for the test to compare.

    deepspeed --num_gpus N tests/train/ds_resume_script.py OUT_DIR ZERO_STAGE
"""

import json
import sys
from pathlib import Path

from components.train.engine import _skip_shm_op

_skip_shm_op()  # as every training start: no compile of DeepSpeed's shm op (minutes), no wait on its lock

import deepspeed  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from components.train import checkpoint  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
out, stage = Path(args[0]), int(args[1])


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 3}},
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "gradient_clipping": 0.5,
           "steps_per_print": 10_000}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def train(engine, steps):
    losses = []
    for _ in range(steps):
        for _ in range(engine.gradient_accumulation_steps()):
            x = torch.randn(4, 16).to(torch.bfloat16)  # drawn from the global RNG: resumed with it
            torch.rand(())  # the global RNG moves every micro-step: its state must travel in the checkpoint
            loss = engine(x).float().sin().mean()
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


straight = build()
a = train(straight, 10)

first = build()
b = train(first, 5)
checkpoint.save(out / "ckpt", 5, first, extra={"data_position": 40}, keep=2)
resumed = build()
state = checkpoint.load(checkpoint.latest(out / "ckpt"), resumed)
b += train(resumed, 5)

rank = torch.distributed.get_rank()
if rank == 0:
    (out / "result.json").write_text(json.dumps({"straight": a, "resumed": b, "state": state,
                                                 "lr": resumed.lr_scheduler.get_last_lr()}))
    save_file({f"straight.{k}": v for k, v in straight.module.state_dict().items()}
              | {f"resumed.{k}": v for k, v in resumed.module.state_dict().items()}, str(out / "params.safetensors"))
