"""llamakin: one readable, fast PyTorch implementation of the LLaMA family and its kin.

    import llamakin, torch
    model = llamakin.load("path/to/checkpoint", dtype=torch.float32, device="cpu")
    logits = model(input_ids)            # [B, T, vocab]
    model.save_pretrained("out_dir")     # config.json + safetensors that transformers loads
"""

from .checkpoint import load
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, ConfigError, LlamakinError, UnsupportedError
from .model import KVCache, Transformer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "LlamakinError", "ModelConfig", "RopeScaling",
    "Transformer", "UnsupportedError", "load",
]
