"""The base stage: language-model pretraining on the split's training rows or on a text corpus.

    distillery train --stage base --data data/split --out runs/base
    distillery train --stage base --text ../shared/data/tinyshakespeare/input.txt --out runs/shakespeare

Rows (prompt, response, weight) become `prompt \\n response <eos>` sequences, each row's loss
scaled by the sample weight the filter gave it; a text corpus is cut into random windows. The
tokenizer (bytes, or BPE trained here on the training text only) is saved with the model. The
engine (components/train/engine.py) does the rest; run the same command again to resume.

Curriculum (components/train/batches.py): rows are scored by difficulty (mean rank of token
length and of the loss under a bigram model fitted on the training rows); step s draws only
from the easiest `curriculum_start` fraction, growing linearly to all rows over
`curriculum_steps`. With `seq_len_start` and `seq_len_warmup_steps`, sequences (rows and text
windows) start short and grow to block_size. Validation always uses all rows at full length.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from components.artifacts import check_output, finish, holds
from components.console import log
from components.data.load import DataError, inside_folder, load_canonical
from components.model import BPETokenizer, ByteTokenizer, ModelConfig, load_tokenizer
from components.train.batches import Curriculum, RowBatches, StreamBatches, difficulty
from components.train.config import TokenizerConfig, TrainConfig
from components.train.engine import LanguageModeling, train


def row_text(row: dict[str, Any]) -> str:
    return f"{row.get('prompt') or ''}\n{row.get('response') or ''}"


def make_tokenizer(cfg: TokenizerConfig, texts: list[str], folder: Path, resuming: bool):
    """The stage's tokenizer: on a resume, the one the run started with (`folder`), so the token
    ids cannot change under the checkpoint; otherwise trained now and saved there (by rank 0)."""
    if resuming and (folder / "tokenizer_meta.json").is_file():
        return load_tokenizer(folder)
    tok = ByteTokenizer() if cfg.kind == "byte" else BPETokenizer.train(texts, vocab_size=cfg.vocab_size,
                                                                             split_digits=cfg.split_digits)
    if int(os.environ.get("RANK", "0")) == 0:
        tok.save(folder)
    return tok


@holds("out_dir")
def run(model_cfg: ModelConfig, train_cfg: TrainConfig, tok_cfg: TokenizerConfig, out_dir: str | os.PathLike,
        data_dir: str | os.PathLike | None = None, text: str | os.PathLike | None = None,
        progress: bool = True, fresh: bool = False, init_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the base stage from a split folder (train.jsonl, val.jsonl) or a text file.

    With `init_dir` (a model folder: an imported pretrained model, or an earlier stage's), this is
    continued pretraining: the model, its weights and its tokenizer come from there (`model_cfg`
    and `tok_cfg` are not used, except model_cfg.block_size, the longest training sequence).

    Resumes from the newest checkpoint in `out_dir` unless `fresh`, which first removes the
    stage's earlier outputs. Ends by writing manifest.json and metrics.json beside them."""
    if (data_dir is None) == (text is None):
        raise DataError("give the split folder (--data) or a text corpus (--text), one of them")
    out = Path(out_dir)
    if fresh:
        for name in ("checkpoints", "tokenizer", "metrics.jsonl", "model", "loss.png", "plots", "manifest.json",
                     "metrics.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    resuming = (out / "checkpoints").is_dir()
    if not any((out / name).exists() for name in ("checkpoints", "tokenizer", "metrics.jsonl", "manifest.json")):
        check_output(out, tuple(p for p in (data_dir, text) if p is not None))  # never over foreign files
    init = None
    if init_dir is not None:
        from components.model.folder import load_pretrained

        init_cfg, init, init_tok = load_pretrained(init_dir)
        seq = min(model_cfg.block_size, init_cfg.block_size)
        model_cfg = init_cfg
    else:
        seq = model_cfg.block_size
    curriculum = Curriculum.from_config(train_cfg)
    rank0 = os.environ.get("RANK", "0") == "0"
    if text is not None:
        try:
            corpus = inside_folder(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{text}: cannot read the text corpus: {err}") from None
        tok = init_tok if init is not None else make_tokenizer(tok_cfg, [corpus], out / "tokenizer", resuming)
        ids = torch.tensor(tok.encode(corpus), dtype=torch.long)
        cut = int(ids.numel() * 0.9)
        train_b = StreamBatches(ids[:cut], seq, train_cfg.micro_batch, train_cfg.seed, curriculum)
        val_b = StreamBatches(ids[cut:], seq, train_cfg.micro_batch, train_cfg.seed + 1)
    else:
        rows = load_canonical(Path(data_dir) / "train.jsonl")
        val_path = Path(data_dir) / "val.jsonl"
        val_rows = load_canonical(val_path) if val_path.is_file() and val_path.stat().st_size else []
        tok = init_tok if init is not None else make_tokenizer(tok_cfg, [row_text(r) for r in rows],
                                                               out / "tokenizer", resuming)

        def encode(rs):
            return [tok.encode(row_text(r)) + [tok.eos_id] for r in rs]

        train_ids = encode(rows)
        train_b = RowBatches(train_ids, [float(r.get("weight", 1.0)) for r in rows], seq,
                             train_cfg.micro_batch, train_cfg.seed, tok.pad_id,
                             difficulty([r[:seq + 1] for r in train_ids], tok.vocab_size), curriculum)
        if rank0 and curriculum.active:
            log.info(f"curriculum: step 0 draws from the easiest {len(train_b.pool(0))} of {len(train_ids)} rows, "
                  f"all of them from step {curriculum.growth_steps}")
        val_b = RowBatches(encode(val_rows), [1.0] * len(val_rows), seq, train_cfg.micro_batch,
                           train_cfg.seed + 1, tok.pad_id) if val_rows else None
    if init is None and model_cfg.vocab_size != tok.vocab_size:
        model_cfg = ModelConfig(**{**model_cfg.__dict__, "vocab_size": tok.vocab_size})
    # the starting weights join the run's fingerprint by content, not by path: a retried pod imports
    # the base model into a new temporary folder and must still resume
    summary = train(model_cfg, train_cfg, LanguageModeling(train_b), val_b, tok, out, progress=progress, init=init)
    if torch.distributed.get_rank() == 0:
        inputs = {"text": text} if text is not None else {"train": Path(data_dir) / "train.jsonl"}
        if init_dir is not None:
            inputs["init"] = Path(init_dir) / "model.safetensors"
        finish(out, "train.base", inputs, {"model": asdict(model_cfg), "train": asdict(train_cfg),
                                           "tokenizer": asdict(tok_cfg)}, summary,
               {"model": out / "model", "metrics": out / "metrics.jsonl"})
    return summary
