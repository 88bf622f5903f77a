"""The language model: its config, the transformer, and the tokenizers.

The names are loaded on first use (PEP 562), so reading a ModelConfig (every `distillery`
command does, through params.yaml) does not import torch.
"""

import importlib

_WHERE = {"ModelConfig": "config", "Transformer": "model", "ByteTokenizer": "tokenizer",
          "BPETokenizer": "tokenizer", "load_tokenizer": "tokenizer"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
