"""LoRA fine-tuning: low-rank adapters on a frozen base, in PEFT's format both ways.

import llamakin
from llamakin.lora import LoraSettings, apply_lora, save_adapter
model = llamakin.load("smollm2-135m-instruct")
apply_lora(model, LoraSettings(rank=16, alpha=32, targets="q,k,v,o,gate,up,down"))
...  # train the parameters that require grad
save_adapter(model, "out/adapter")   # peft.PeftModel.from_pretrained(hf_model, "out/adapter")
llamakin.load("smollm2-135m-instruct", adapter="out/adapter")   # merged for inference
"""

from .layers import LoraLinear, lora_only
from .model import (
    DEFAULT_TARGETS,
    TARGETS,
    LoraSettings,
    apply_lora,
    attach,
    lora_layers,
    merge,
    parse_targets,
    projection_parts,
)
from .peft_format import hf_family, load_adapter, module_names, read_adapter, save_adapter

__all__ = [
    "DEFAULT_TARGETS",
    "TARGETS",
    "LoraLinear",
    "LoraSettings",
    "apply_lora",
    "attach",
    "hf_family",
    "load_adapter",
    "lora_layers",
    "lora_only",
    "merge",
    "module_names",
    "parse_targets",
    "projection_parts",
    "read_adapter",
    "save_adapter",
]
