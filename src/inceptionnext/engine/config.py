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
    "BatchScaledConfig",
    "SCHEDULES",
    "SCHED_ON",
    "TrainConfig",
    "add_config_arguments",
    "check_choice",
    "check_positive",
    "check_range",
    "coerce_types",
    "config_field",
    "dry_run_text",
    "git_revision",
    "list_recipes",
    "load_recipe",
    "overrides_from_args",
    "resolve_config",
    "task_config",
]

#: mixed precision: auto = bf16 on CUDA when supported (else fp16); the CPU always runs fp32
AMP_MODES = ("auto", "bf16", "fp16", "fp32")
#: learning-rate schedules: cosine with linear warm-up, or none (constant)
SCHEDULES = ("cosine", "none")
#: when the schedule moves: after every optimizer update, or once per epoch (timm 0.6.11, the official train.py)
SCHED_ON = ("step", "epoch")


def config_field(default: Any, help: str, *, choices: Sequence[str] | None = None, cli: bool = True) -> Any:  # noqa: A002
    """A config dataclass field with its flag's help; ``choices`` become the flag's choices and head its help, and
    the same tuple is what :func:`check_choice` validates against, so the allowed values are written once.
    ``cli=False`` keeps the field out of the flags (recipe-only)."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_f = config_field


class BatchScaledConfig:
    """What every run config (classification, segmentation, detection) computes from its fields ``batch_size``,
    ``lr``, ``lr_base_batch`` and, where it has one, ``grad_accum_steps``."""

    def effective_batch(self, world_size: int) -> int:
        return world_size * self.batch_size * getattr(self, "grad_accum_steps", 1)

    def scaled_lr(self, world_size: int) -> float:
        """The paper's rule (Sec. 4.1): lr = base_lr x effective_batch / base_batch."""
        return self.lr * self.effective_batch(world_size) / self.lr_base_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(BatchScaledConfig):
    """Every knob of a training run. Field names are the YAML keys; ``--field-name`` the flags."""

    # model
    model: str = _f("inceptionnext_atto", "registered model name")
    pretrained: bool = _f(False, "start from the released ImageNet-1K weights")
    initial_checkpoint: str | None = _f(None, "start from this checkpoint (any layout the loader accepts)")
    model_kwargs: dict = _f({}, "extra architecture arguments, e.g. {norm: layernorm}", cli=False)
    img_size: int = _f(224, "training and evaluation resolution")
    drop_path: float = _f(0.1, "peak stochastic depth rate (Table 9)")
    drop: float = _f(0.0, "dropout before the classifier (Table 9)")
    ls_init_value: float | None = _f(
        None, "LayerScale init, only for a model that has LayerScale (else an error); null keeps the model's"
    )
    finetune: bool = _f(False, "a fine-tune: refuse to start without --initial-checkpoint or --pretrained")
    # data
    data: str | None = _f(
        None,
        "ImageFolder root with train/ and val/, wds:SHARDS (a 'data pack' folder, or a pattern with {split}) or "
        "hf:NAME_OR_PATH (Hugging Face datasets); default: the embedded digits set",
    )
    workers: int = _f(4, "data loading processes per training process")
    # optimisation
    epochs: int = _f(300, "epochs of warm-up + cosine decay (timm's --epochs); the run trains epochs + cooldown_epochs")
    cooldown_epochs: int = _f(0, "epochs at min_lr after the decay (timm's --cooldown-epochs; the official runs: 10)")
    batch_size: int = _f(128, "images per process and micro-step")
    grad_accum_steps: int = _f(1, "micro-steps per optimizer step")
    lr: float = _f(4e-3, "peak learning rate for a global batch of lr_base_batch")
    lr_base_batch: int = _f(4096, "global batch the lr is given for; scaled linearly to the effective batch")
    min_lr: float = _f(1e-5, "cosine floor, reached at the last decay step (official train.py: 1e-5)")
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up")
    warmup_epochs: float = _f(20, "linear warm-up length in epochs (part of epochs, as in timm)")
    sched: str = _f("cosine", "learning-rate schedule (none: constant)", choices=SCHEDULES)
    sched_on: str = _f(
        "step",
        "step: lr set every optimizer update; epoch: once per epoch, as timm 0.6.11 (official)",
        choices=SCHED_ON,
    )
    opt: str = _f("adamw", "optimizer (timm name)")
    opt_eps: float = _f(1e-8, "Adam epsilon")
    opt_betas: list = _f([0.9, 0.999], "Adam betas")
    fused_optimizer: bool = _f(
        True,
        "torch's one-kernel Adam/AdamW update on CPU and CUDA (false: the per-parameter loop that timm's train.py "
        "gets on a CPU)",
    )
    weight_decay: float = _f(0.05, "decoupled weight decay (not on norms, biases, LayerScale)")
    clip_grad: float | None = _f(None, "clip the global gradient norm to this value")
    # augmentation and regularisation
    aa: str | None = _f("rand-m9-mstd0.5-inc1", "RandAugment policy (timm string); null disables")
    color_jitter: float = _f(0.4, "color jitter strength (timm applies it only when aa is null)")
    hflip: float = _f(0.5, "horizontal flip probability")
    scale: list = _f([0.08, 1.0], "RandomResizedCrop scale range")
    ratio: list = _f([0.75, 4 / 3], "RandomResizedCrop aspect-ratio range")
    reprob: float = _f(0.25, "RandomErasing probability")
    mixup: float = _f(0.8, "Mixup alpha (0 disables)")
    cutmix: float = _f(1.0, "CutMix alpha (0 disables)")
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of Mixup when both are on")
    smoothing: float = _f(0.1, "label smoothing")
    train_interpolation: str = _f(
        "random", "resize interpolation for training crops (random: bilinear or bicubic per image, as official)"
    )
    crop_pct: float | None = _f(None, "eval center-crop ratio; null: the model's pretrained config")
    mean: list | None = _f(None, "normalisation mean; null: the model's pretrained config", cli=False)
    std: list | None = _f(None, "normalisation std; null: the model's pretrained config", cli=False)
    # EMA
    model_ema: bool = _f(False, "keep an EMA of the weights, evaluated alongside the raw model")
    model_ema_decay: float = _f(0.9999, "EMA decay per optimizer step")
    ema_bn_recal: int = _f(
        8,
        "batches per process that recompute the EMA's BatchNorm statistics before each evaluation (0: off; "
        "at most an eighth of an epoch's batches; nothing to do for a model without BatchNorm)",
    )
    # runtime
    amp: str = _f("auto", "mixed precision (auto: bf16 on CUDA when supported; CPU runs fp32)", choices=AMP_MODES)
    tf32: bool = _f(False, "allow TF32 in CUDA matmuls and convolutions (what the paper's A100 runs used)")
    channels_last: bool = _f(
        True,
        "train and evaluate in channels_last memory format (the faster layout for these convolutions on CPU and "
        "with CUDA AMP; docs/training.md)",
    )
    fused_mixer: bool = _f(
        False, "run the Inception mixers with the fused Triton kernel (CUDA; opt-in until measured on a GPU)"
    )
    compile: bool = _f(False, "torch.compile the model")
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (CUDA)")
    seed: int = _f(0, "seed of everything (data order, augmentation, init)")
    output: str = _f("output/train", "directory for checkpoints, config, logs and plots")
    log_interval: int = _f(20, "optimizer steps between loss checks and log lines")
    recipe: str | None = _f(None, "name of the recipe the run started from", cli=False)
    notes: str = _f("", "where the recipe departs from other sources", cli=False)

    def total_epochs(self) -> int:
        """Epochs the run trains: the schedule's and the cool-down at ``min_lr`` (timm: ``--epochs`` +
        ``--cooldown-epochs``, so the official ``--epochs 300`` trains 310)."""
        return self.epochs + self.cooldown_epochs


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
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of config keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_fields(cls)))
    if unknown:
        raise ConfigError(f"{source}: unknown config keys {unknown}; valid keys are the fields of {cls.__name__}")
    return data


def _is_path(name_or_path: str | os.PathLike) -> bool:
    """A path object, a name ending in .yaml/.yml or one with a directory part is a file; a bare name is a packaged
    recipe, whatever files the current directory holds (a folder called ``tiny`` must not shadow the recipe)."""
    if not isinstance(name_or_path, str):
        return True
    return Path(name_or_path).suffix in (".yaml", ".yml") or any(sep in name_or_path for sep in ("/", os.sep))


def load_recipe(name_or_path: str | os.PathLike, cls: type = TrainConfig, package: str = _PACKAGE) -> dict[str, Any]:
    """A packaged recipe by name (``tiny``) or a YAML file by path (``runs/my.yaml``, ``./tiny``, a ``Path``)."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return _read_yaml(path.read_text(), str(path), cls)
    if name_or_path not in list_recipes(package):
        hint = f"; for a file give its path (./{name_or_path}) or --config" if Path(name_or_path).exists() else ""
        raise ConfigError(
            f"unknown recipe {name_or_path!r}; packaged recipes: {', '.join(list_recipes(package))}{hint}"
        )
    text = resources.files(package).joinpath(f"{name_or_path}.yaml").read_text()
    return {"recipe": name_or_path, **_read_yaml(text, f"recipe {name_or_path}", cls)}


def task_config(
    cls: type, package: str, recipe: str | os.PathLike | None, overrides: dict[str, Any] | None,
    *, nullable: tuple[str, ...] = (),
) -> Any:  # fmt: skip
    """``cls`` from its defaults < the recipe (a name in ``package`` or a YAML path) < ``overrides``, with the YAML or
    flag strings "none" / "null" of the ``nullable`` keys read as None; values are checked by the caller."""
    values: dict[str, Any] = load_recipe(recipe, cls, package) if recipe else {}
    values.update(overrides or {})
    for key in nullable:
        if isinstance(values.get(key), str) and values[key].lower() in ("none", "null"):
            values[key] = None
    return cls(**coerce_types(cls, values))


def resolve_config(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in (overrides or {}).items()})
    cfg = TrainConfig(**coerce_types(TrainConfig, values))
    check_train_config(cfg)
    return cfg


def check_train_config(cfg: TrainConfig) -> None:
    """Every value a run would use silently or die on later: a :class:`ConfigError` naming the key instead."""
    check_choice(cfg, "sched", "sched_on", "amp")
    check_positive(cfg, "epochs", "batch_size", "grad_accum_steps", "lr_base_batch", "img_size", "log_interval")
    check_range(cfg, "lr", low=0.0, low_open=True)
    check_range(cfg, "min_lr", "warmup_lr", "weight_decay", "opt_eps", "mixup", "cutmix", "color_jitter", low=0.0)
    check_range(cfg, "cooldown_epochs", "workers", "ema_bn_recal", low=0)
    check_range(cfg, "warmup_epochs", low=0.0)
    check_range(cfg, "smoothing", "drop_path", "drop", low=0.0, high=1.0, high_open=True)
    check_range(cfg, "hflip", "reprob", "mixup_switch_prob", "model_ema_decay", low=0.0, high=1.0)
    check_range(cfg, "crop_pct", low=0.0, high=1.0, low_open=True)
    check_range(cfg, "clip_grad", low=0.0, low_open=True)
    if cfg.sched == "cosine" and cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr ({cfg.min_lr:g}) must not exceed lr ({cfg.lr:g}): the cosine would rise")


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


def check_range(
    cfg: Any,
    *names: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Each named field lies in [low, high] (``low_open``/``high_open``: the bound excluded); ``None`` values, the
    "unset" of optional fields, pass. Else :class:`ConfigError` with the key and the allowed range."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
            hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
            raise ConfigError(f"{name} must be in {lo or '(-inf'}, {hi}, got {value:g}")


def coerce_types(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against the field types of ``cls``: numbers written as strings (PyYAML reads ``1e-3``,
    without a dot, as the string "1e-3") become numbers; anything else of the wrong type is a :class:`ConfigError`
    naming the key, not a traceback or a silently wrong run."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        if name not in hints or value is None:
            continue
        base, _ = _arg_type(hints[name])
        if base is str and isinstance(value, os.PathLike):
            out[name] = value = os.fspath(value)
        if base is float and isinstance(value, str):
            try:
                out[name] = value = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        elif base is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            out[name] = value = int(value)
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            out[name] = value = float(value)
        if base is int and isinstance(value, float) and value.is_integer():
            out[name] = value = int(value)
        ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
        if base is list and isinstance(value, list) and not all(isinstance(v, (int, float, str)) for v in value):
            ok = False
        if not ok:
            raise ConfigError(f"{name} must be {_type_name(base)}, got {value!r}")
    return out


def _type_name(base: type) -> str:
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list"}.get(
        base, base.__name__
    )


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
    """The resolved config as YAML, with the effective batch and scaled lr of this launch (``--dry-run``), and
    comment lines for what the values alone do not say (what is not applied, how long the run is)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = cfg.to_dict() | {"effective_batch": cfg.effective_batch(world), "scaled_lr": cfg.scaled_lr(world)}
    notes = run_notes(cfg) if isinstance(cfg, TrainConfig) else []
    return yaml.safe_dump(resolved, sort_keys=False) + "".join(f"# note: {n}\n" for n in notes)


def run_notes(cfg: TrainConfig) -> list[str]:
    """What a resolved config does that its values do not show."""
    notes = []
    if cfg.aa and cfg.color_jitter:
        notes.append(
            f"color_jitter {cfg.color_jitter:g} is not applied: timm's training transform uses colour jitter only "
            f"without RandAugment (aa {cfg.aa!r}), as in the official runs"
        )
    if cfg.sched == "cosine":
        unit = "epoch" if cfg.sched_on == "epoch" else "optimizer update"
        notes.append(
            f"trains {cfg.total_epochs()} epochs: {cfg.warmup_epochs:g} warm-up from {cfg.warmup_lr:g}, cosine to "
            f"min_lr {cfg.min_lr:g} by epoch {cfg.epochs}, {cfg.cooldown_epochs} at min_lr; lr set every {unit}"
        )
    precision = {"auto": "bf16 autocast on CUDA when supported", "fp32": "fp32"}.get(cfg.amp, f"{cfg.amp} autocast")
    notes.append(f"precision: {precision}{', TF32 allowed on CUDA' if cfg.tf32 else ''}; the CPU runs fp32")
    if cfg.finetune and not (cfg.initial_checkpoint or cfg.pretrained):
        notes.append("a fine-tune: training will refuse to start without --initial-checkpoint FILE or --pretrained")
    return notes
