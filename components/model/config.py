"""Typed config of the language model: sizes, the attention and feed-forward variants, init.

Filled from the `model` section of params.yaml through `components.config.from_dict`; every
field has its default here (a tiny model that trains on a CPU in seconds) and a docstring under it.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config import require

ATTENTIONS = ("dense", "hybrid")
KERNELS = ("auto", "triton", "torch")
FFNS = ("dense", "moe")
ROPE_TYPES = ("default", "linear", "llama3")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linears LoRA can adapt, by their Hugging Face Llama names (components/model/lora.py)."""


@dataclass
class ModelConfig:
    """A decoder-only transformer in the DeepSeek style: RoPE, RMSNorm, SwiGLU or MoE."""

    vocab_size: int = 256
    """Token ids are 0..vocab_size-1; take it from the tokenizer (`tokenizer.vocab_size`)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention (query) heads per block; the head dimension is n_embd // n_head unless head_size
    is set, and must be even (RoPE)."""
    n_kv_head: int = 0
    """Key/value heads (grouped-query attention, Hugging Face's num_key_value_heads): each serves
    n_head / n_kv_head query heads, and the KV cache holds only these. 0: n_head (multi-head)."""
    head_size: int = 0
    """Width of each attention head; 0: n_embd // n_head (Hugging Face's head_dim, set by some
    Mistral and Qwen models to something else)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    out_bias: bool = False
    """A bias on the attention output projection (Llama's attention_bias sets both)."""
    n_embd: int = 128
    """Width of the residual stream."""
    block_size: int = 64
    """Longest sequence the model accepts (the RoPE tables are precomputed up to it)."""
    attention: str = "dense"
    """"dense" (full causal attention) or "hybrid" (sliding window + selected earlier key blocks,
    a simplified DeepSeek Native Sparse Attention; see model.CausalSelfAttention)."""
    window: int = 32
    """Hybrid: sliding-window size, the tokens each query sees locally, itself included."""
    sliding_window: int = 0
    """Dense: each query sees only the last `sliding_window` keys, itself included (Mistral's
    sliding_window); 0: every earlier key."""
    block: int = 16
    """Hybrid: size of the key blocks from which the global part is selected."""
    top_k_blocks: int = 2
    """Hybrid: earlier key blocks (wholly before the window) each query attends to, best scores first."""
    ffn: str = "dense"
    """"dense" (one SwiGLU MLP) or "moe" (routed SwiGLU experts plus one shared expert)."""
    ffn_hidden: int = 0
    """Hidden width of the SwiGLU (and of each expert); 0 picks 4*n_embd*2/3 rounded up to a multiple of 16."""
    n_experts: int = 4
    """MoE: routed experts per layer."""
    expert_top_k: int = 2
    """MoE: routed experts each token is sent to."""
    shared_expert: bool = True
    """MoE: one more expert that every token passes through, outside the routing (DeepSeekMoE)."""
    moe_bias_update: float = 0.001
    """MoE: speed of the aux-loss-free load balancing (DeepSeek-V3): after each optimizer step the
    per-expert selection bias moves by this much toward the under-loaded experts; 0 disables it."""
    rope_theta: float = 10000.0
    """RoPE base: frequency of pair i is rope_theta ** (-2i / head_dim)."""
    rope_type: str = "default"
    """RoPE frequency scaling, as Hugging Face's rope_scaling names it: "default" (none),
    "linear" (every frequency / rope_factor) or "llama3" (Llama 3.1: low frequencies / rope_factor,
    high ones kept, a smooth blend between; see model.rope_frequencies)."""
    rope_factor: float = 1.0
    """linear, llama3: the context extension factor."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths longer than rope_original_max_position / this are scaled fully."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than rope_original_max_position / this are kept."""
    rope_original_max_position: int = 8192
    """llama3: the context length the model was pretrained with before the extension."""
    dropout: float = 0.0
    """Dropout on attention weights and on the residual branches, while training."""
    norm_eps: float = 1e-6
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = True
    """The output head shares its weight with the token embedding."""
    kernels: str = "auto"
    """Triton kernels (kernels/) for RMSNorm, RoPE, the hybrid attention, the MoE experts and the
    fused linear + cross-entropy loss: "auto" uses them on CUDA tensors and PyTorch elsewhere,
    "triton" always (on a CPU only under TRITON_INTERPRET=1), "torch" never. See components/model/fused.py."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (training only)."""

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The key/value heads actually used."""
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """The SwiGLU hidden width actually used."""
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        return -(-(4 * self.n_embd * 2 // 3) // 16) * 16

    def check(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            require(getattr(self, name) > 0, f"{name}: must be positive")
        require(self.head_size >= 0, "head_size: must not be negative (0 picks n_embd // n_head)")
        require(self.head_size > 0 or self.n_embd % self.n_head == 0,
                f"n_embd: {self.n_embd} is not divisible by n_head {self.n_head}")
        require(self.head_dim % 2 == 0, f"n_head: head dimension {self.head_dim} must be even for RoPE")
        require(self.n_kv_head >= 0, "n_kv_head: must not be negative (0 means n_head)")
        require(self.n_head % self.kv_heads == 0,
                f"n_kv_head: {self.kv_heads} does not divide n_head {self.n_head}")
        require(self.sliding_window >= 0, "sliding_window: must not be negative (0: none)")
        require(self.sliding_window == 0 or self.attention == "dense",
                "sliding_window: only with attention \"dense\" (the hybrid attention has its own window)")
        require(self.rope_type in ROPE_TYPES, f"rope_type: {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        require(self.rope_factor > 0, "rope_factor: must be positive")
        require(self.rope_type != "llama3" or self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
                "rope_high_freq_factor: must exceed rope_low_freq_factor, both positive")
        require(self.rope_original_max_position > 0, "rope_original_max_position: must be positive")
        require(self.attention in ATTENTIONS, f"attention: {self.attention!r} is not one of {', '.join(ATTENTIONS)}")
        require(self.kernels in KERNELS, f"kernels: {self.kernels!r} is not one of {', '.join(KERNELS)}")
        require(self.ffn in FFNS, f"ffn: {self.ffn!r} is not one of {', '.join(FFNS)}")
        require(self.window >= 1, "window: must be at least 1")
        require(self.block >= 1, "block: must be at least 1")
        require(self.top_k_blocks >= 0, "top_k_blocks: must not be negative")
        require(self.ffn_hidden >= 0, "ffn_hidden: must not be negative (0 picks the default)")
        require(self.n_experts >= 1, "n_experts: must be at least 1")
        require(
            1 <= self.expert_top_k <= self.n_experts,
            f"expert_top_k: {self.expert_top_k} must be within 1..n_experts ({self.n_experts})",
        )
        require(self.moe_bias_update >= 0, "moe_bias_update: must not be negative")
        require(self.rope_theta > 0, "rope_theta: must be positive")
        require(0.0 <= self.dropout < 1.0, f"dropout: {self.dropout} is outside [0, 1)")
        require(self.norm_eps > 0, "norm_eps: must be positive")
