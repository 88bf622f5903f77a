"""compress.quantize: INT8 weight-only quantization and an INT8 KV cache, written offline as an
artifact and swapped in at load time.

    distillery quantize --checkpoint runs/distill/model --data data/split --out runs/quantize
    model, tok = load_model("runs/quantize/model")     # QuantLinear / QuantEmbedding swapped in

Weights: every linear layer of the blocks (attention, feed-forward, MoE experts; not the MoE
router, whose few weights decide routing) and the token embedding with its tied output head
are stored as int8 with one float32 scale per output channel (per row of the weight matrix),
symmetric: q = round(w / s), s = max|w_row| / 127, w ~ q * s (LLM.int8's "vector-wise"
weight quantization without the outlier split; GPTQ/AWQ pick scales better, this is the
round-to-nearest baseline they are measured against). The norms stay float32. Activations are
not quantized (weight-only, as for memory-bound decoding): a QuantLinear multiplies with the
int8 weight through PyTorch's `_weight_int8pack_mm` (dequantization fused in the kernel), so the
fp32 weight never exists at run time.

KV cache: keys and values are stored as int8 with one scale per (sequence, head, position),
symmetric over the head dimension, and dequantized when attention reads them (KIVI quantizes
keys per channel and values per token, with a float residual window; here both are per token).

The artifact is a model folder like any other (model.json, tokenizer/) whose model.safetensors
holds `<module>.weight_int8` and `<module>.scale` tensors, plus quantization.json saying what was
quantized; `components.train.pretrained.load_model` sees quantization.json and calls
`load_quantized`, which builds the float model, swaps the modules and loads the tensors strictly.
Optional quantization-aware fine-tuning (`qat_steps`) trains with fake-quantized weights
(straight-through estimator) before the weights are rounded for good.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.model import ModelConfig, Transformer, fused
from components.model.model import LayerCache

FORMAT = "distillery-int8/1"
QMAX = 127.0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 of a (out, in) matrix: (q int8 (out, in), scale float32 (out,)),
    with w ~ q * scale[:, None] and |w - q * scale| <= scale / 2 elementwise."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None].float()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kernels: str = "auto") -> torch.Tensor:
    """x (..., in) @ (q * scale[:, None])^T with q int8 (out, in): the Triton GEMV/GEMM of
    kernels/int8_matmul.py where `kernels` (the model's switch) says so, on CUDA by default;
    otherwise PyTorch's fused weight-only kernel where it is exact; a plain matmul with the
    dequantized weight while tracing for ONNX (the exporter has no int8pack op; the int8 weights
    stay int8 in the graph). bf16 on the CPU
    runs the kernel in fp32: torch 2.13's CPU kernel is wrong for bf16 when `in` is not a
    multiple of 16."""
    shape, dtype = x.shape, x.dtype
    if torch.compiler.is_exporting():
        return F.linear(x, q.to(dtype) * scale.to(dtype)[:, None])
    if fused.active(kernels, x):
        return fused.int8_matmul(x, q, scale)
    flat = x.reshape(-1, shape[-1]).contiguous()  # (N, in)
    if flat.dtype not in (torch.float32, torch.float16) or flat.device.type == "cpu" and flat.dtype != torch.float32:
        flat = flat.float()
    y = torch.ops.aten._weight_int8pack_mm(flat, q, scale.to(flat.dtype))
    return y.to(dtype).view(*shape[:-1], q.size(0))  # (..., out)


def _keep_fp32_scale(module: nn.Module, apply, fn, recurse):
    """Cast like any module, but keep the float32 scales: rounding them to bf16 would double
    the quantization error."""
    scale = module.scale
    apply(fn, recurse)
    module.scale = scale.to(module.scale.device)
    return module


class QuantLinear(nn.Module):
    """y = x @ (q * s)^T with q int8 (out, in) and s (out,): weight-only INT8, no bias."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.kernels = "auto"  # the model's switch (ModelConfig.kernels), set by swap_modules

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        if linear.bias is not None:
            raise ValueError("QuantLinear takes bias-free linears (the model has no biases)")
        m = cls(linear.in_features, linear.out_features)
        m.weight_int8, m.scale = quantize_rows(linear.weight)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_int8, self.scale, self.kernels)

    def _apply(self, fn, recurse=True):
        return _keep_fp32_scale(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class QuantEmbedding(nn.Module):
    """Token embedding with int8 rows and one scale per token; its rows are exactly the output
    channels of the tied output head, so `head` shares the same int8 matrix (stored once)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(vocab, dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(vocab))
        self.register_buffer("dtype_probe", torch.zeros(0), persistent=False)  # follows .to(dtype): the output's

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.weight_int8).float() * self.scale[idx, None]  # (B, T, C)
        return rows.to(self.dtype_probe.dtype)

    def _apply(self, fn, recurse=True):
        return _keep_fp32_scale(self, super()._apply, fn, recurse)


class TiedQuantHead(nn.Module):
    """The output head tied to a QuantEmbedding: logits = x @ (q * s)^T over the same buffers."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._emb = [embedding]  # a list: not a submodule, so its buffers are saved once, under wte
        self.kernels = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._emb[0]
        return int8_matmul(x, emb.weight_int8, emb.scale, self.kernels)


class Int8LayerCache(LayerCache):
    """LayerCache with int8 keys and values and one float32 scale per (batch, head, position):
    4 * D / (D + 4) times fewer bytes than fp32 at head dim D (3.56x at 32, 3.76x at 64)."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, heads, capacity, head_dim, dtype=torch.int8, device=device)
        self.v = torch.empty_like(self.k)
        self.k_scale = torch.empty(batch, heads, capacity, 1, dtype=torch.float32, device=device)
        self.v_scale = torch.empty_like(self.k_scale)
        self.dtype = dtype
        self.length = 0

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (x.float().abs().amax(dim=-1, keepdim=True) / QMAX).clamp_min(1e-12)  # (B, H, T, 1)
        return torch.round(x.float() / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache full: {end} positions, capacity {self.k.size(2)}")
        span = slice(self.length, end)
        self.k[:, :, span], self.k_scale[:, :, span] = self._quantize(k)
        self.v[:, :, span], self.v_scale[:, :, span] = self._quantize(v)
        self.length = end
        keys = (self.k[:, :, :end].float() * self.k_scale[:, :, :end]).to(self.dtype)  # (B, H, end, D)
        values = (self.v[:, :, :end].float() * self.v_scale[:, :, :end]).to(self.dtype)
        return keys, values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_scale, self.v_scale))


def quantizable(model: Transformer) -> list[str]:
    """Names of the linear layers that INT8 replaces: every bias-free nn.Linear inside the blocks
    except MoE routers (a few weights that decide routing)."""
    return [name for name, m in model.blocks.named_modules(prefix="blocks")
            if isinstance(m, nn.Linear) and not name.endswith(".router")]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def swap_modules(model: Transformer, names: list[str], embedding: bool, kv_cache: bool) -> Transformer:
    """Replace the named linears (and the tied embedding/head) by their INT8 versions, quantizing
    the weights they hold now; set the KV cache class. In place; returns the model."""
    for name in names:
        _set(model, name, QuantLinear.from_linear(model.get_submodule(name)))
        model.get_submodule(name).kernels = model.cfg.kernels
    if embedding:
        if not model.cfg.tie_embeddings:
            from components.config import ConfigError

            raise ConfigError("quantize.embedding: needs a model with tie_embeddings (the head shares the "
                              "embedding's int8 rows); set quantize.embedding=false for this model")
        emb = QuantEmbedding(model.cfg.vocab_size, model.cfg.n_embd)
        emb.weight_int8, emb.scale = quantize_rows(model.wte.weight)
        model.wte, model.lm_head = emb, TiedQuantHead(emb)
        model.lm_head.kernels = model.cfg.kernels
    if kv_cache:
        model.cache_layer = Int8LayerCache
    return model


def quantize_model(model: Transformer, embedding: bool = True, kv_cache: bool = True) -> tuple[Transformer, dict]:
    """INT8 copy of a float model (the float one is left as it was) and its quantization.json."""
    import copy

    q = copy.deepcopy(model).float().eval()
    names = quantizable(q)
    swap_modules(q, names, embedding, kv_cache)
    spec = {"format": FORMAT, "weights": "int8, symmetric, per output channel (row)", "modules": names,
            "embedding": embedding, "kv_cache": "int8" if kv_cache else "float"}
    return q, spec


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds (parameters and saved buffers, shared tensors once)."""
    seen, total = set(), 0
    for t in list(model.state_dict(keep_vars=True).values()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_quantized(model: Transformer, spec: dict, tokenizer, folder: Path) -> None:
    """model.safetensors (int8 + scales + float norms), model.json, quantization.json, tokenizer/
    into `folder` (the caller makes it atomic)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "model.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n", encoding="utf-8")
    (folder / "quantization.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(folder / "tokenizer")


def load_quantized(folder: str | os.PathLike) -> tuple[Transformer, object]:
    """(INT8 model in eval mode, tokenizer) of a folder written by `save_quantized`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from components.config import ConfigError, from_dict
    from components.model import load_tokenizer
    from components.train.pretrained import ModelFolderError

    folder = Path(folder)
    try:
        spec = json.loads((folder / "quantization.json").read_text(encoding="utf-8"))
        cfg = from_dict(ModelConfig, json.loads((folder / "model.json").read_text(encoding="utf-8")), "model.json")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, ConfigError) as err:
        raise ModelFolderError(f"{folder}: unreadable quantized model folder: {err}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("modules"), list):
        raise ModelFolderError(f"{folder / 'quantization.json'}: not a {FORMAT} spec")
    model = Transformer(cfg)
    unknown = sorted(set(spec["modules"]) - set(quantizable(model)))
    if unknown:
        raise ModelFolderError(f"{folder / 'quantization.json'}: modules {unknown[:3]} are not quantizable "
                               f"linears of this model.json")
    swap_modules(model, spec["modules"], bool(spec.get("embedding")), spec.get("kv_cache") == "int8")
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: not a readable safetensors file: {err}") from None
    expected = model.state_dict()
    bad = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape
                 or state[k].dtype != expected[k].dtype)
    extra = sorted(set(state) - set(expected))
    if bad or extra:
        raise ModelFolderError(f"{folder / 'model.safetensors'}: does not match quantization.json "
                               f"(missing or wrong {bad[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state)
    tok = load_tokenizer(folder / "tokenizer")
    if tok.vocab_size != cfg.vocab_size:
        raise ModelFolderError(f"{folder}: the tokenizer has {tok.vocab_size} ids but model.json says "
                               f"vocab_size {cfg.vocab_size}")
    return model.eval(), tok


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
        _set(model, name, fq)
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
    from components.train.config import TrainConfig
    from components.train.engine import train
    from components.train.pretrained import load_pretrained
    from components.train.stages import _rows, _val_batches, encode_pairs

    model_cfg, state, tok = load_pretrained(model_dir)
    rows = _rows(data_dir, "train.jsonl")
    ids, starts = encode_pairs(rows, tok)
    batches = RowBatches(ids, [1.0] * len(ids), model_cfg.block_size, 12, cfg.seed, tok.pad_id, loss_from=starts)
    val = _val_batches(_rows(data_dir, "val.jsonl"), tok, model_cfg.block_size, 12, cfg.seed)
    tcfg = TrainConfig(steps=cfg.qat_steps, micro_batch=12, lr=cfg.qat_lr, warmup_steps=min(10, cfg.qat_steps - 1),
                       precision="fp32", seed=cfg.seed, checkpoint_every=cfg.qat_steps, keep_checkpoints=1,
                       eval_every=0, curriculum_start=1.0)
    train(model_cfg, tcfg, batches, val, tok, out / "qat", progress=progress, init=state, freeze=fake_quantize,
          stage={"name": "qat", "qat_steps": cfg.qat_steps, "qat_lr": cfg.qat_lr})
    return out / "qat" / "model"


def run(cfg, model_dir: str | os.PathLike, data_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
        progress: bool = True, eval_rows: int = 200) -> dict:
    """Quantize the float model folder `model_dir` into `out_dir`/model (INT8 artifact), with
    accuracy (on data_dir's test.jsonl when given), weight bytes and CPU decode latency before and
    after in metrics.json. The output folder appears whole or not at all."""
    from dataclasses import asdict

    from components.artifacts import atomic_dir, finish
    from components.train.evaluate import EvaluateConfig, evaluate_model, problems
    from components.train.pretrained import load_model

    import shutil
    import tempfile

    from components.config import ConfigError
    from components.data.load import DataError
    from components.train.pretrained import ModelFolderError

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
