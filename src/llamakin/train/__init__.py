"""Training: data preparation, the loop (single process or torchrun), recipes, plots, experiments."""

from .config import RECIPES, TrainConfig, recipe
from .data import TokenData, prepare
from .loop import Trainer, TrainingError
from .run import train

__all__ = [
    "RECIPES",
    "TokenData",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "prepare",
    "recipe",
    "train",
]
