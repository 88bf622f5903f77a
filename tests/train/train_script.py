"""Run by test_engine.py in a subprocess: a tiny base-stage run on a synthetic corpus.

    python tests/train/train_script.py OUT_DIR [dense|moe|hybrid]
"""

import sys

import torch

from components.model import ByteTokenizer, ModelConfig
from components.train.batches import StreamBatches
from components.train.config import TrainConfig
from components.train.engine import LanguageModeling, train

argv = [a for a in sys.argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
out, variant = argv[1], (argv[2] if len(argv) > 2 else "dense")
tok = ByteTokenizer()
text = "".join(f"{a} plus {b} is {a + b}. " for a in range(40) for b in range(0, 40, 3))
ids = torch.tensor(tok.encode(text), dtype=torch.long)
model_cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32,
                        ffn="moe" if variant == "moe" else "dense",
                        attention="hybrid" if variant == "hybrid" else "dense", window=8, block=8, top_k_blocks=1)
cfg = TrainConfig(steps=int(argv[3]) if len(argv) > 3 else 16, micro_batch=4, grad_accum=2, lr=3e-3,
                  warmup_steps=2, checkpoint_every=4, eval_every=8, eval_batches=2)
n = int(ids.numel() * 0.9)
train_b, val_b = StreamBatches(ids[:n], 32, 4, 0), StreamBatches(ids[n:], 32, 4, 1)
summary = train(model_cfg, cfg, LanguageModeling(train_b), val_b, tok, out, progress=False)
print("SUMMARY", summary)
