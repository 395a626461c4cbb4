"""Checks that refuse hostile or broken input before anything is allocated or run.

Everything here answers with one :class:`~llamakin.errors.LlamakinError` sentence:

* :func:`check_raw_config` - the values of a checkpoint's own config (``config.json``,
  ``params.json``, GGUF metadata) have the types and ranges their keys promise, before any
  arithmetic is done with them (``hidden_size: "64"``, ``num_attention_heads: 0``,
  ``rope_theta: "abc"``, strings inside ``rope_scaling``, ``max_position_embeddings: 0``).
* :func:`check_plausible_size` - the model a config describes fits the checkpoint that claims to
  hold it (every parameter comes from a stored value, so a config needing more parameters than
  the file stores values is refused) and the memory of the device it is loaded on. Both are
  decided from the config and the file headers alone, so a 2 KB file declaring a million layers
  or a 13 TB embedding is refused in milliseconds.
* :func:`parse_device`, :func:`check_token_ids` - a ``--device`` that exists, token ids inside
  the model's vocabulary.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .errors import CheckpointError, ConfigError, LlamakinError
from .token_ids import check_token_ids  # noqa: F401  (re-exported: one place for input checks)

# -- raw config values ------------------------------------------------------------------------------
# Keys that are counts or sizes wherever they appear (transformers, Meta, ChatGLM, Qwen v1 and GGUF
# metadata spellings); each must be a positive integer when present and not null.
POSITIVE_INT_KEYS = frozenset(
    {
        "vocab_size",
        "padded_vocab_size",
        "hidden_size",
        "n_embd",
        "dim",
        "intermediate_size",
        "ffn_hidden_size",
        "inner_hidden_size",
        "num_hidden_layers",
        "num_layers",
        "n_layers",
        "n_layer",
        "num_attention_heads",
        "n_heads",
        "n_head",
        "num_key_value_heads",
        "n_kv_heads",
        "multi_query_group_num",
        "head_dim",
        "kv_channels",
        "max_position_embeddings",
        "seq_length",
        "max_sequence_length",
        "original_max_position_embeddings",
        # GGUF, after the architecture prefix
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "rope.dimension_count",
        "rope.scaling.original_context_length",
    }
)
# Keys that are real numbers (> 0 where it matters to the model: a scale, a base, an epsilon).
POSITIVE_FLOAT_KEYS = frozenset(
    {
        "rope_theta",
        "rotary_emb_base",
        "rope_ratio",
        "rms_norm_eps",
        "layer_norm_epsilon",
        "layernorm_epsilon",
        "norm_eps",
        "layer_norm_eps",
        "partial_rotary_factor",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "embedding_multiplier",
        "residual_multiplier",
        "logits_scaling",
        "attention_multiplier",
        # GGUF
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "attention.layer_norm_epsilon",
        "rope.scaling.factor",
    }
)
REAL_KEYS = frozenset({"mscale", "mscale_all_dim"})  # any finite number
ROPE_DICTS = ("rope_scaling", "rope_parameters")
ROPE_STRING_KEYS = frozenset({"type", "rope_type"})
ROPE_BOOL_KEYS = frozenset({"truncate"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


def _check_value(key: str, short: str, value: Any, where: str) -> None:
    if value is None:
        return
    if short in POSITIVE_INT_KEYS:
        if not _is_int(value) or value <= 0:
            raise ConfigError(
                f"{where}: {key} must be a positive integer, got {value!r}; fix the config."
            )
    elif short in POSITIVE_FLOAT_KEYS:
        if not _is_real(value) or value <= 0:
            raise ConfigError(
                f"{where}: {key} must be a positive number, got {value!r}; fix the config."
            )
    elif short in REAL_KEYS:
        if not _is_real(value):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}; fix the config.")


def check_raw_config(
    raw: dict[str, Any], where: str, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """Refuse values of the wrong type or range under well-known keys of a checkpoint config.

    ``prefix`` is stripped from keys first (a GGUF architecture, ``"llama."``). Keys llamakin
    does not know are left to the family adapter.
    """
    for key, kind, want in (
        ("model_type", str, "a string"),
        ("architectures", list, "a list of strings"),
    ):
        value = raw.get(key)
        wrong = not isinstance(value, kind) or (
            kind is list and not all(isinstance(v, str) for v in value)
        )
        if value is not None and wrong:
            raise ConfigError(f"{where}: {key} must be {want}, got {value!r}; fix the config.")
    for key, value in raw.items():
        if not isinstance(key, str):
            continue
        short = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if short in skip:
            continue
        _check_value(key, short, value, where)
        if short in ROPE_DICTS and isinstance(value, dict):
            for sub, v in value.items():
                if sub in ROPE_STRING_KEYS:
                    if not isinstance(v, str):
                        raise ConfigError(
                            f"{where}: {key}.{sub} must be a string, got {v!r}; fix the config."
                        )
                elif sub in ROPE_BOOL_KEYS:
                    if not isinstance(v, bool):
                        raise ConfigError(
                            f"{where}: {key}.{sub} must be true or false, got {v!r}; fix the config."
                        )
                # per-layer-type parameters, longrope factor lists, mrope
                elif isinstance(v, (dict, list)):
                    continue  # sections: the adapter accepts or refuses them by name
                elif v is not None and not _is_real(v):
                    raise ConfigError(
                        f"{where}: {key}.{sub} must be a number, got {v!r}; fix the config."
                    )
                else:
                    _check_value(f"{key}.{sub}", sub, v, where)


def translated(read, raw: dict[str, Any], where: str):
    """``read(raw)`` with the arithmetic errors a malformed config can still cause turned into one
    sentence (the adapters' own checks come first; this is the net under them)."""
    try:
        return read(raw)
    except LlamakinError:
        raise
    except (
        TypeError,
        ValueError,
        ZeroDivisionError,
        OverflowError,
        KeyError,
        IndexError,
        AttributeError,
    ) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{where} has a value llamakin cannot use ({type(e).__name__}: {detail}); "
            "fix or restore the checkpoint's config."
        ) from None


# -- model size against file and memory -------------------------------------------------------------
def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, from meta-device models of one and two
    layers (nothing is allocated, and a million-layer config costs what a two-layer one does)."""
    from .model import Transformer

    def count(layers: int) -> int:
        small = config.replace(num_layers=layers, sliding_window_layers=None)
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(small).parameters())

    one = count(1)
    if config.num_layers == 1:
        return one
    return one + (config.num_layers - 1) * (count(2) - one)


def stored_values(source) -> int:
    """How many values a tensor source stores, from its headers."""
    return sum(math.prod(source.shape(name)) for name in source.names())


def memory_available(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can get (free GPU memory; on a CPU, available RAM plus
    free swap), or None when unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


# A config may need somewhat more parameters than the file stores values: a q/k-only bias inside a
# fused [q | k | v] bias loads v's rows as zeros. Never 25% more.
STORED_SLACK = 1.25


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def check_plausible_size(
    config, where: str, stored: int | None, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> int:
    """Refuse a config whose model the checkpoint cannot hold or the device cannot allocate;
    returns the parameter count. ``stored``: values the file stores (None: not from a file)."""
    c = config
    rough = 2 * c.vocab_size * c.hidden_size + c.num_layers * (
        c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_heads * c.head_dim * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
    )
    # a million billion parameters: beyond any machine, and beyond torch's size arithmetic
    if rough > 1 << 50:
        raise CheckpointError(
            f"{where}: its config describes a model of about {rough:.1e} parameters, far beyond any "
            "memory; the config is corrupt."
        )
    params = parameter_count(config)
    if stored is not None and params > STORED_SLACK * stored + 4096:
        raise CheckpointError(
            f"{where}: its config describes a model of {params:,} parameters but the file stores only {stored:,} "
            "values; the config does not match the weights (or the file is incomplete)."
        )
    device = torch.device(device)
    needed = params * torch.empty((), dtype=dtype, device="meta").element_size()
    available = memory_available(device)
    if available is not None and needed > available:
        raise LlamakinError(
            f"{where}: the model has {params:,} parameters, {_size(needed)} in {str(dtype).removeprefix('torch.')}, "
            f"but {device.type} has only {_size(available)} available; use a smaller model, dtype or another device."
        )
    return params


_INTEGER_DTYPES = frozenset(
    {
        "bool",
        "u8",
        "i8",
        "u16",
        "i16",
        "u32",
        "i32",
        "u64",
        "i64",  # safetensors / GGUF codes
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
    }
)


def is_weight_dtype(name: str) -> bool:
    """Whether a stored dtype (``float16``, ``Q8_0``, ``int32``, ``BOOL``...) can hold model weights."""
    return name.lower() not in _INTEGER_DTYPES and not name.lower().startswith("complex")


# -- devices and token ids --------------------------------------------------------------------------
def parse_device(device: torch.device | str) -> torch.device:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    if isinstance(device, torch.device):
        parsed = device
    else:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise LlamakinError(
                f"unknown device {device!r}; use cpu, cuda, cuda:N or mps."
            ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LlamakinError(
                f"device {device!s} was asked for but this machine has no usable CUDA GPU "
                "(or torch was built without CUDA); use --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LlamakinError(
                f"device {device!s} does not exist: this machine has {torch.cuda.device_count()} "
                "CUDA device(s), numbered from 0."
            )
    elif parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise LlamakinError(
                f"device {device!s} was asked for but Apple's MPS is not available here; use cpu."
            )
    elif parsed.type not in ("cpu", "meta"):
        raise LlamakinError(f"device {device!s} is not supported; use cpu, cuda, cuda:N or mps.")
    return parsed
