"""``train``: run a training recipe with the right trainer, the plain loop (:mod:`.loop`) or a
LoRA run (:mod:`llamakin.lora.train`, a subclass of it). Kept apart from the loop so that the
loop does not import its own subclass (no import cycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from .config import TrainConfig
from .loop import Trainer


def train(
    cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    if cfg.lora:
        # here, not above: llamakin.lora.train imports the loop's package
        from ..lora.train import (
            LoraTrainer,
        )

        trainer_class = LoraTrainer
    else:
        trainer_class = Trainer
    trainer = trainer_class(cfg, out, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
