"""`ModelConfig`: every architectural knob of the one configurable model.

The model code reads knobs, never family names; family adapters (``llamakin.families``) translate
a checkpoint's own config into these knobs and back. Each knob cites the section of
``docs/variants.md`` whose math it implements (docs/variants.md §11 maps needs to knobs).

The dataclass is frozen and validated at construction: an impossible combination raises a
:class:`~llamakin.errors.ConfigError` whose message names the knob and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

NORM_TYPES = ("rmsnorm", "layernorm")
RMSNORM_ORDERS = ("cast_then_mul", "mul_then_cast")
MLP_TYPES = ("swiglu", "gelu_tanh")
ROPE_LAYOUTS = ("half", "interleaved", "glm2d")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "qwen_dynamic")
TABLE_DTYPES = ("float32", "model")
INV_FREQ_DTYPES = ("float32", "float16")
ATTENTION_KINDS = ("standard", "differential")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}.")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def _positive_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value > 0)
        or math.isinf(value)
    ):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}.")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (docs/variants.md §2.4, transformers' ``rope_parameters``).

    ``type``: ``default`` (none), ``linear`` (positions / factor), ``dynamic`` (NTK base growth
    past ``original_max_position_embeddings``), ``llama3`` (Llama 3.1 piecewise wavelength rule),
    ``yarn`` (ramped interpolation plus an attention factor on cos/sin) or ``qwen_dynamic`` (Qwen
    v1's NTK: ``alpha = 2 ** ceil(log2(L / original) + 1) - 1`` per row, from that row's real
    length L at prefill, kept for the rest of the generation, docs/variants.md §5.1; inference only, ignored
    while training).
    ``original_max_position_embeddings`` defaults to the model's ``max_position_embeddings``
    (for yarn, where it matters, adapters pass the checkpoint's value explicitly).
    """

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn: explicit cos/sin multiplier
    truncate: bool = True  # yarn: floor/ceil the correction range

    def __post_init__(self) -> None:
        _choice("rope_scaling.type", self.type, ROPE_TYPES)
        if self.type not in ("default", "qwen_dynamic"):
            _positive_float("rope_scaling.factor", self.factor)
        if self.type in ("linear", "dynamic", "llama3") and self.factor < 1:
            raise ConfigError(
                f"rope_scaling.factor must be at least 1 for {self.type} scaling, got {self.factor}."
            )
        if self.original_max_position_embeddings is not None:
            _positive_int(
                "rope_scaling.original_max_position_embeddings",
                self.original_max_position_embeddings,
            )
        if self.type == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor):
            raise ConfigError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor for llama3 scaling, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}."
            )
        if self.type == "qwen_dynamic" and self.original_max_position_embeddings is None:
            raise ConfigError(
                "qwen_dynamic RoPE scaling needs original_max_position_embeddings (Qwen's seq_length)."
            )
        if self.type == "yarn" and not (self.beta_fast > 0 and self.beta_slow > 0):
            raise ConfigError(
                "rope_scaling.beta_fast and beta_slow must be positive for yarn scaling."
            )


@dataclass(frozen=True)
class ModelConfig:
    """The knobs of llamakin's decoder-only transformer.

    Sizes (docs/variants.md §1): ``num_kv_heads`` defaults to ``num_heads`` (MHA; fewer is GQA, 1 is MQA,
    docs/variants.md §8.1); ``head_dim`` defaults to ``hidden_size // num_heads`` and may differ from it (Qwen3,
    docs/variants.md §5.3); ``rotary_dim`` defaults to ``head_dim`` (GLM rotates only the first half, §6.3).
    For ``attention_kind="differential"`` ``num_heads`` counts the *HF DiffLlama* heads, i.e. 2P
    heads of ``head_dim`` forming P pairs (head j with head j + H/2, docs/variants.md §7.2).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048

    # Normalisation (docs/variants.md §1.1, §6.2, §6.1; GLM-4 sandwich norms §6.3).
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    rmsnorm_order: str = (
        "cast_then_mul"  # HF/Meta; "mul_then_cast" = ChatGLM2/3 (docs/variants.md §6.2)
    )
    post_sublayer_norms: bool = False  # norm on each branch output before the residual add (glm4)

    # MLP (docs/variants.md §1, §3.1, §6.1).
    mlp_type: str = "swiglu"
    mlp_bias: bool = False

    # Attention (docs/variants.md §1.2, §4, §5.3, §7, §8).
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE (docs/variants.md §5.3)
    attention_scale: float | None = (
        None  # None -> head_dim ** -0.5; Granite's attention_multiplier (docs/variants.md §4)
    )
    attention_kind: str = "standard"
    sliding_window: int | None = None  # key j visible from query i iff i - window < j <= i
    sliding_window_layers: tuple[int, ...] | None = None  # None: every layer uses the window

    # Rotary position embedding (docs/variants.md §2).
    # "half" = rotate_half pairs (i, i+rd/2); "interleaved" = pairs (2i, 2i+1); "glm2d" = ChatGLM-6B's
    # 2-D RoPE: each half of a head rotated rotate_half-style by its own position stream (docs/variants.md §6.1)
    rope_layout: str = "half"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # ChatGLM-6B (docs/variants.md §6.1, §10): the inverse frequencies are rounded to float16 once (created ``.half()``),
    # and the position x frequency products and cos/sin are computed in the model's dtype (its buffer
    # follows ``model.to(dtype)``): float32 in a float32 run, float16 in a float16 run.
    rope_inv_freq_dtype: str = "float32"  # "float16": inv_freq rounded to float16 once
    rope_table_dtype: str = "float32"  # "model": tables computed in the model's dtype, not float32
    # InternLM v1 (docs/variants.md §5.4): the cache holds keys *before* RoPE and every call rotates all of them with
    # the current frequencies (identical to caching rotated keys unless the base changes: dynamic NTK)
    rope_cached_keys: bool = False

    # Scalar multipliers (Granite, docs/variants.md §4) and the output head (§1.3).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0  # logits are divided by it
    tie_word_embeddings: bool = False

    # ChatGLM-6B (docs/variants.md §6.1): the residual carried forward is the *normalised* input times alpha
    # (``h = norm(x) * alpha + f(norm(x))``); prefix-LM attention (bidirectional over the prompt up
    # to the start-of-piece token) with 2-D positions, driven by these token ids.
    normed_residual_alpha: float | None = None
    prefix_lm: bool = False
    mask_token_ids: tuple[
        int, ...
    ] = ()  # [gMASK], [MASK]: the first present marks the mask position
    sop_token_id: int | None = None  # <sop>: the first generated piece starts here

    # Qwen v1 (docs/variants.md §5.1): scale q by log(p + 1) / log(L) for positions p + 1 > L = this length, when the
    # keys reach past L; inference only.
    logn_attention_length: int | None = None
    # unilm Differential Transformer (docs/variants.md §7.1): the per-pair RMSNorm has a learned weight (``subln``),
    # and its own epsilon (unilm: 1e-5 whatever the blocks' norms use); None = ``norm_eps`` (HF DiffLlama).
    diff_norm_affine: bool = False
    diff_norm_eps: float | None = None

    # Special token ids carried by the checkpoint config (used by generation, kept on export).
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # Which family adapter produced this config (export default); the model never reads it.
    family: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        _positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}): "
                "each key/value head serves a whole group of query heads."
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                    "choose sizes that divide or set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _positive_int("head_dim", self.head_dim)
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        _positive_int("rotary_dim", self.rotary_dim)
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})."
            )

        _choice("norm_type", self.norm_type, NORM_TYPES)
        _choice("rmsnorm_order", self.rmsnorm_order, RMSNORM_ORDERS)
        _choice("mlp_type", self.mlp_type, MLP_TYPES)
        _choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        _choice("rope_table_dtype", self.rope_table_dtype, TABLE_DTYPES)
        _choice("rope_inv_freq_dtype", self.rope_inv_freq_dtype, INV_FREQ_DTYPES)
        if self.rope_layout == "glm2d" and (self.rotary_dim != self.head_dim or self.head_dim % 4):
            raise ConfigError(
                "glm2d RoPE rotates both halves of every head: rotary_dim must equal head_dim, "
                "a multiple of 4."
            )
        if self.prefix_lm and (not self.mask_token_ids or self.sop_token_id is None):
            raise ConfigError(
                "prefix_lm needs mask_token_ids and sop_token_id to find the prompt's end."
            )
        if self.normed_residual_alpha is not None:
            _positive_float("normed_residual_alpha", self.normed_residual_alpha)
        if self.logn_attention_length is not None:
            _positive_int("logn_attention_length", self.logn_attention_length)
        _choice("attention_kind", self.attention_kind, ATTENTION_KINDS)
        _positive_float("norm_eps", self.norm_eps)
        if self.diff_norm_eps is not None:
            _positive_float("diff_norm_eps", self.diff_norm_eps)
            if self.diff_norm_eps == self.norm_eps:  # one spelling for the default
                object.__setattr__(self, "diff_norm_eps", None)
        _positive_float("rope_theta", self.rope_theta)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            _positive_float(name, getattr(self, name))
        if self.attention_scale is not None:
            _positive_float("attention_scale", self.attention_scale)
            if self.attention_scale == self.head_dim**-0.5:  # one spelling for the default
                object.__setattr__(self, "attention_scale", None)
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(
                "rope_scaling must be a llamakin.config.RopeScaling; build one from a dict with "
                "RopeScaling(**d)."
            )
        # a fixed base: rotating before or after caching is the same
        if self.rope_scaling.type != "dynamic":
            object.__setattr__(self, "rope_cached_keys", False)

        if self.attention_kind == "differential":
            if self.num_heads % 2 or self.num_kv_heads % 2:
                raise ConfigError(
                    f"differential attention pairs heads, so num_heads ({self.num_heads}) and num_kv_heads "
                    f"({self.num_kv_heads}) must both be even."
                )
            if self.qk_norm:
                raise ConfigError(
                    "qk_norm is not defined for differential attention; turn one of them off."
                )

        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ConfigError(
                    "sliding_window_layers is set but sliding_window is not; set both or neither."
                )
            layers = tuple(self.sliding_window_layers)
            object.__setattr__(self, "sliding_window_layers", layers)
            bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(
                    f"sliding_window_layers names layers {bad} outside 0..{self.num_layers - 1}."
                )
            # one spelling per meaning: every layer -> None; no layer -> no window at all
            if set(layers) == set(range(self.num_layers)):
                object.__setattr__(self, "sliding_window_layers", None)
            elif not layers:
                object.__setattr__(self, "sliding_window_layers", None)
                object.__setattr__(self, "sliding_window", None)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "mask_token_ids", tuple(self.mask_token_ids))

    # ----------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The attention score multiplier (``head_dim ** -0.5`` unless overridden, docs/variants.md §1.2, §4)."""
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @property
    def rope_extends_context(self) -> bool:
        """Whether RoPE scaling is what lets this model run past ``max_position_embeddings``: dynamic
        NTK grows the base with the sequence (transformers, InternLM) and Qwen v1's NTK (with logn)
        picks it from the prompt's length (docs/variants.md §2.4, §5.1, §5.4). Other scalings already count their
        extended length in ``max_position_embeddings``."""
        return self.rope_scaling.type in ("dynamic", "qwen_dynamic")

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (``n_rep``); query head h uses KV head ``h // kv_groups`` (docs/variants.md §8.1)."""
        return self.num_heads // self.num_kv_heads

    def window_for_layer(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some knobs changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the llamakin-native config format)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["mask_token_ids"] = list(self.mask_token_ids)
        if self.sliding_window_layers is not None:
            d["sliding_window_layers"] = list(self.sliding_window_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown ModelConfig keys {unknown}; remove them or check their spelling."
            )
        d = dict(d)
        if isinstance(d.get("rope_scaling"), dict):
            rs = d["rope_scaling"]
            known_rs = {f.name for f in dataclasses.fields(RopeScaling)}
            bad = sorted(set(rs) - known_rs)
            if bad:
                raise ConfigError(
                    f"unknown rope_scaling keys {bad}; valid keys are {sorted(known_rs)}."
                )
            d["rope_scaling"] = RopeScaling(**rs)
        if d.get("sliding_window_layers") is not None:
            d["sliding_window_layers"] = tuple(d["sliding_window_layers"])
        for key in ("eos_token_ids", "mask_token_ids"):
            if key in d:
                d[key] = tuple(d[key])
        try:
            return cls(**d)
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"incomplete model config: {e}.") from None


def eos_ids_from_json(value: Any) -> tuple[int, ...]:
    """A config file's ``eos_token_id``: absent (``null``), one id, or a list of ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def eos_ids_to_json(ids: tuple[int, ...]) -> int | list[int] | None:
    """``eos_token_id`` as transformers writes it: one id alone, several as a list, none as ``null``."""
    return ids[0] if len(ids) == 1 else (list(ids) or None)
