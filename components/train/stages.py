"""The stages after base, each starting from the previous stage's model folder:

    distillery train --stage reinforce --init runs/base/model --data data/split --out runs/reinforce
    distillery train --stage finetune --init runs/reinforce/model --data data/split --out runs/finetune

- reinforce: GRPO on the training prompts with verifiable answers (components/train/grpo.py),
  optionally deepening the model first (`grow_layers`, function-preserving);
- finetune: supervised prompt -> response, the loss on the response tokens only, the top
  `train_top_layers` blocks trained and the rest frozen bit for bit.

Both run on the same DeepSpeed engine as base (components/train/engine.py): checkpoints, exact
resume (run the same command again), metrics.jsonl, loss.png, model/ with the tokenizer.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from components.artifacts import check_output, finish, holds, write_json
from components.console import log
from components.data.load import DataError
from components.data.split import read_split
from components.model import Transformer
from components.train.batches import RowBatches, encode_pairs, val_batches
from components.train.config import FinetuneConfig, ReinforceConfig
from components.train.engine import LanguageModeling, train
from components.model.folder import load_pretrained
from components.train.pretrained import deepen, freeze_below

OUTPUTS = ("checkpoints", "metrics.jsonl", "model", "adapter", "loss.png", "plots", "rewards.png", "manifest.json",
           "metrics.json", "selection.json")


def prepare_output(out: Path, inputs: tuple, fresh: bool) -> None:
    """A stage's output folder before training: with `fresh` its earlier outputs removed; a new one
    checked against foreign files (components.artifacts.check_output)."""
    if fresh:
        for name in OUTPUTS:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if not any((out / name).exists() for name in ("checkpoints", "metrics.jsonl", "manifest.json")):
        check_output(out, inputs)  # never over foreign files


def _outputs(out: Path) -> dict[str, Path]:
    """What the stage's manifest records: model/, metrics.jsonl and, with LoRA, adapter/."""
    found = {"model": out / "model", "metrics": out / "metrics.jsonl"}
    if (out / "selection.json").is_file():  # reinforce: the prompts it trained on
        found["selection"] = out / "selection.json"
    return {**found, "adapter": out / "adapter"} if (out / "adapter").is_dir() else found


def _lora(cfg):
    """The engine's `freeze` that adds LoRA adapters (and freezes the rest), or None (lora_rank 0)."""
    if cfg.lora_rank <= 0:
        return None
    from components.model.lora import add_lora

    return lambda model: add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)


@holds("out_dir")
def run_reinforce(cfg: ReinforceConfig, init_dir: str | os.PathLike, data_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, progress: bool = True, fresh: bool = False) -> dict[str, Any]:
    from components.train.grpo import GRPO, MIN_COMPLETION

    out, data_dir = Path(out_dir), Path(data_dir)
    prepare_output(out, (init_dir, data_dir), fresh)
    model_cfg, state, tok = load_pretrained(init_dir)
    model_cfg, state = deepen(model_cfg, state, cfg.grow_layers)
    rows = read_split(data_dir, "train.jsonl")
    reference = Transformer(model_cfg)
    reference.load_state_dict(state)
    objective = GRPO(cfg, rows, tok, reference, model_cfg.block_size)
    if os.environ.get("RANK", "0") == "0":
        sel = objective.selection
        found = len(objective.prompts) if sel is None else sel["prompts"]
        log.info(f"reinforce: {found} prompts with verifiable answers ({objective.skipped} rows "
                 f"skipped: no answer, or a prompt leaving under {MIN_COMPLETION} tokens of block_size)")
        if sel is not None:
            b = sel["bands"]
            log.info(f"reinforce: solve rates in {sel['samples']} samples: {b['never']} never, {b['sometimes']} "
                     f"sometimes, {b['always']} always solved (mean {sel['mean_rate']:.3f}); training on the "
                     f"{sel['kept']} within [{cfg.select_min}, {cfg.select_max}]")
        else:  # the same file without a selection, so the stage's outputs do not depend on it
            sel = {"samples": 0, "prompts": len(objective.prompts), "kept": len(objective.prompts),
                   "rows": [{"id": p.id, "rate": None, "kept": True} for p in objective.prompts]}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "selection.json", sel)
    train_cfg = cfg.train_config()
    val = val_batches(read_split(data_dir, "val.jsonl"), tok, model_cfg.block_size, cfg.eval_micro_batch, cfg.seed)
    summary = train(model_cfg, train_cfg, objective, val, tok, out, progress=progress, init=state,
                    freeze=_lora(cfg), stage={"name": "reinforce", **asdict(cfg)}, adapter_base=str(init_dir))
    summary.update(_tail_means(out / "metrics.jsonl", ("reward", "accuracy", "format", "kl", "length", "flat_groups",
                                                       "dropped")))
    if objective.selection is not None:
        summary.update({f"selected_{k}": v for k, v in objective.selection["bands"].items()},
                       selected_prompts=objective.selection["kept"])
    if torch.distributed.get_rank() == 0:
        plot_rewards(out / "metrics.jsonl", out / "rewards.png")
        finish(out, "train.reinforce", {"init": Path(init_dir) / "model.safetensors",
                                        "train": data_dir / "train.jsonl"},
               {"reinforce": asdict(cfg), "model": asdict(model_cfg)}, summary,
               _outputs(out))
    return summary


@holds("out_dir")
def run_finetune(cfg: FinetuneConfig, init_dir: str | os.PathLike, data_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, progress: bool = True, fresh: bool = False) -> dict[str, Any]:
    out, data_dir = Path(out_dir), Path(data_dir)
    prepare_output(out, (init_dir, data_dir), fresh)
    model_cfg, state, tok = load_pretrained(init_dir)
    if cfg.train_top_layers > model_cfg.n_layer:
        raise DataError(f"finetune.train_top_layers: {cfg.train_top_layers} is more than the model's "
                        f"{model_cfg.n_layer} blocks")
    rows = read_split(data_dir, "train.jsonl")
    if not rows:
        raise DataError(f"{data_dir / 'train.jsonl'}: no rows to fine-tune on")
    ids, starts = encode_pairs(rows, tok)
    batches = RowBatches(ids, [float(r.get("weight", 1.0)) for r in rows], model_cfg.block_size, cfg.micro_batch,
                         cfg.seed, tok.pad_id, loss_from=starts)
    val = val_batches(read_split(data_dir, "val.jsonl"), tok, model_cfg.block_size, cfg.micro_batch, cfg.seed)
    freeze = _lora(cfg) or (lambda m: freeze_below(m, cfg.train_top_layers))
    summary = train(model_cfg, cfg.train_config(), LanguageModeling(batches), val, tok, out, progress=progress, init=state,
                    freeze=freeze, stage={"name": "finetune", **asdict(cfg)}, adapter_base=str(init_dir))
    if torch.distributed.get_rank() == 0:
        finish(out, "train.finetune", {"init": Path(init_dir) / "model.safetensors",
                                       "train": data_dir / "train.jsonl"},
               {"finetune": asdict(cfg), "model": asdict(model_cfg)}, summary,
               _outputs(out))
    return summary


def _tail_means(metrics_path: Path, keys: tuple[str, ...], n: int = 10) -> dict[str, float]:
    import json

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    out = {}
    for k in keys:
        values = [r[k] for r in rows if k in r][-n:]
        if values:
            out[f"final_{k}"] = sum(values) / len(values)
    return out


def plot_rewards(metrics_path: Path, png: Path) -> None:
    """rewards.png: reward, accuracy and format per step; KL and completion length beside them."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    steps = [r["step"] for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("reward", "accuracy", "format"):
        a.plot(steps, [r.get(key) for r in rows], label=key, lw=1)
    a.set_title("rewards (group means)")
    a.legend()
    b.plot(steps, [r.get("kl") for r in rows], color="tab:red", lw=1)
    b.set_title("KL to the reference")
    c.plot(steps, [r.get("length") for r in rows], color="tab:green", lw=1)
    c.set_title("completion length (tokens)")
    for ax in (a, b, c):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
