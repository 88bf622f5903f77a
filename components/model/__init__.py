"""The language model: its config, the transformer, and the tokenizers."""

from components.model.config import ModelConfig
from components.model.model import Transformer
from components.model.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = ["ModelConfig", "Transformer", "ByteTokenizer", "BPETokenizer", "load_tokenizer"]
