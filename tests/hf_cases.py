"""Tiny random-weight transformers models of every native family, built and saved offline.

Each case perturbs every parameter (non-trivial norm weights and biases, weights large enough
that logits are O(1)) so that a wrong permutation, a missing bias or a swapped norm shows up
far above the 1e-5 parity tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


@dataclass
class Case:
    name: str
    config_cls: str
    model_cls: str
    overrides: dict = field(default_factory=dict)
    # Dynamic NTK RoPE depends on the longest sequence of the call: a row's logits change with the
    # batch it is in, and cached keys keep the frequencies they were rotated with.
    length_dependent_rope: bool = False

    def hf_config(self):
        kwargs = {**BASE, **self.overrides}
        return getattr(transformers, self.config_cls)(**kwargs)

    def build(self, seed: int = 0):
        torch.manual_seed(seed)
        model = getattr(transformers, self.model_cls)(self.hf_config()).eval()
        randomize(model, seed)
        return model


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:  # biases and differential lambdas
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (1.0 / p.shape[-1]) ** 0.5)


ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
ROPE_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
GLM_TOKENS = dict(pad_token_id=0, eos_token_id=[1, 2], bos_token_id=None)

CASES = [
    Case("llama", "LlamaConfig", "LlamaForCausalLM"),
    Case(
        "llama-mha-tied",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=4, tie_word_embeddings=True),
    ),
    Case(
        "llama-mqa-linear",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=1,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    Case(
        "granite-code-bias-llama3",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_parameters=ROPE_LLAMA3,
        ),
    ),
    Case(
        "llama-dynamic",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
        length_dependent_rope=True,
    ),
    Case("llama-yarn", "LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=ROPE_YARN)),
    Case("mistral-window", "MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    Case(
        "granite",
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            embedding_multiplier=3.0,
            attention_multiplier=0.1,
            residual_multiplier=0.7,
            logits_scaling=2.5,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    Case(
        "qwen2-window",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    Case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, attention_bias=True)),
    Case("diffllama", "DiffLlamaConfig", "DiffLlamaForCausalLM", dict(head_dim=16)),
    Case(
        "diffllama-mha",
        "DiffLlamaConfig",
        "DiffLlamaForCausalLM",
        dict(num_key_value_heads=4, head_dim=16, num_hidden_layers=3),
    ),
    Case("glm", "GlmConfig", "GlmForCausalLM", dict(head_dim=16, **GLM_TOKENS)),
    Case("glm4", "Glm4Config", "Glm4ForCausalLM", dict(head_dim=16, **GLM_TOKENS)),
]
CASE_IDS = [c.name for c in CASES]


def save_case(case: Case, directory: Path, seed: int = 0):
    model = case.build(seed)
    model.save_pretrained(directory)
    return model


def ragged_batch(
    vocab: int, lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, T - n :] = 1
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """transformers' generate() positions for a left-padded batch."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)
