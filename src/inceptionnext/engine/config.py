"""Training configuration: defaults < recipe YAML < command-line flags, resolved once and saved with the run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = [
    "AMP_MODES",
    "SCHEDULES",
    "TrainConfig",
    "add_config_arguments",
    "check_choice",
    "check_positive",
    "config_field",
    "dry_run_text",
    "git_revision",
    "list_recipes",
    "load_recipe",
    "overrides_from_args",
    "resolve_config",
]

#: mixed precision: auto = bf16 on CUDA when supported (else fp16); the CPU always runs fp32
AMP_MODES = ("auto", "bf16", "fp16", "fp32")
#: learning-rate schedules: cosine with linear warm-up, or none (constant)
SCHEDULES = ("cosine", "none")


def config_field(default: Any, help: str, *, choices: Sequence[str] | None = None, cli: bool = True) -> Any:  # noqa: A002
    """A config dataclass field with its flag's help; ``choices`` become the flag's choices and head its help, and
    the same tuple is what :func:`check_choice` validates against, so the allowed values are written once.
    ``cli=False`` keeps the field out of the flags (recipe-only)."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_f = config_field


@dataclass
class TrainConfig:
    """Every knob of a training run. Field names are the YAML keys; ``--field-name`` the flags."""

    # model
    model: str = _f("inceptionnext_atto", "registered model name")
    pretrained: bool = _f(False, "start from the released ImageNet-1K weights")
    initial_checkpoint: str | None = _f(None, "start from this checkpoint (any layout the loader accepts)")
    model_kwargs: dict = _f({}, "extra architecture arguments, e.g. {norm: layernorm}", cli=False)
    img_size: int = _f(224, "training and evaluation resolution")
    drop_path: float = _f(0.1, "peak stochastic depth rate (Table 9)")
    drop: float = _f(0.0, "dropout before the classifier (Table 9)")
    ls_init_value: float | None = _f(1e-6, "LayerScale init; null keeps the model's")
    # data
    data: str | None = _f(None, "ImageFolder root with train/ and val/; default: the embedded digits set")
    workers: int = _f(4, "data loading processes per training process")
    # optimisation
    epochs: int = _f(300, "training epochs")
    batch_size: int = _f(128, "images per process and micro-step")
    grad_accum_steps: int = _f(1, "micro-steps per optimizer step")
    lr: float = _f(4e-3, "peak learning rate for a global batch of lr_base_batch")
    lr_base_batch: int = _f(4096, "global batch the lr is given for; scaled linearly to the effective batch")
    min_lr: float = _f(1e-6, "cosine floor")
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up")
    warmup_epochs: float = _f(20, "linear warm-up length in epochs")
    sched: str = _f("cosine", "learning-rate schedule (none: constant)", choices=SCHEDULES)
    opt: str = _f("adamw", "optimizer (timm name)")
    opt_eps: float = _f(1e-8, "Adam epsilon")
    opt_betas: list = _f([0.9, 0.999], "Adam betas")
    weight_decay: float = _f(0.05, "decoupled weight decay (not on norms, biases, LayerScale)")
    clip_grad: float | None = _f(None, "clip the global gradient norm to this value")
    # augmentation and regularisation
    aa: str | None = _f("rand-m9-mstd0.5-inc1", "RandAugment policy (timm string); null disables")
    color_jitter: float = _f(0.4, "color jitter strength")
    hflip: float = _f(0.5, "horizontal flip probability")
    scale: list = _f([0.08, 1.0], "RandomResizedCrop scale range")
    ratio: list = _f([0.75, 4 / 3], "RandomResizedCrop aspect-ratio range")
    reprob: float = _f(0.25, "RandomErasing probability")
    mixup: float = _f(0.8, "Mixup alpha (0 disables)")
    cutmix: float = _f(1.0, "CutMix alpha (0 disables)")
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of Mixup when both are on")
    smoothing: float = _f(0.1, "label smoothing")
    train_interpolation: str = _f("bicubic", "resize interpolation for training crops")
    crop_pct: float | None = _f(None, "eval center-crop ratio; null: the model's pretrained config")
    mean: list | None = _f(None, "normalisation mean; null: the model's pretrained config", cli=False)
    std: list | None = _f(None, "normalisation std; null: the model's pretrained config", cli=False)
    # EMA
    model_ema: bool = _f(False, "keep an EMA of the weights, evaluated alongside the raw model")
    model_ema_decay: float = _f(0.9999, "EMA decay per optimizer step")
    # runtime
    amp: str = _f("auto", "mixed precision (auto: bf16 on CUDA when supported; CPU runs fp32)", choices=AMP_MODES)
    channels_last: bool = _f(False, "train in channels_last memory format")
    compile: bool = _f(False, "torch.compile the model")
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (CUDA)")
    seed: int = _f(0, "seed of everything (data order, augmentation, init)")
    output: str = _f("output/train", "directory for checkpoints, config, logs and plots")
    log_interval: int = _f(20, "optimizer steps between loss checks and log lines")
    recipe: str | None = _f(None, "name of the recipe the run started from", cli=False)
    notes: str = _f("", "where the recipe departs from other sources", cli=False)

    def effective_batch(self, world_size: int) -> int:
        return world_size * self.batch_size * self.grad_accum_steps

    def scaled_lr(self, world_size: int) -> float:
        """The paper's rule (Sec. 4.1): lr = base_lr x effective_batch / base_batch."""
        return self.lr * self.effective_batch(world_size) / self.lr_base_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


_FIELDS = _fields(TrainConfig)
_PACKAGE = "inceptionnext.recipes"


def list_recipes(package: str = _PACKAGE) -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(package).iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str, cls: type) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of config keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_fields(cls)))
    if unknown:
        raise ConfigError(f"{source}: unknown config keys {unknown}; valid keys are the fields of {cls.__name__}")
    return data


def load_recipe(name_or_path: str, cls: type = TrainConfig, package: str = _PACKAGE) -> dict[str, Any]:
    """A packaged recipe by name (``tiny``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return _read_yaml(path.read_text(), str(path), cls)
    if name_or_path not in list_recipes(package):
        raise ConfigError(f"unknown recipe {name_or_path!r}; packaged recipes: {', '.join(list_recipes(package))}")
    text = resources.files(package).joinpath(f"{name_or_path}.yaml").read_text()
    return {"recipe": name_or_path, **_read_yaml(text, f"recipe {name_or_path}", cls)}


def resolve_config(recipe: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in (overrides or {}).items()})
    cfg = TrainConfig(**values)
    check_choice(cfg, "sched", "amp")
    check_positive(cfg, "epochs", "batch_size", "grad_accum_steps", "lr_base_batch", "img_size")
    return cfg


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def check_choice(cfg: Any, *names: str) -> None:
    """Each named field holds one of the ``choices`` of its :func:`config_field`, else :class:`ConfigError`."""
    fields = _fields(type(cfg))
    for name in names:
        choices = fields[name].metadata["choices"]
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be {_one_of(choices)}, got {getattr(cfg, name)!r}")


def check_positive(cfg: Any, *names: str) -> None:
    """Each named (integer) field is at least 1, else :class:`ConfigError`."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _arg_type(hint: Any):
    """(base type, parser of a flag's text) for a resolved annotation such as ``float | None``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    optional = type(None) in typing.get_args(hint)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return base(text)

    return base, parse


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One flag per config field; unset flags are absent from the namespace so the recipe keeps its value."""
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + name.replace("_", "-")
        base, parse = _arg_type(hints[name])
        help_text, choices = f.metadata["help"], f.metadata.get("choices")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif base is list:
            parser.add_argument(flag, nargs="+", type=_number, default=argparse.SUPPRESS, help=help_text)
        elif choices:
            parser.add_argument(
                flag, type=parse, choices=choices, default=argparse.SUPPRESS, help=f"{' | '.join(choices)}: {help_text}"
            )
        else:
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_text)


def overrides_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in _fields(cls)}


def git_revision() -> str:
    """Commit of the source tree this package runs from (``+dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dry_run_text(cfg: Any) -> str:
    """The resolved config as YAML, with the effective batch and scaled lr of this launch (``--dry-run``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = cfg.to_dict() | {"effective_batch": cfg.effective_batch(world), "scaled_lr": cfg.scaled_lr(world)}
    return yaml.safe_dump(resolved, sort_keys=False)
