"""Typed configs of the compression steps (params.yaml sections `distill` and `quantize`)."""

from __future__ import annotations

from dataclasses import dataclass

from components.config import require
from components.train.config import OptimizerConfig, TrainConfig
from components.train.precision import PRECISIONS

STUDENT_INITS = ("teacher", "random")


@dataclass
class DistillConfig(OptimizerConfig):
    """compress.distill: a smaller student trained on the teacher's logits."""

    steps: int = 1000
    """Optimizer steps (on the small preset: 300 gave the student 0.73 of the teacher's accuracy,
    1,000 gave 1.42; benchmarks/compress.py)."""
    warmup_steps: int = 20
    """Linear warm-up steps (cut to steps - 1 in a shorter run)."""
    checkpoint_every: int = 250
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    eval_every: int = 250
    """Validation loss every this many steps (0: at the end only)."""
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
    micro_batch: int = 16
    """Sequences per micro-batch per process (validation micro-batches too)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""

    def check(self) -> None:
        super().check()
        require(self.n_layer >= 0 and self.ffn_hidden >= 0, "n_layer and ffn_hidden must not be negative")
        require(self.init in STUDENT_INITS, f"init: {self.init!r} is not one of {', '.join(STUDENT_INITS)}")
        require(self.temperature > 0, "temperature: must be > 0")
        require(0.0 <= self.kd_weight <= 1.0, "kd_weight: must be in [0, 1]")
        require(self.micro_batch >= 1 and self.grad_accum >= 1, "micro_batch and grad_accum must be at least 1")


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
    through gradients, on the same data and loss as the fine-tune stage); 0: post-training only.
    Its optimiser is every stage's default otherwise (OptimizerConfig: AdamW betas, weight decay,
    clipping, cosine to lr * min_lr_ratio); one checkpoint, at the end, with the validation loss."""
    qat_lr: float = 5e-5
    """Peak learning rate of the quantization-aware fine-tune."""
    qat_warmup_steps: int = 10
    """Linear warm-up steps of the quantization-aware fine-tune (cut to qat_steps - 1)."""
    qat_micro_batch: int = 12
    """Sequences per micro-batch (and validation micro-batch) of the quantization-aware fine-tune."""
    qat_precision: str = "fp32"
    """auto, bf16, fp32 or fp16 (as train.precision) of the quantization-aware fine-tune; fp32 by
    default: the fake quantizers round the fp32 weights the INT8 model is made from."""
    latency_tokens: int = 32
    """Tokens decoded (batch 1, greedy) when timing CPU latency before and after."""
    latency_repeats: int = 3
    """Timed repetitions (the median is reported)."""
    seed: int = 0
    """Seeds the quantization-aware fine-tune's batches."""

    def check(self) -> None:
        require(self.qat_steps >= 0, "qat_steps: must not be negative")
        require(self.qat_lr > 0, "qat_lr: must be > 0")
        require(self.qat_warmup_steps >= 0 and self.qat_micro_batch >= 1,
                "qat_warmup_steps must not be negative, qat_micro_batch at least 1")
        require(self.qat_precision in PRECISIONS,
                f"qat_precision: {self.qat_precision!r} is not one of {', '.join(PRECISIONS)}")
        require(self.latency_tokens >= 1 and self.latency_repeats >= 1,
                "latency_tokens and latency_repeats must be at least 1")

    def qat_config(self) -> TrainConfig:
        """The engine's TrainConfig of the quantization-aware fine-tune (qat_steps > 0)."""
        return TrainConfig(steps=self.qat_steps, micro_batch=self.qat_micro_batch, lr=self.qat_lr,
                           warmup_steps=min(self.qat_warmup_steps, self.qat_steps - 1), precision=self.qat_precision,
                           seed=self.seed, checkpoint_every=self.qat_steps, keep_checkpoints=1, eval_every=0,
                           curriculum_start=1.0)
