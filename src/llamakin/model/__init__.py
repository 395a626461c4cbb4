"""The model core: norms, MLPs, RoPE, attention, KV cache and the transformer."""

from .cache import KVCache
from .transformer import Block, Transformer

__all__ = ["Block", "KVCache", "Transformer"]
