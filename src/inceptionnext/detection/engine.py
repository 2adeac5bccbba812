"""Detection and instance segmentation on the engine core: the detector, the data, the schedule and the loop.

Training is counted in epochs with the mmdet step schedule (linear warm-up over the first ``warmup_iters`` steps from
``lr x warmup_ratio``, then the lr multiplied by ``lr_gamma`` after each epoch of ``lr_steps``), evaluated with COCO's
metrics every ``eval_interval`` epochs and after the last. Data order comes from a ``DistributedSampler`` per epoch and
per-sample augmentation seeds from (seed, epoch, index), so a run resumed from an epoch's checkpoint continues with
exactly the batches and RNG streams (torchvision's proposal and RoI sampling draw from torch's global generator, which
the checkpoint holds) of the uninterrupted run. Checkpoints, resume, DDP/AMP, the NaN policy, metrics and curves come
from :class:`~inceptionnext.engine.run.TrainingRun`.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..data.datasets import DataError
from ..engine.optim import fused_update_available
from ..engine.run import TrainingRun, launch
from ..engine.runtime import ShardSampler, autocast, batches_from_step
from ..errors import ConfigError
from ..layers.fused import use_fused_mixer
from .config import DetConfig
from .data import EvalPipeline, TrainPipeline, build_det_dataset, collate_detection
from .metrics import coco_evaluate, gather_results, to_coco_results
from .models import convert_sync_batchnorm, create_detector, use_channels_last

__all__ = [
    "DetectionRun",
    "build_det_optimizer",
    "build_detector",
    "build_train_pipeline",
    "detection_param_groups",
    "evaluate_detection",
    "layer_id",
    "step_lr",
    "train_detection",
]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def step_lr(step: int, epoch: int, cfg: DetConfig, base_lr: float) -> float:
    """mmdet's ``lr_config(policy='step', warmup='linear')``: ``base_lr x lr_gamma^(number of lr_steps <= epoch)``,
    multiplied during the first ``warmup_iters`` steps by a factor rising linearly from ``warmup_ratio`` to 1."""
    lr = base_lr * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)
    if step < cfg.warmup_iters:
        lr *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def layer_id(name: str, num_layers: int) -> int:
    """The layer-wise lr decay group of a detector parameter, by ConvNeXt's rule for its 4-stage backbone
    (facebookresearch/ConvNeXt ``object_detection/mmcv_custom/layer_decay_optimizer_constructor.py``,
    ``get_num_layer_layer_wise``): stem 0; stage 1 blocks 1; stage 2 (and its downsampling) 2; stage 3's
    downsampling 3 and its blocks ``3 + block // 3``; stage 4 ``num_layers``; everything after the backbone's stages
    (stage output norms, FPN, heads) ``num_layers + 1``. InceptionNeXt has ConvNeXt's stage depths (T: 3-3-9-3), so
    the same groups fall on the same depths."""
    if re.search(r"(^|\.)body\.stem\.", name):
        return 0
    m = re.search(r"(^|\.)body\.stages[._](\d+)\.(downsample|blocks)\.?(\d+)?", name)
    if m is None:
        return num_layers + 1
    stage, part = int(m.group(2)), m.group(3)
    block = int(m.group(4)) if m.group(4) is not None else 0
    if part == "downsample":
        return {0: 0, 1: 2, 2: 3}.get(stage, num_layers)
    return {0: 1, 1: 2}.get(stage, 3 + block // 3 if stage == 2 else num_layers)


def detection_param_groups(model: nn.Module, cfg: DetConfig, base_lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight decay off for ``no_decay`` ('1d': every 1-d parameter and bias, ConvNeXt's
    constructor; 'norms': norm layers, Swin's ``custom_keys={'norm': decay_mult 0}``; 'none': decay on every
    parameter, mmdet's default constructor), and with ``layer_decay`` the
    lr of group ``i`` scaled by ``layer_decay ** (num_layers + 1 - i)`` (ConvNeXt: ``decay_rate ** (num_layers + 2 -
    layer_id - 1)``). Each group carries its ``lr_scale``; the schedule sets ``lr = lr_scale x step_lr(...)``."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.no_decay == "1d":
            no_wd = p.ndim <= 1 or name.endswith(".bias")
        else:
            no_wd = cfg.no_decay == "norms" and id(p) in norm_params
        lid = layer_id(name, cfg.layer_decay_layers) if cfg.layer_decay is not None else cfg.layer_decay_layers + 1
        key = (lid, no_wd)
        if key not in groups:
            scale = cfg.layer_decay ** (cfg.layer_decay_layers + 1 - lid) if cfg.layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_wd else cfg.weight_decay, "lr_scale": scale}
        groups[key]["params"].append(p)
    for g in groups.values():
        g["lr"] = base_lr * g["lr_scale"]
    return [groups[k] for k in sorted(groups)]


def build_det_optimizer(groups: list[dict[str, Any]], cfg: DetConfig, lr: float, model: nn.Module):
    """AdamW (Swin's and ConvNeXt's configs) or SGD with momentum (mmdet's RetinaNet configs) over ``groups``; torch's
    one-kernel AdamW update where ``fused_optimizer`` and the device allow it."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    fused = cfg.fused_optimizer and fused_update_available("adamw", model)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), **({"fused": True} if fused else {}))


def build_detector(cfg: DetConfig, num_classes: int) -> nn.Module:
    """The detector of ``cfg``; ``fused_mixer`` swaps the backbone's Inception mixers for the Triton ones."""
    model = create_detector(
        cfg.arch,
        cfg.backbone,
        num_classes,
        pretrained_backbone=cfg.pretrained and not cfg.backbone_checkpoint,
        backbone_checkpoint=cfg.backbone_checkpoint,
        drop_path_rate=cfg.drop_path,
        stage_norm=cfg.stage_norm,
        bn=cfg.bn,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        head_channels=cfg.head_channels,
        **_sampling_kwargs(cfg),
    )
    if cfg.fused_mixer:
        use_fused_mixer(model, cfg.backbone)
    return use_channels_last(model, cfg.channels_last)


def _sampling_kwargs(cfg: DetConfig) -> dict[str, Any]:
    """torchvision's arguments for the sampled anchors / proposals per image and the anchor sizes (R-CNNs)."""
    if cfg.arch == "retinanet":
        return {}
    kw: dict[str, Any] = {
        "rpn_batch_size_per_image": cfg.rpn_batch_size,
        "box_batch_size_per_image": cfg.roi_batch_size,
        "rpn_pre_nms_top_n_train": cfg.rpn_pre_nms_train,
        "rpn_post_nms_top_n_train": cfg.rpn_post_nms_train,
    }
    if cfg.anchor_sizes is not None:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = tuple((int(a),) for a in cfg.anchor_sizes)
        kw["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return kw


def build_train_pipeline(cfg: DetConfig) -> TrainPipeline:
    return TrainPipeline(
        policy=cfg.pipeline,
        flip=cfg.flip,
        scale=tuple(cfg.scale),
        ms_short_sides=tuple(cfg.short_sides),
        crop_short_sides=tuple(cfg.crop_short_sides),
        crop_size=tuple(cfg.crop_size),
    )


@torch.inference_mode()
def predict_dataset(
    model: nn.Module, dataset, device: torch.device, *, amp_dtype=None, progress: bool = True, batch_size: int = 1
) -> list[dict[str, Any]]:
    """COCO result dicts of this process's share of ``dataset`` (every image counted once over the processes)."""
    model.eval()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=0,
        collate_fn=collate_detection,
        generator=torch.Generator(),
    )  # leaves the global RNG alone
    results: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress, unit="batch"):
        images = [im.to(device) for im in images]
        with autocast(device, amp_dtype):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        results.extend(to_coco_results(outputs, targets, dataset.cat_ids))
    return results


def evaluate_detection(
    model: nn.Module, dataset, device: torch.device, *, amp_dtype=None, progress: bool = True
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO box (and, for a detector with masks, mask) AP over ``dataset``, and the results (gathered from every
    process)."""
    results = gather_results(predict_dataset(model, dataset, device, amp_dtype=amp_dtype, progress=progress))
    has_masks = getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask()
    return coco_evaluate(dataset.coco, results, ("bbox", "segm") if has_masks else ("bbox",)), results


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value


_AP_PANEL = (("bbox_AP", "box AP"), ("bbox_AP50", "box AP50"), ("segm_AP", "mask AP"), ("segm_AP50", "mask AP50"))


class DetectionRun(TrainingRun):
    """One process of a detection training run, counted in epochs."""

    task = "detection"
    curves = (
        ("train loss", (("train_loss", "train loss"),)),
        (
            "AP (%)",
            (("bbox_AP", "box AP"), ("bbox_AP50", "box AP50"), ("segm_AP", "mask AP"), ("segm_AP50", "mask AP50")),
        ),
    )
    best_key = "bbox_AP"
    checkpoint_keys = ("epoch", "class_names")
    nan_advice = "Lower the learning rate (--lr), lengthen the warm-up (--warmup-iters) or use --amp fp32/bf16."
    runtime_keys = (*TrainingRun.runtime_keys, "fused_mixer", "fused_optimizer", "eval_interval", "channels_last")

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.train_set = build_det_dataset(
            cfg.data, "train", build_train_pipeline(cfg), seed=cfg.seed, fresh=cfg.fresh_composites
        )
        self.val_set = build_det_dataset(cfg.data, "val", EvalPipeline(), seed=cfg.seed)
        self.class_names = list(self.train_set.classes)
        if list(self.val_set.classes) != self.class_names:
            raise DataError(
                f"train and val categories differ: {self.class_names[:5]}... vs {list(self.val_set.classes)[:5]}..."
            )
        model = build_detector(cfg, len(self.class_names)).to(dist.device)
        if dist.distributed and dist.device.type == "cuda":  # SyncBN unless the policy keeps per-process BN
            model = convert_sync_batchnorm(model)
        self.lr = cfg.scaled_lr(dist.world_size)
        groups = detection_param_groups(model, cfg, self.lr)
        self.optimizer = build_det_optimizer(groups, cfg, self.lr, model)
        self.clip_grad = cfg.clip_grad
        self.wrap(model)
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{len(self.train_set)} training images give no batch of {cfg.batch_size} per process: "
                "lower --batch-size"
            )
        self._batches = None

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"{cfg.arch} + {cfg.backbone}: {len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{len(self.class_names)} classes; batch {cfg.effective_batch(self.dist.world_size)}, "
            f"lr {cfg.lr:g} for batch {cfg.lr_base_batch} scaled to {self.lr:.3g}; {self.dist.device}"
        )

    def epoch_message(self, row: dict[str, Any]) -> str:
        parts = [f"train loss {row['train_loss']:.4f}"]
        for k, label in (("bbox_AP", "box AP"), ("bbox_AP50", "AP50"), ("segm_AP", "mask AP"), ("segm_AP50", "AP50")):
            if k in row:
                parts.append(f"{label} {row[k]:.2f}")
        return f"epoch {row['epoch']}/{self.num_epochs}: " + ", ".join(parts) + f", {row['epoch_time_s']:.1f}s"

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, device = self.cfg, self.dist.device
        if self._batches is None:  # from the resumed step on: epoch e is pass e of the sampler
            self._batches = batches_from_step(
                self.step,
                self.train_set,
                self.sampler,
                cfg.batch_size,
                seed=cfg.seed,
                workers=cfg.workers,
                pin_memory=device.type == "cuda",
                collate_fn=collate_detection,
            )
        self.ddp.train()
        bar = self.progress_bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}", unit="step")
        t0, seen = time.perf_counter(), 0
        for _ in range(self.steps_per_epoch):
            images, targets = next(self._batches)
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr_scale"] * step_lr(self.step, epoch, cfg, self.lr)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [
                {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
            ]
            with self.autocast():
                losses = self.ddp(images, targets)
            loss = sum(losses.values())
            self.backward(loss)
            self.optimizer_step()
            seen += len(images) * self.dist.world_size
            bar.update(1)
            if self.step % cfg.log_interval == 0:
                self.check_finite()
                bar.set_postfix(
                    loss=f"{self.running_loss.local_mean():.4f}",
                    lr=f"{self.current_lr():.2e}",
                    img_s=f"{seen / (time.perf_counter() - t0):.1f}",
                )
        bar.close()
        self.check_finite()
        return {
            "train_loss": self.running_loss.mean(),
            "lr": self.current_lr(),
            "img_per_s": seen / (time.perf_counter() - t0),
        }

    def evaluate(self, epoch: int) -> dict[str, float]:
        last = epoch + 1 == self.num_epochs
        if (epoch + 1) % self.cfg.eval_interval and not last:
            return {}
        metrics, _ = evaluate_detection(
            self.model, self.val_set, self.dist.device, amp_dtype=self.amp_dtype, progress=self.progress
        )
        return metrics

    def best_record(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.best_key not in row:  # an epoch without evaluation is checkpointed but cannot become best
            return dict(self.best)
        return super().best_record(row)


def train_detection(cfg: DetConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a detection training as described by ``cfg``; under torchrun, call it in every process.

    ``resume``: a training checkpoint to continue from (read and checked before anything is written, never copied);
    by default ``OUTPUT/last.pth`` is resumed when it exists.
    """
    return launch(DetectionRun, cfg, resume=resume)
