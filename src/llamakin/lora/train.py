"""LoRA runs of the training loop (``llamakin train --recipe lora-sft``) and their export.

:class:`LoraTrainer` is the loop of :mod:`llamakin.train.loop` with two differences: the model
is ``init_from`` (anything :func:`llamakin.load` reads) with adapters on a frozen base (the base
never reaches the optimizer: it does not require grad), and checkpoints hold the adapters and
their optimizer state only. Everything else (accumulation, clipping, resume, evaluation,
metrics, plots, torchrun) is the loop's own. At the end the adapter is written in PEFT's format
to ``OUT/adapter``; ``llamakin export-adapter RUN OUT [--merge]`` does it again from any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LlamakinError, UnsupportedError
from ..model import Transformer
from ..train.config import TrainConfig
from ..train.loop import Trainer, TrainingError
from .model import LoraSettings, apply_lora, hold_frozen_matrices_in, merge
from .peft_format import save_adapter
from .quantized import load_quantized_base


def lora_model(
    cfg: TrainConfig, vocab_size: int | None = None, float_base: bool = False
) -> Transformer:
    """``init_from`` with fresh adapters (seeded by ``cfg.seed``), the base frozen: in float32, or
    held as int4/int8 with ``lora.quantize`` (QLoRA; ``float_base`` loads it in float32 anyway)."""
    import llamakin

    settings = LoraSettings.from_dict(cfg.lora)
    if settings.quantize and not float_base:
        model = load_quantized_base(cfg.init_from, settings.quantize, settings.group_size)
    else:
        model = llamakin.load(cfg.init_from).float()
    if vocab_size is not None and model.config.vocab_size < vocab_size:
        raise TrainingError(
            f"{cfg.init_from} has {model.config.vocab_size} embeddings but the data's tokenizer has "
            f"{vocab_size} tokens; prepare the data with the base model's tokenizer."
        )
    torch.manual_seed(cfg.seed)
    apply_lora(model, settings)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


class LoraTrainer(Trainer):
    save_frozen = False

    def _model(self) -> Transformer:
        model = lora_model(self.cfg, self.train_data.vocab_size)
        self.trained_names = [n for n, p in model.named_parameters() if p.requires_grad]
        return model.to(self.device).train()

    def _fit_to_precision(self) -> None:
        """Under bf16 autocast the frozen base's matrices are held in bfloat16 (the same products,
        no per-step casts, half their memory: :func:`~llamakin.lora.model.hold_frozen_matrices_in`);
        checkpoints hold only the adapters and export reloads the float base, so nothing is lost.
        FSDP2 shards a block's parameters as one buffer of one dtype, so there they stay float32."""
        sharded = self.world > 1 and self.cfg.parallel == "fsdp"
        if self.precision == "bfloat16" and not sharded:
            hold_frozen_matrices_in(self.model, torch.bfloat16)

    def export(self) -> Path:
        """The trained adapter in PEFT's format (``out/adapter``), with the data's tokenizer."""
        return export_run(self.out, self.out / "adapter")


def run_model(run: str | Path, float_base: bool = False) -> tuple[Transformer, TrainConfig, Path]:
    """A LoRA run's base with its last checkpoint's adapters (and the run's settings and data dir);
    a QLoRA run's base is quantized as in training unless ``float_base``."""
    run = Path(run).expanduser()
    config_path, checkpoint = run / "train_config.json", run / "ckpt.pt"
    if not config_path.is_file() or not checkpoint.is_file():
        raise LlamakinError(
            f"{run} is not a finished or checkpointed training run (no train_config.json and ckpt.pt)."
        )
    cfg = TrainConfig(**json.loads(config_path.read_text())["train"])
    if not cfg.lora:
        raise LlamakinError(f"{run} is not a LoRA run; its full model is in {run / 'model'}.")
    model = lora_model(cfg, float_base=float_base)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(adapters - set(state))
    if missing:
        raise LlamakinError(
            f"{checkpoint} lacks adapter tensor {missing[0]!r}; the run's settings changed after it."
        )
    model.load_state_dict({n: state[n] for n in adapters}, strict=False)
    data = (
        Path(cfg.data[0]).expanduser()
        if len(cfg.data) == 1 and (Path(cfg.data[0]).expanduser() / "meta.json").is_file()
        else run / "data"
    )
    return model.eval(), cfg, data


def export_run(run: str | Path, out: str | Path, merged: bool = False) -> Path:
    """Write a LoRA run's adapter as a PEFT directory, or with ``merged`` the base with the adapter
    folded in as a Hugging Face model directory (with the tokenizer; GGUF: ``llamakin convert``)."""
    from ..convert import fit_to_family
    from ..tokenizer import load_tokenizer
    from .peft_format import hf_family

    model, cfg, data = run_model(run, float_base=merged)
    out = Path(out).expanduser()
    if merged:
        merge(model)
        try:
            family = hf_family(model.config)[0].name
            # an interleaved-RoPE base: q/k rows to HF's order
            model, _ = fit_to_family(model, family)
        except UnsupportedError:  # no transformers class: the format the base would be saved in
            family = None
        model.save_pretrained(out, family=family)
    else:
        save_adapter(model, out, base_model=cfg.init_from)
    if (data / "tokenizer").exists():
        load_tokenizer(data / "tokenizer").save(out)
    return out
