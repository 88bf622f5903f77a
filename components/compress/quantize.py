"""compress.quantize: INT8 weight-only quantization and an INT8 KV cache, written offline as an
artifact and swapped in at load time.

    distillery quantize --checkpoint runs/distill/model --data data/split --out runs/quantize
    model, tok = load_model("runs/quantize/model")     # QuantLinear / QuantEmbedding swapped in

The scheme and the modules are in components/model/int8.py (per-output-channel symmetric int8
weights, an int8 KV cache); the folder is read and written by components/model/folder.py, like
any model folder: model.json, tokenizer/, and a model.safetensors holding `<module>.weight_int8`
and `<module>.scale` tensors, plus quantization.json saying what was quantized. This step
quantizes, measures size, decode latency and accuracy before and after, and optionally runs a
quantization-aware fine-tune first (`qat_steps`: fake-quantized weights, straight-through
estimator) before the weights are rounded for good.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.model import Transformer
from components.model.folder import ModelFolderError, load_model, load_quantized, save_quantized
from components.model.int8 import QMAX, set_submodule, quantizable, quantize_model, weight_bytes

class FakeQuantLinear(nn.Linear):
    """Quantization-aware training: the forward uses the INT8-rounded weight, the gradient passes
    straight through to the float weight (STE). Same state-dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        scale = (w.detach().abs().amax(dim=1, keepdim=True) / QMAX).clamp_min(1e-12)
        wq = torch.round(w / scale).clamp(-QMAX, QMAX) * scale
        return F.linear(x, w + (wq - w).detach())


def fake_quantize(model: Transformer, names: list[str] | None = None) -> Transformer:
    """Swap the quantizable linears for FakeQuantLinear sharing their weights (in place)."""
    for name in names if names is not None else quantizable(model):
        lin = model.get_submodule(name)
        fq = FakeQuantLinear(lin.in_features, lin.out_features, bias=False, device=lin.weight.device,
                             dtype=lin.weight.dtype)
        fq.weight = lin.weight
        set_submodule(model, name, fq)
    return model


def decode_latency(model: Transformer, tokens: int, repeats: int, prompt_len: int = 8) -> float:
    """Median seconds per decoded token, batch 1, greedy, with the model's own KV cache."""
    import statistics
    import time

    prompt_len = max(1, min(prompt_len, model.cfg.block_size - tokens))
    tokens = min(tokens, model.cfg.block_size - prompt_len)
    idx = torch.zeros(1, prompt_len, dtype=torch.long)
    model.generate(idx, 2, temperature=0)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(idx, tokens, temperature=0)
        times.append((time.perf_counter() - t0) / tokens)
    return statistics.median(times)


def _qat(cfg, model_dir: Path, data_dir: Path, out: Path, progress: bool) -> Path:
    """Quantization-aware fine-tune of the float model (fake-quantized linears); its model folder."""
    from components.train.batches import RowBatches
    from components.train.engine import LanguageModeling, train
    from components.model.folder import load_pretrained
    from components.data.split import read_split
    from components.train.batches import encode_pairs, val_batches

    model_cfg, state, tok = load_pretrained(model_dir)
    rows = read_split(data_dir, "train.jsonl")
    ids, starts = encode_pairs(rows, tok)
    tcfg = cfg.qat_config()
    batches = RowBatches(ids, [1.0] * len(ids), model_cfg.block_size, tcfg.micro_batch, cfg.seed, tok.pad_id,
                         loss_from=starts)
    val = val_batches(read_split(data_dir, "val.jsonl"), tok, model_cfg.block_size, tcfg.micro_batch, cfg.seed)
    train(model_cfg, tcfg, LanguageModeling(batches), val, tok, out / "qat", progress=progress, init=state,
          freeze=fake_quantize, stage={"name": "qat", "qat_steps": cfg.qat_steps, "qat_lr": cfg.qat_lr})
    return out / "qat" / "model"


def run(cfg, model_dir: str | os.PathLike, data_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
        progress: bool = True, eval_rows: int = 200) -> dict:
    """Quantize the float model folder `model_dir` into `out_dir`/model (INT8 artifact), with
    accuracy (on data_dir's test.jsonl when given), weight bytes and CPU decode latency before and
    after in metrics.json. The output folder appears whole or not at all."""
    from dataclasses import asdict

    from components.artifacts import atomic_dir, finish
    from components.train.evaluate import EvaluateConfig, evaluate_model, problems

    import shutil
    import tempfile

    from components.config import ConfigError
    from components.data.load import DataError

    model_dir, out = Path(model_dir), Path(out_dir)
    if (model_dir / "quantization.json").exists():
        raise ModelFolderError(f"{model_dir}: already INT8 (quantization.json); give the float model folder")
    if data_dir is not None and not (Path(data_dir) / "test.jsonl").is_file():
        raise DataError(f"{Path(data_dir) / 'test.jsonl'}: missing; --data is the split folder whose test rows "
                        f"measure accuracy before and after")
    if cfg.qat_steps and data_dir is None:
        raise ConfigError("quantize.qat_steps needs the split folder (--data) to fine-tune on")
    inputs = (model_dir,) + ((Path(data_dir),) if data_dir else ())
    with atomic_dir(out, inputs) as tmp:
        source = model_dir
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.qat-", dir=out.parent)) if cfg.qat_steps else None
        try:  # the QAT run's checkpoints are scratch, not part of the output
            if scratch is not None:
                source = _qat(cfg, model_dir, Path(data_dir), scratch, progress)
            fp, tok = load_model(source)
            q, spec = quantize_model(fp, cfg.embedding, cfg.kv_cache)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        base, _ = load_model(model_dir)
        (tmp / "model").mkdir()
        save_quantized(q, spec, tok, tmp / "model")
        q, _ = load_quantized(tmp / "model")  # measure what was written, as a server would load it
        report = {"float_bytes": (model_dir / "model.safetensors").stat().st_size,
                  "int8_bytes": (tmp / "model" / "model.safetensors").stat().st_size,
                  "float_weight_bytes": weight_bytes(base), "int8_weight_bytes": weight_bytes(q),
                  "float_s_per_token": decode_latency(base, cfg.latency_tokens, cfg.latency_repeats),
                  "int8_s_per_token": decode_latency(q, cfg.latency_tokens, cfg.latency_repeats)}
        cache_f = base.new_cache(1).layers[0]
        cache_q = q.new_cache(1).layers[0]
        report["kv_bytes_ratio"] = (cache_f.k.nbytes * 2) / cache_q.nbytes() if cfg.kv_cache else 1.0
        report["size_ratio"] = report["float_bytes"] / report["int8_bytes"]
        report["latency_ratio"] = report["int8_s_per_token"] / report["float_s_per_token"]
        test = problems(data_dir, EvaluateConfig(max_rows=eval_rows)) if data_dir and (
            Path(data_dir) / "test.jsonl").is_file() else []
        if test:
            ecfg = EvaluateConfig(max_rows=eval_rows, samples=0)
            f_res, _ = evaluate_model(base, tok, test, ecfg, desc="quantize: evaluate float")
            q_res, _ = evaluate_model(q, tok, test, ecfg, desc="quantize: evaluate int8")
            report.update(float_accuracy=f_res["accuracy"], int8_accuracy=q_res["accuracy"],
                          accuracy_drop=f_res["accuracy"] - q_res["accuracy"], float_format=f_res["format"],
                          int8_format=q_res["format"], float_perplexity=f_res["perplexity"],
                          int8_perplexity=q_res["perplexity"], test_rows=len(test))
        finish(tmp, "compress.quantize", {"model": model_dir / "model.safetensors",
                                          **({"test": Path(data_dir) / "test.jsonl"} if data_dir else {})},
               {"quantize": asdict(cfg)}, report, {"model": tmp / "model"})
    return report
