from .config import TrainConfig, list_recipes, load_recipe, resolve_config
from .trainer import NonFiniteLossError, evaluate, train
from .validate import validate

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "evaluate",
    "list_recipes",
    "load_recipe",
    "resolve_config",
    "train",
    "validate",
]
