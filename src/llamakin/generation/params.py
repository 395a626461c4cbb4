"""Sampling parameters: one validated object for the CLI, the Python API and the server."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LlamakinError

SEED_SPAN = 1 << 64  # torch.Generator.manual_seed takes [-2^63, 2^64)
_SEED_STRIDE = 0x9E3779B97F4A7C15  # the 64-bit golden ratio: derived seeds are far apart


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy; 0 / 1.0 disable top-k / top-p."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x count, over the generated tokens
    presence_penalty: float = 0.0  # OpenAI's: minus penalty once a token has been generated
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in (self.stop or ()) if s))
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                "max_new_tokens must be at least 1",
            ),
            (
                self.temperature >= 0 and math.isfinite(self.temperature),
                "temperature must be 0 (greedy) or a positive number",
            ),
            (
                self.seed is None
                or (
                    isinstance(self.seed, int)
                    and not isinstance(self.seed, bool)
                    and -(2**63) <= self.seed < 2**64
                ),
                "seed must be an integer from -2^63 to 2^64 - 1",
            ),
            (
                isinstance(self.top_k, int) and self.top_k >= 0,
                "top_k must be 0 (off) or a positive integer",
            ),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive (1.0 is off)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be between -2 and 2"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be between -2 and 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamakinError(f"{message}; got {self._show()}.")

    def _show(self) -> str:
        return (
            f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature}, top_k={self.top_k}, "
            f"top_p={self.top_p}, min_p={self.min_p}, repetition_penalty={self.repetition_penalty}, "
            f"seed={self.seed}"
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def derive_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample ``index`` of a request seeded ``seed`` (``n > 1``): ``seed`` itself for
    the first, then a deterministic, distinct seed for each further one (None stays None)."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _SEED_STRIDE) % SEED_SPAN
