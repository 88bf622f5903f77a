"""Run by test_parallel.py, alone or under the deepspeed launcher: a small base-stage run on a
synthetic corpus under a pp x tp x dp topology (dp = processes / (pp * tp)).

    [deepspeed --num_gpus N] tests/parallel/parallel_script.py OUT_DIR PP TP STEPS ACCUM [VARIANT] [PRECISION]

ACCUM is the micro-batches per optimizer step *per data-parallel rank*: the single-process run
that matches N processes takes ACCUM * dp. VARIANT: dense (default), moe (no bias update), moe-balance (bias update 0.01), untied, or gqa (Llama/Qwen
shapes: 2 key/value heads for 4 query heads, q/k/v and output biases, an untied head); PRECISION:
fp32 (default) or bf16.
"""

import os
import sys

import torch

from components.model import ByteTokenizer, ModelConfig
from components.train.batches import StreamBatches
from components.train.config import TrainConfig
from components.train.engine import LanguageModeling, train

argv = [a for a in sys.argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out, pp, tp, steps, accum = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
variant = argv[6] if len(argv) > 6 else "dense"
precision = argv[7] if len(argv) > 7 else "fp32"
tok = ByteTokenizer()
text = "".join(f"{a} plus {b} is {a + b}. " for a in range(40) for b in range(0, 40, 3))
ids = torch.tensor(tok.encode(text), dtype=torch.long)
# vocab 259 is odd: the vocabulary-parallel shards carry padding rows
model_cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=32, block_size=32, ffn_hidden=64,
                        ffn="moe" if variant.startswith("moe") else "dense",
                        moe_bias_update=0.01 if variant == "moe-balance" else 0.0,
                        tie_embeddings=variant not in ("untied", "gqa"), kernels="torch",
                        **(dict(n_kv_head=2, qkv_bias=True, out_bias=True) if variant == "gqa" else {}))
cfg = TrainConfig(steps=steps, micro_batch=2, grad_accum=accum, lr=3e-3, warmup_steps=2, precision=precision,
                  checkpoint_every=int(os.environ.get("CHECKPOINT_EVERY", "10")), keep_checkpoints=5,
                  eval_every=0, eval_batches=1, pipeline_parallel=pp, tensor_parallel=tp, zero_stage=1)
n = int(ids.numel() * 0.9)
train_b, val_b = StreamBatches(ids[:n], 32, 2, 0), StreamBatches(ids[n:], 32, 2, 1)
summary = train(model_cfg, cfg, LanguageModeling(train_b), val_b, tok, out, progress=False)
print("SUMMARY", summary)
