"""Training: one engine core (:mod:`.run`, :mod:`.runtime`, :mod:`.checkpointing`, :mod:`.report`) and the
classification task on it (:mod:`.classification`); the run configuration and recipes (:mod:`.config`) and the
standalone validation (:mod:`.validate`)."""

from .classification import evaluate, train
from .config import TrainConfig, list_recipes, load_recipe, resolve_config
from .run import NonFiniteLossError, TrainingRun
from .validate import validate

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "TrainingRun",
    "evaluate",
    "list_recipes",
    "load_recipe",
    "resolve_config",
    "train",
    "validate",
]
