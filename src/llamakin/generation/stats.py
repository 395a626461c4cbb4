"""Token counts and speeds of a generation run (``llamakin generate --stats``, chat, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    rows: int = 1

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second over all rows, counting only tokens from decode steps (each row's
        first token comes from the prefill)."""
        decoded = max(self.generated_tokens - self.rows, 0)
        return decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0
