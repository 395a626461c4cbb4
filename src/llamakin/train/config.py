"""Training configuration and the named recipes (``llamakin train --recipe NAME --set key=value``)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError


@dataclass
class TrainConfig:
    """Everything a run needs besides the data's own vocabulary (which sizes the embedding)."""

    # ModelConfig knobs (vocab_size comes from the data)
    model: dict[str, Any] = field(default_factory=dict)
    # a prepared dir, or inputs to prepare
    data: list[str] = field(default_factory=lambda: ["shakespeare"])
    tokenizer: str | None = (
        "train:2048"  # when data needs preparing: "train:VOCAB", a path/catalog name, None: init_from's
    )
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward pass on each process
    grad_accum: int = 1  # micro-batches per optimizer step on each process
    max_steps: int = 1000
    budget_tokens: int | None = None  # if set, max_steps = budget / tokens per step
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 120
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    save_interval: int = 250
    precision: str = "auto"  # auto | float32 | bfloat16 (autocast)
    seed: int = 1337
    init_std: float = 0.02
    parallel: str = "ddp"  # under torchrun: ddp | fsdp
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    # parameter name patterns (fnmatch); empty = all
    train_only: list[str] = field(default_factory=list)
    init_from: str | None = (
        None  # a checkpoint to start from (fine-tuning) instead of random weights
    )
    # LoRA on a frozen init_from: rank, alpha, dropout, targets, quantize, group_size
    lora: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = (
        False  # recompute each block in backward instead of keeping its activations
    )

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (self.seq_len >= 2, "seq_len must be at least 2"),
            (
                self.micro_batch >= 1 and self.grad_accum >= 1,
                "micro_batch and grad_accum must be at least 1",
            ),
            (self.max_steps >= 1, "max_steps must be at least 1"),
            (
                self.lr > 0 and 0 <= self.min_lr_ratio <= 1,
                "lr must be positive and min_lr_ratio in [0, 1]",
            ),
            (
                self.warmup_steps >= 0 and self.weight_decay >= 0,
                "warmup_steps and weight_decay must be >= 0",
            ),
            (self.grad_clip > 0, "grad_clip must be positive"),
            (
                self.precision in ("auto", "float32", "bfloat16"),
                "precision must be auto, float32 or bfloat16",
            ),
            (self.parallel in ("ddp", "fsdp"), "parallel must be ddp or fsdp"),
            (
                self.eval_interval >= 1 and self.save_interval >= 1,
                "eval_interval and save_interval must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; check the recipe and --set values.")
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.train_only, str):
            self.train_only = [p for p in self.train_only.split(",") if p]
        if self.lora:
            from ..lora.model import LoraSettings

            LoraSettings.from_dict(self.lora)  # refuse bad settings before any work
            if not self.init_from:
                raise ConfigError(
                    "a LoRA run adapts an existing model; set init_from=MODEL (a checkpoint or catalog name)."
                )
            if self.train_only:
                raise ConfigError("train_only and lora both choose what trains; use one of them.")
        if self.tokenizer is None and not self.init_from:
            raise ConfigError(
                "tokenizer is unset and there is no init_from to take it from; set tokenizer=..."
            )
        kind, sep, vocab = (self.tokenizer or "").partition(":")
        if kind == "train" and sep and not (vocab.isdigit() and int(vocab) >= 300):
            raise ConfigError(
                f"tokenizer={self.tokenizer!r}: train:VOCAB needs a vocabulary size of at least 300, "
                "e.g. train:2048."
            )

    @property
    def data_tokenizer(self) -> str:
        """The tokenizer that prepares the data: ``tokenizer``, else the base model's (``init_from``)."""
        return self.tokenizer if self.tokenizer is not None else self.init_from

    def _check_types(self) -> None:
        """Each setting has its declared type (``--set micro_batch=1.5`` is refused by name)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            optional = "None" in kind
            if value is None and optional:
                continue
            if kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
                want = "an integer"
            elif kind.startswith("bool"):
                ok = isinstance(value, bool)
                want = "true or false"
            elif kind.startswith("float"):
                ok = (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                )
                want = "a finite number"
            elif kind.startswith("str"):
                ok = isinstance(value, str)
                want = "a string"
            elif kind.startswith("dict"):
                ok = isinstance(value, dict)
                want = "an object of model knobs"
            else:  # list[str]: a list of strings, or one string
                ok = isinstance(value, str) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)
                )
                want = "a string or a list of strings"
            if not ok:
                raise ConfigError(
                    f"{f.name} must be {want}, got {value!r}; check the recipe and --set values."
                )

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sized to train on 2 CPU cores in under 10 minutes (README: measured time and losses).
_SHAKESPEARE_TINY = TrainConfig(
    model=dict(
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=704,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        norm_eps=1e-5,
    ),
    data=["shakespeare"],
    tokenizer="train:2048",
    seq_len=256,
    micro_batch=16,
    max_steps=250,
    lr=2e-3,
    warmup_steps=25,
    weight_decay=0.1,
    eval_interval=50,
    eval_batches=4,
    save_interval=125,
)
# The source article's small Differential Transformer: 8 layers, d_model 512, FFN 1792, lr 6e-4,
# 120 warmup steps, weight decay 0.1, no dropout, gradient clipping, bf16 on GPU. Its 8 heads are
# the baseline's: the Diff model halves them into 4 differential pairs (8 heads of 64 in HF's
# pairing), which keeps every projection the baseline's size (docs/variants.md §7.1). SmolLM2's 49,152-token
# vocabulary with tied embeddings gives the 56M parameters of the training benchmark.
_PAPER_MODEL = dict(
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    intermediate_size=1792,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    norm_eps=1e-5,
)
_PAPER = TrainConfig(
    model=_PAPER_MODEL,
    data=["shakespeare"],
    tokenizer="smollm2-135m-instruct",
    seq_len=256,
    micro_batch=4,
    grad_accum=1,
    max_steps=2000,
    lr=6e-4,
    warmup_steps=120,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_interval=50,
    eval_batches=8,
    save_interval=250,
)

# LoRA on the catalog's default model (SmolLM2-135M-Instruct), data tokenized with its tokenizer.
# lora-sft: chat SFT (loss on assistant tokens only) on the small example shipped with llamakin;
# lora-shakespeare: plain-text adaptation sized for 2 CPU cores in about 15 minutes (README).
CHAT_EXAMPLE = str(Path(__file__).parent / "examples" / "shakespeare_chat.jsonl")
_LORA = dict(rank=16, alpha=32, dropout=0.05, targets="q,k,v,o,gate,up,down")
_LORA_SFT = TrainConfig(
    init_from="smollm2-135m-instruct",
    tokenizer=None,
    data=[CHAT_EXAMPLE],
    lora=_LORA,
    seq_len=256,
    micro_batch=4,
    grad_accum=2,
    max_steps=60,
    lr=1e-3,
    min_lr_ratio=0.1,
    warmup_steps=6,
    weight_decay=0.0,
    eval_interval=20,
    eval_batches=4,
    save_interval=30,
)
_LORA_SHAKESPEARE = dataclasses.replace(
    _LORA_SFT,
    data=["shakespeare"],
    seq_len=256,
    micro_batch=8,
    grad_accum=1,
    max_steps=150,
    lr=1e-3,
    warmup_steps=10,
    eval_interval=50,
    eval_batches=8,
    save_interval=50,
)

RECIPES: dict[str, TrainConfig] = {
    "shakespeare-tiny": _SHAKESPEARE_TINY,
    "baseline-paper-small": _PAPER,
    "diff-paper-small": dataclasses.replace(
        _PAPER, model={**_PAPER_MODEL, "attention_kind": "differential"}
    ),
    "lora-sft": _LORA_SFT,
    "lora-shakespeare": _LORA_SHAKESPEARE,
}


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def recipe(name: str, overrides: list[str] = ()) -> TrainConfig:
    """A named recipe with ``key=value`` overrides (``model.num_layers=4``, ``lr=1e-3``, ``data=DIR``)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}.")
    values = copy.deepcopy(RECIPES[name].to_dict())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}.")
        value = parse_value(raw)
        if key.startswith("model."):
            knob = key[len("model.") :]
            if knob not in model_fields:
                raise ConfigError(f"--set {key}: the model has no knob {knob!r}.")
            values["model"][knob] = value
        elif key.startswith("lora."):
            values["lora"][key[len("lora.") :]] = value
        elif key in fields:
            values[key] = value
        else:
            raise ConfigError(
                f"--set {key}: unknown setting; valid: {', '.join(sorted(fields))}, model.<knob> "
                "or lora.<rank|alpha|dropout|targets|quantize|group_size>."
            )
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"invalid training settings: {e}.") from None
