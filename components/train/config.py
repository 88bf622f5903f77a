"""Typed config of the training stages (the `train`, `reinforce`, `finetune` and `evaluate`
sections of params.yaml; `distill` and quantization-aware training in components/compress/config.py).

Every training stage is one `OptimizerConfig` (the optimiser, its schedule, precision, ZeRO, the
seed, checkpoint and evaluation cadence) and fields of its own, flat in its section
(`finetune.beta1`, `reinforce.weight_decay`); `train_config()` turns a stage into the engine's
TrainConfig with every value taken from the section, none fixed on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from components.config import require
from components.train.precision import PRECISIONS


@dataclass
class OptimizerConfig:
    """What every training stage sets, and the engine (components/train/engine.py) reads: AdamW,
    the warm-up + cosine schedule, precision, ZeRO, the seed, checkpoints and evaluation. A stage
    config inherits these fields, changing a default (and its docstring) where the stage differs."""

    steps: int = 200
    """Optimizer steps (each of `grad_accum` micro-batches)."""
    lr: float = 1e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay (a later stage shorter than its warm-up warms
    up over steps - 1)."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    precision: str = "auto"
    """auto (bf16 where the device computes it natively: CUDA with bf16, a CPU with AVX512-BF16
    or AMX; fp32 elsewhere, components/train/precision.py), bf16 (mixed precision), fp32, or
    fp16 with dynamic loss scaling (DeepSpeed runs fp16 on GPUs only; on a CPU it is refused with
    a clear error)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage across data-parallel processes: 0 (plain data parallel), 1 (optimizer
    states) or 2 (and gradients)."""
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

    def check(self) -> None:
        require(self.steps >= 1, "steps: must be at least 1")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be > 0 and min_lr_ratio within [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps: must not be negative")
        require(self.weight_decay >= 0, "weight_decay: must not be negative")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2: must be within [0, 1)")
        require(self.grad_clip >= 0, "grad_clip: must not be negative (0 disables clipping)")
        require(self.precision in PRECISIONS, f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        require(self.zero_stage in (0, 1, 2), "zero_stage: must be 0, 1 or 2 (stage 3 is not supported)")
        require(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1,
                "checkpoint_every and keep_checkpoints must be at least 1")
        require(self.eval_every >= 0 and self.eval_batches >= 1, "eval_every >= 0 and eval_batches >= 1")

    def batch_shape(self) -> tuple[int, int]:
        """(sequences per micro-batch, micro-batches per step) of one process: the stage's
        micro_batch and grad_accum fields (ReinforceConfig has none: one micro-batch per group)."""
        return self.micro_batch, self.grad_accum  # type: ignore[attr-defined]

    def train_config(self) -> TrainConfig:
        """The engine's TrainConfig of this stage: the fields above as they are (the warm-up cut to
        steps - 1), the stage's batch shape, every row from the first step (no curriculum)."""
        shared = {f.name: getattr(self, f.name) for f in fields(OptimizerConfig)}
        micro_batch, grad_accum = self.batch_shape()
        return TrainConfig(**{**shared, "warmup_steps": min(self.warmup_steps, self.steps - 1)},
                           micro_batch=micro_batch, grad_accum=grad_accum, curriculum_start=1.0)


@dataclass
class TrainConfig(OptimizerConfig):
    """The base stage on DeepSpeed, and the engine's view of every stage: the optimiser and its
    schedule (OptimizerConfig), the batch, 3D parallelism and the curriculum."""

    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states) or 2 (and gradients).
    With pipeline or tensor parallelism: 1, also over a single data-parallel rank (see
    components/train/parallel/pipe.py)."""
    micro_batch: int = 12
    """Sequences per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    pipeline_parallel: int = 1
    """pp: pipeline stages (DeepSpeed PipelineModule; the blocks split evenly by parameters).
    The launcher's world size must be a multiple of pp * tensor_parallel; dp = world / (pp * tp)."""
    tensor_parallel: int = 1
    """tp: ranks sharing each linear layer (Megatron column/row parallel; heads and the feed-forward's
    hidden split, vocabulary-parallel embedding and loss). It must divide n_head, the hidden width
    and the vocabulary size."""
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
        super().check()
        require(self.micro_batch >= 1 and self.grad_accum >= 1, "micro_batch and grad_accum must be at least 1")
        require(self.warmup_steps < self.steps or self.steps == 1, "warmup_steps: must be below steps")
        require(self.pipeline_parallel >= 1 and self.tensor_parallel >= 1,
                "pipeline_parallel and tensor_parallel: must be at least 1")
        require(self.zero_stage == 1 or self.pipeline_parallel * self.tensor_parallel == 1,
                "zero_stage: must be 1 with pipeline or tensor parallelism (DeepSpeed's pipeline engine takes "
                "ZeRO-1 at most, and its stage-0 gradient clipping miscounts the norm across stages)")
        require(0 < self.curriculum_start <= 1, "curriculum_start: must be within (0, 1] (1.0 disables the curriculum)")
        require(0 <= self.curriculum_steps <= self.steps, "curriculum_steps: must be within [0, steps] (0: steps // 2)")
        require(self.seq_len_start == 0 or self.seq_len_start >= 8,
                "seq_len_start: 0 (no warm-up) or at least 8 tokens")
        require(0 <= self.seq_len_warmup_steps <= self.steps, "seq_len_warmup_steps: must be within [0, steps]")
        require((self.seq_len_start == 0) == (self.seq_len_warmup_steps == 0),
                "seq_len_start and seq_len_warmup_steps: set both (warm-up on) or neither (off)")

    def train_config(self) -> TrainConfig:
        """The base stage is the engine's config itself."""
        return self


@dataclass
class TokenizerConfig:
    """The tokenizer the base stage trains on its training text and saves with the model."""

    kind: str = "byte"
    """byte (256 byte values + specials: no training, any text) or bpe (byte-level BPE trained
    offline on the training rows with the `tokenizers` library)."""
    vocab_size: int = 512
    """BPE: the vocabulary size to train (ignored for byte)."""
    split_digits: bool = True
    """BPE: every digit is its own token, never merged (as the LLaMA and DeepSeek tokenizers do),
    so numbers are spelled the same way wherever they appear and arithmetic is learnable."""

    def check(self) -> None:
        require(self.kind in ("byte", "bpe"), f"kind: {self.kind!r} is not byte or bpe")
        require(self.vocab_size >= 260, "vocab_size: at least 260 (the 256 bytes and the specials)")


@dataclass
class ReinforceConfig(OptimizerConfig):
    """The reinforcement stage: GRPO with verifiable rewards (DeepSeekMath / DeepSeek-R1)."""

    steps: int = 60
    """Optimizer steps (each on `prompts_per_step` groups)."""
    lr: float = 5e-5
    """Peak learning rate (warm-up, then cosine to lr * min_lr_ratio). Keep it well below the base stage's:
    with batches this small, larger steps mostly perturb what the base learnt (measured: 2e-4
    took a 1,500-step base from 0.243 to 0.141 held-out accuracy in 80 steps, 5e-5 kept 0.227;
    on the small preset 3e-4 took 0.237 to 0.195, 5e-5 kept 0.231)."""
    warmup_steps: int = 5
    """Linear warm-up steps (cut to steps - 1 in a shorter stage)."""
    precision: str = "fp32"
    """auto, bf16, fp32 or fp16 (as train.precision); fp32 by default: the ratio exp(logp - old) wants it."""
    seed: int = 0
    """Seeds prompt choice and sampling (step s depends only on seed, s)."""
    checkpoint_every: int = 20
    """Checkpoint every this many steps (a multiple of updates_per_batch)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    eval_every: int = 20
    """Validation loss (language modeling on val.jsonl) every this many steps (0: at the end only)."""
    eval_micro_batch: int = 8
    """Sequences per validation micro-batch."""
    weight_decay: float = 0.0
    """AdamW weight decay: none by default (the KL term and the small lr keep the policy near the
    reference; decay would pull it towards zero instead)."""
    prompts_per_step: int = 4
    """Prompts per step per process, of one token length (decoded as one batch); each group is
    one micro-batch of the update."""
    group_size: int = 8
    """G: completions sampled per prompt; advantages are normalised within each group."""
    updates_per_batch: int = 2
    """mu: optimizer steps taken on each sampled batch (the ratio to the sampling policy, and so
    the clip, matters from the second on); a new batch is sampled every mu steps."""
    max_new_tokens: int = 128
    """Longest completion sampled; also cut where prompt + completion reach the model's block_size."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_k: int = 0
    """Sample from the top_k tokens only (0: all)."""
    clip: float = 0.2
    """epsilon of the clipped ratio: min(r A, clip(r, 1-eps, 1+eps) A)."""
    kl_coef: float = 0.04
    """beta: weight of the KL penalty to the reference model (unbiased k3 estimator) in the loss."""
    scale_advantages: bool = True
    """Advantages (r - group mean) / group std, as GRPO was published; false: r - group mean only
    (Dr. GRPO and nanochat's chat_rl: dividing by the std weights groups that barely differ most)."""
    loss_norm: str = "sequence"
    """sequence: each completion's loss is the mean over its tokens (GRPO as published); token:
    the mean over all tokens of the group (DAPO), see components/train/grpo.py."""
    reward: str = "verifiable"
    """verifiable: accuracy (the answer checked against the reference) plus format, as weighted
    below; random: the accuracy term replaced by a fair coin per completion, a control (as in
    "Spurious Rewards", Shao et al. 2025): a gain that a random reward gives as well is not the
    verifier's doing. The logged accuracy is always the real one."""
    select_samples: int = 4
    """Prompt selection at the edge of competence: before the first step, sample this many
    completions of every training prompt with the starting model (at `temperature`) and train on
    the prompts whose solve rate lies within [select_min, select_max]; 0 keeps every prompt. A
    prompt the model never or always solves gives a group of equal rewards: no gradient. The
    bands are logged; <out>/selection.json lists every prompt's rate and whether it was kept
    (without a selection: every prompt, kept)."""
    select_prompts: int = 0
    """Selection measures at most this many training prompts (a seeded random subset) and trains
    on those of them in the band; 0 measures every prompt. Bounds its cost on a large data set or
    a large model on a CPU."""
    select_min: float = 0.1
    """Lowest solve rate kept (see select_samples)."""
    select_max: float = 0.9
    """Highest solve rate kept (see select_samples)."""
    dynamic_sampling: bool = True
    """Dynamic sampling (DAPO): a group whose completions all earn the same reward is dropped and
    replaced by a newly drawn prompt's group, for up to `resample_rounds` more draws of
    `prompts_per_step` prompts per batch; the share of sampled groups dropped is logged as
    `dropped`. If the rounds run out, flat groups fill the batch (they add no gradient)."""
    resample_rounds: int = 3
    """Dynamic sampling: extra draws per batch at most."""
    ref_update_every: int = 0
    """Copy the policy into the reference model every this many steps (0: keep the starting model)."""
    accuracy_weight: float = 1.0
    """Reward = accuracy_weight * accuracy + format_weight * format."""
    format_weight: float = 0.5
    """See accuracy_weight."""
    answer_marker: str = "####"
    """What precedes the final answer (components/train/rewards.py)."""
    grow_layers: int = 0
    """Progressive growth: deepen the model by this many blocks before the stage (copies of
    trained blocks whose output projections start at zero, so the function is unchanged)."""
    lora_rank: int = 0
    """LoRA: > 0 trains low-rank adapters of this rank only, every base weight frozen bit for bit;
    the merged model goes on to the next stage and the adapter is saved beside it in PEFT's layout
    (<out>/adapter). 0: train the weights themselves."""
    lora_alpha: float = 16.0
    """LoRA: the adapters' output is scaled by lora_alpha / lora_rank."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """LoRA: the linears that get adapters, by their Hugging Face Llama names, comma-separated."""

    def check(self) -> None:
        super().check()
        require(self.prompts_per_step >= 1 and self.eval_micro_batch >= 1,
                "prompts_per_step and eval_micro_batch must be at least 1")
        require(self.group_size >= 2, "group_size: at least 2 (advantages compare completions of a group)")
        require(self.updates_per_batch >= 1, "updates_per_batch: at least 1")
        require(self.steps % self.updates_per_batch == 0 and self.checkpoint_every % self.updates_per_batch == 0,
                "steps and checkpoint_every: must be multiples of updates_per_batch (a resume starts a batch)")
        require(self.max_new_tokens >= 1, "max_new_tokens: at least 1")
        require(self.temperature > 0, "temperature: must be > 0 (rollouts are sampled)")
        require(self.top_k >= 0 and self.ref_update_every >= 0, "top_k and ref_update_every must be >= 0")
        require(0 < self.clip < 1, "clip: must be within (0, 1)")
        require(self.kl_coef >= 0, "kl_coef: must not be negative")
        require(self.loss_norm in ("sequence", "token"), f"loss_norm: {self.loss_norm!r} is not sequence or token")
        require(self.reward in ("verifiable", "random"), f"reward: {self.reward!r} is not verifiable or random")
        require(min(self.select_samples, self.select_prompts, self.resample_rounds) >= 0,
                "select_samples, select_prompts and resample_rounds: not negative")
        require(0 <= self.select_min <= self.select_max <= 1,
                f"select_min ({self.select_min}) and select_max ({self.select_max}): need 0 <= select_min <= select_max <= 1")
        require(self.accuracy_weight >= 0 and self.format_weight >= 0 and self.accuracy_weight + self.format_weight > 0,
                "accuracy_weight and format_weight: not negative, not both 0")
        require(bool(self.answer_marker.strip()), "answer_marker: must not be blank")
        require(self.grow_layers >= 0, "grow_layers: must not be negative")
        require(self.lora_rank >= 0 and self.lora_alpha > 0, "lora_rank must not be negative, lora_alpha positive")
        _check_targets(self.lora_targets)

    def batch_shape(self) -> tuple[int, int]:
        """One micro-batch per prompt group: group_size sequences, prompts_per_step of them per step."""
        return self.group_size, self.prompts_per_step


@dataclass
class FinetuneConfig(OptimizerConfig):
    """The fine-tune stage: supervised prompt -> response, loss on the response tokens only."""

    steps: int = 100
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate (warm-up, then cosine to lr * min_lr_ratio)."""
    warmup_steps: int = 10
    """Linear warm-up steps (cut to steps - 1 in a shorter stage)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    eval_every: int = 50
    """Validation loss (response tokens) every this many steps (0: at the end only)."""
    micro_batch: int = 12
    """Sequences per micro-batch per process (validation micro-batches too)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    train_top_layers: int = 2
    """Train only the top this many blocks (and the final norm); the embeddings, the tied output
    head and the blocks below stay frozen, bit for bit. 0 trains everything. Not used with LoRA."""
    lora_rank: int = 0
    """LoRA: > 0 trains low-rank adapters of this rank only, every base weight frozen bit for bit;
    the merged model goes on to the next stage and the adapter is saved beside it in PEFT's layout
    (<out>/adapter). 0: train the weights themselves."""
    lora_alpha: float = 16.0
    """LoRA: the adapters' output is scaled by lora_alpha / lora_rank."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """LoRA: the linears that get adapters, by their Hugging Face Llama names, comma-separated."""

    def check(self) -> None:
        super().check()
        require(self.micro_batch >= 1 and self.grad_accum >= 1, "micro_batch and grad_accum must be at least 1")
        require(self.train_top_layers >= 0, "train_top_layers: must not be negative (0 trains everything)")
        require(self.lora_rank >= 0 and self.lora_alpha > 0, "lora_rank must not be negative, lora_alpha positive")
        _check_targets(self.lora_targets)


def _check_targets(targets: str) -> None:
    from components.model.config import LORA_TARGETS

    names = [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in names if t not in LORA_TARGETS]
    require(bool(names) and not bad, f"lora_targets: {', '.join(bad) or 'empty'} not among {', '.join(LORA_TARGETS)}")


@dataclass
class EvaluateConfig:
    """Held-out evaluation of every stage's model: exact-match accuracy and perplexity."""

    max_rows: int = 200
    """Test rows evaluated (the first ones of test.jsonl; 0: all)."""
    max_new_tokens: int = 128
    """Longest completion per problem (also cut at the model's block_size)."""
    answer_marker: str = "####"
    """What precedes the final answer."""
    samples: int = 8
    """pass@1 as DeepSeek-R1 reports it: the mean accuracy of this many sampled completions per
    problem at `temperature`; with more than one, also pass@k for k = samples (the unbiased
    estimator: does reinforcement have headroom, what the model can sample but does not answer
    first?). 0: greedy accuracy only."""
    temperature: float = 0.6
    """Sampling temperature of the pass@1 completions."""
    seed: int = 0
    """Seeds the pass@1 sampling."""

    def check(self) -> None:
        require(self.max_rows >= 0 and self.max_new_tokens >= 1, "max_rows >= 0 and max_new_tokens >= 1")
        require(self.samples >= 0, "samples: must not be negative")
        require(self.temperature > 0, "temperature: must be > 0 (pass@1 completions are sampled)")
