"""llamakin: one readable, fast PyTorch implementation of the LLaMA family and its kin.

import llamakin, torch
model = llamakin.load("path/to/checkpoint", dtype=torch.float32, device="cpu")
logits = model(input_ids)            # [B, T, vocab]
llamakin.save_pretrained(model, "out_dir")   # config.json + safetensors that transformers loads
tok = llamakin.load_tokenizer("same path or name")
text = llamakin.generate(model, tok, "Once upon a time", max_new_tokens=32, temperature=0.0)
"""

from .checkpoint import save_pretrained
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, ConfigError, LlamakinError, UnsupportedError
from .generate import SamplingParams, generate, generate_batch
from .loading import load
from .model import KVCache, Transformer
from .speculative import generate_speculative
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "LlamakinError",
    "ModelConfig",
    "RopeScaling",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "UnsupportedError",
    "generate",
    "generate_batch",
    "generate_speculative",
    "load",
    "load_tokenizer",
    "save_pretrained",
]
