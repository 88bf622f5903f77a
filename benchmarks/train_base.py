"""The base stage, measured: speed against a plain PyTorch loop, the nanoGPT reference figure,
bf16 against fp32, and MoE expert balance with and without the bias update.

    .venv/bin/python benchmarks/train_base.py            # about 8 minutes on 2 CPU cores
    .venv/bin/python benchmarks/train_base.py --quick    # fewer steps, a smoke run

All on ../shared/data/tinyshakespeare (character level: our byte tokenizer on ASCII text), in
one process, side by side:
1. tokens/s: our engine (DeepSpeed; one process, so ZeRO stage 0; metrics, progress, checkpoint
   machinery) vs a plain PyTorch AdamW loop training the same model on the same batches, each at
   fp32 and bf16 (torch.autocast for the plain loop); median over steps after a warm-up, rounds
   alternating between the two so that a shared machine's drift hits both. The plain loop is the
   way a script writes it on a CPU (nanoGPT's): torch's AdamW and clip_grad_norm_ with their
   defaults, a loop of per-tensor ops there; our engine runs the fused AdamW and foreach clipping
   (components/train/engine.py), a part of its lead in fp32.
2. nanoGPT's CPU figure: 4 layers, 4 heads, width 128, context 64, batch 12, 2000 iterations,
   AdamW lr 1e-3 decayed to 1e-4, dropout 0: validation loss about 1.88 (nanoGPT README).
3. bf16 vs fp32: final validation loss of the same run in each precision.
4. MoE: expert load (max / mean tokens per expert, over validation batches) after training
   with DeepSeek-V3's bias update and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from components.model import ByteTokenizer, ModelConfig, Transformer  # noqa: E402
from components.train.batches import StreamBatches  # noqa: E402
from components.train.config import TrainConfig  # noqa: E402
from components.train.engine import LanguageModeling, train  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
NANOGPT = ModelConfig(vocab_size=258, n_layer=4, n_head=4, n_embd=128, block_size=64)


def corpus() -> tuple[StreamBatches, StreamBatches]:
    if not SHAKESPEARE.is_file():
        sys.exit(f"benchmark needs {SHAKESPEARE} (../shared/data beside the checkout)")
    ids = torch.tensor(ByteTokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8")), dtype=torch.long)
    cut = int(ids.numel() * 0.9)
    return StreamBatches(ids[:cut], 64, 12, 0), StreamBatches(ids[cut:], 64, 12, 1)


def ours(model_cfg: ModelConfig, cfg: TrainConfig, train_b, val_b) -> tuple[dict, list[dict], float]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        summary = train(model_cfg, cfg, LanguageModeling(train_b), val_b, ByteTokenizer(), out, progress=False)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return summary, rows, wall


def plain_loop(model_cfg: ModelConfig, steps: int, train_b, bf16: bool) -> list[float]:
    """The same model and batches, trained by hand: AdamW, clipping, no DeepSpeed."""
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        b = train_b.get(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(b.idx, b.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(b.tokens / (time.perf_counter() - t0))
    return rates


def cfg_for(steps: int, precision: str, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, micro_batch=12, lr=1e-3, min_lr_ratio=0.1, warmup_steps=min(100, steps // 10),
                       precision=precision, checkpoint_every=10**6, eval_every=0, eval_batches=kw.pop("eval_batches", 20),
                       **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a smoke run, not the figures")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the speed comparison")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_b, val_b = corpus()
    speed_steps, long_steps, cmp_steps = (30, 200, 60) if args.quick else (150, 2000, 400)
    skip = speed_steps // 5

    print(f"1. tokens/s, nanoGPT-size model ({Transformer(NANOGPT).num_params():,} parameters), "
          f"median over steps {skip}..{speed_steps}, {args.rounds} alternating rounds\n")
    print("precision | ours (DeepSpeed) | plain PyTorch | ratio | ratio per round")
    print("--- | --- | --- | --- | ---")
    for precision in ("fp32", "bf16"):
        mine, base = [], []
        for _ in range(args.rounds):  # alternate, so drifts of a shared machine hit both sides
            _, rows, _ = ours(NANOGPT, cfg_for(speed_steps, precision), train_b, None)
            mine.append(statistics.median(r["tokens_per_s"] for r in rows[skip:]))
            base.append(statistics.median(plain_loop(NANOGPT, speed_steps, train_b, precision == "bf16")[skip:]))
        m, b = statistics.median(mine), statistics.median(base)
        rounds = ", ".join(f"{x / y:.2f}" for x, y in zip(mine, base))
        print(f"{precision} | {m:,.0f} | {b:,.0f} | {m / b:.2f} | {rounds}")

    print(f"\n2. nanoGPT's reference: {long_steps} iterations, batch 12, context 64 (published: val loss ~1.88)\n")
    summary, _, wall = ours(NANOGPT, cfg_for(long_steps, "bf16", eval_batches=100), train_b, val_b)
    print("val loss | train loss (last 10) | wall time")
    print("--- | --- | ---")
    print(f"{summary['val_loss']:.3f} | {summary['final_loss']:.3f} | {wall / 60:.1f} min")

    print(f"\n3. bf16 vs fp32, {cmp_steps} steps, same seed and batches\n")
    print("precision | val loss")
    print("--- | ---")
    losses = {}
    for precision in ("fp32", "bf16"):
        losses[precision] = ours(NANOGPT, cfg_for(cmp_steps, precision), train_b, val_b)[0]["val_loss"]
        print(f"{precision} | {losses[precision]:.4f}")
    print(f"relative difference: {abs(losses['bf16'] - losses['fp32']) / losses['fp32']:.2%}")

    print(f"\n4. MoE expert load after {cmp_steps} steps (4 experts, top-2, shared expert), max / mean tokens\n")
    print("bias update | max / mean load | val loss")
    print("--- | --- | ---")
    for rate in (0.0, 0.001, 0.01):
        moe = ModelConfig(**{**NANOGPT.__dict__, "ffn": "moe", "moe_bias_update": rate})
        with tempfile.TemporaryDirectory() as out:
            summary = train(moe, cfg_for(cmp_steps, "bf16"), LanguageModeling(train_b), val_b, ByteTokenizer(), out,
                            progress=False)
            model = Transformer(moe)
            from safetensors.torch import load_model

            load_model(model, str(Path(out) / "model" / "model.safetensors"))
        with torch.no_grad():
            total = None
            for i in range(20):
                b = val_b.get(i)
                model(b.idx)
                total = model.expert_load().float() if total is None else total + model.expert_load().float()
        ratio = (total.max(dim=1).values / total.mean(dim=1)).max().item()  # worst layer
        print(f"{rate} | {ratio:.2f} | {summary['val_loss']:.3f}")


if __name__ == "__main__":
    main()
