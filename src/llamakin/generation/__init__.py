"""The one generation core: row state, sampling, stopping, streaming and the prefill/decode loop,
shared by :func:`llamakin.generate`, :func:`llamakin.generate_batch`, ``llamakin chat`` and the
server's continuous batching (``llamakin serve``).

* :mod:`.params`: :class:`SamplingParams`, the one validated set of sampling parameters (the CLI,
  the Python API and the server's schema all build one);
* :mod:`.sampling`: the logits processors and the per-row sampler (its own seeded generator,
  penalties, and a list of per-row logits processors such as an allowed-token mask);
* :mod:`.text`: incremental detokenization with stop strings;
* :mod:`.rows`: one row's state (prompt, sampler, text, finish reason, cache slots, positions);
* :mod:`.batch`: rows in one preallocated KV cache: admission (prefill, prefix reuse, forks for
  ``n > 1``), decode steps, retirement;
* :mod:`.prefix_cache`: keys/values of finished rows kept for later prompts that start the same way.
"""

from .batch import RowBatch
from .params import SamplingParams, derive_seed
from .prefix_cache import PrefixCache
from .rows import Row, RowResult
from .sampling import RowSampler
from .text import TextStream

__all__ = [
    "PrefixCache",
    "Row",
    "RowBatch",
    "RowResult",
    "RowSampler",
    "SamplingParams",
    "TextStream",
    "derive_seed",
]
