"""Typed configs of the compression steps (params.yaml sections `distill` and `quantize`)."""

from __future__ import annotations

from dataclasses import dataclass

from components.config import require
from components.train.config import PRECISIONS, TrainConfig, engine_config

STUDENT_INITS = ("teacher", "random")


@dataclass
class DistillConfig:
    """compress.distill: a smaller student trained on the teacher's logits."""

    n_layer: int = 2
    """Student blocks (0: half the teacher's, rounded up)."""
    ffn_hidden: int = 0
    """Student feed-forward width (0: the teacher's). The width of the residual stream, the heads
    and the tokenizer stay the teacher's."""
    init: str = "teacher"
    """teacher: the student starts from evenly spaced teacher blocks, feed-forward neurons kept
    by weight importance (the Minitron prune-then-distill recipe); random: a fresh init."""
    temperature: float = 2.0
    """Softmax temperature of the KL term; the KL is scaled by temperature**2 (Hinton et al.)."""
    kd_weight: float = 0.5
    """loss = kd_weight * T^2 * KL(teacher || student) + (1 - kd_weight) * cross-entropy on the data."""
    teacher_data: bool = False
    """Also train on the teacher's own greedy solutions to the training prompts, keeping only the
    correct ones (rejection sampling, as DeepSeek-R1 made its distillation set)."""
    steps: int = 1000
    """Optimizer steps (on the small preset: 300 gave the student 0.73 of the teacher's accuracy,
    1,000 gave 1.42; benchmarks/compress.py)."""
    micro_batch: int = 16
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (warm-up, then cosine to lr * 0.1)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    precision: str = "auto"
    """auto, bf16, fp32 or fp16 (as train.precision)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage across processes."""
    seed: int = 0
    """Seeds the batch sampler."""
    checkpoint_every: int = 250
    """Checkpoint every this many steps."""
    eval_every: int = 250
    """Validation loss every this many steps (0: at the end only)."""

    def check(self) -> None:
        require(self.n_layer >= 0 and self.ffn_hidden >= 0, "n_layer and ffn_hidden must not be negative")
        require(self.init in STUDENT_INITS, f"init: {self.init!r} is not one of {', '.join(STUDENT_INITS)}")
        require(self.temperature > 0, "temperature: must be > 0")
        require(0.0 <= self.kd_weight <= 1.0, "kd_weight: must be in [0, 1]")
        require(self.steps >= 1 and self.micro_batch >= 1 and self.grad_accum >= 1,
                "steps, micro_batch and grad_accum must be at least 1")
        require(self.lr > 0, "lr: must be > 0")
        require(self.precision in PRECISIONS, f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    def train_config(self) -> TrainConfig:
        return engine_config(self)


@dataclass
class QuantizeConfig:
    """compress.quantize: INT8 weight-only (per output channel, symmetric) and an INT8 KV cache."""

    embedding: bool = True
    """Quantize the token embedding and the output head too (per token row; a tied head shares the
    embedding's int8 rows, an untied one is an INT8 linear of its own)."""
    kv_cache: bool = True
    """Store the KV cache as int8 with a scale per (sequence, head, position)."""
    qat_steps: int = 0
    """Quantization-aware fine-tuning steps before rounding (fake-quantized linears, straight-
    through gradients, on the same data and loss as the fine-tune stage); 0: post-training only."""
    qat_lr: float = 5e-5
    """Peak learning rate of the quantization-aware fine-tune."""
    latency_tokens: int = 32
    """Tokens decoded (batch 1, greedy) when timing CPU latency before and after."""
    latency_repeats: int = 3
    """Timed repetitions (the median is reported)."""
    seed: int = 0
    """Seeds the quantization-aware fine-tune's batches."""

    def check(self) -> None:
        require(self.qat_steps >= 0, "qat_steps: must not be negative")
        require(self.qat_lr > 0, "qat_lr: must be > 0")
        require(self.latency_tokens >= 1 and self.latency_repeats >= 1,
                "latency_tokens and latency_repeats must be at least 1")
