"""Typed config of the training stages (the `train` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from components.config import require

PRECISIONS = ("bf16", "fp32", "fp16")


@dataclass
class TrainConfig:
    """One training stage on DeepSpeed: optimisation, precision, ZeRO, checkpoints, logging."""

    steps: int = 200
    """Optimizer steps (each of `grad_accum` micro-batches)."""
    micro_batch: int = 12
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    lr: float = 1e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    precision: str = "bf16"
    """bf16 (mixed precision, the CPU and GPU default), fp32, or fp16 with dynamic loss scaling
    (DeepSpeed runs fp16 on GPUs only; on a CPU it is refused with a clear error)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states) or 2 (and gradients)."""
    seed: int = 0
    """Seeds the model's initialisation and the batch sampler (batch k depends only on seed, k)."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest this many checkpoints."""
    eval_every: int = 50
    """Measure the validation loss every this many steps (0: only at the end)."""
    eval_batches: int = 4
    """Validation micro-batches per measurement."""
    curriculum_start: float = 0.1
    """Base stage on rows: the first step draws only from this easiest fraction of the training
    rows (difficulty: mean rank of token length and bigram loss), growing linearly to all rows
    over `curriculum_steps`. 1.0 disables the curriculum. Text corpora ignore it."""
    curriculum_steps: int = 0
    """Steps over which the curriculum's pool grows to all rows (0: half of `steps`)."""
    seq_len_start: int = 0
    """Sequence-length warm-up: the first step's sequences are cut to this many tokens, growing
    linearly to the model's block_size over `seq_len_warmup_steps` (multiples of 8 on the way;
    rows and text windows alike). 0 disables the warm-up."""
    seq_len_warmup_steps: int = 0
    """Steps of the sequence-length warm-up (0 disables it; set with `seq_len_start`)."""

    def check(self) -> None:
        require(self.steps >= 1, "steps: must be at least 1")
        require(self.micro_batch >= 1 and self.grad_accum >= 1, "micro_batch and grad_accum must be at least 1")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be > 0 and min_lr_ratio within [0, 1]")
        require(0 <= self.warmup_steps < self.steps or self.steps == 1, "warmup_steps: must be below steps")
        require(self.precision in PRECISIONS, f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        require(self.zero_stage in (0, 1, 2), "zero_stage: must be 0, 1 or 2 (stage 3 is not supported)")
        require(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1,
                "checkpoint_every and keep_checkpoints must be at least 1")
        require(self.eval_every >= 0 and self.eval_batches >= 1, "eval_every >= 0 and eval_batches >= 1")
        require(0 < self.curriculum_start <= 1, "curriculum_start: must be within (0, 1] (1.0 disables the curriculum)")
        require(0 <= self.curriculum_steps <= self.steps, "curriculum_steps: must be within [0, steps] (0: steps // 2)")
        require(self.seq_len_start == 0 or self.seq_len_start >= 8,
                "seq_len_start: 0 (no warm-up) or at least 8 tokens")
        require(0 <= self.seq_len_warmup_steps <= self.steps, "seq_len_warmup_steps: must be within [0, steps]")
        require((self.seq_len_start == 0) == (self.seq_len_warmup_steps == 0),
                "seq_len_start and seq_len_warmup_steps: set both (warm-up on) or neither (off)")


@dataclass
class TokenizerConfig:
    """The tokenizer the base stage trains on its training text and saves with the model."""

    kind: str = "byte"
    """byte (256 byte values + specials: no training, any text) or bpe (byte-level BPE trained
    offline on the training rows with the `tokenizers` library)."""
    vocab_size: int = 512
    """BPE: the vocabulary size to train (ignored for byte)."""

    def check(self) -> None:
        require(self.kind in ("byte", "bpe"), f"kind: {self.kind!r} is not byte or bpe")
        require(self.vocab_size >= 260, "vocab_size: at least 260 (the 256 bytes and the specials)")
