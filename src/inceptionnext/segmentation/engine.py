"""Semantic segmentation on the engine core: the segmentor, the data, the loss and the step loop, nothing else.

Training is counted in optimizer steps (iterations), as in the ADE20K recipes, with an evaluation (and a checkpoint)
every ``eval_interval`` steps. Data order comes from a ``DistributedSampler`` per pass over the training set and
per-sample seeds from (seed, pass, index), so a run resumed from a checkpoint at step k continues with exactly the
batches it would have seen (:func:`~inceptionnext.engine.runtime.batches_from_step`). Checkpoints, resume, DDP/AMP,
the NaN policy, metrics and curves come from :class:`~inceptionnext.engine.run.TrainingRun`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..engine.optim import build_optimizer
from ..engine.run import TrainingRun, launch
from ..engine.runtime import ShardSampler, autocast, batches_from_step
from ..errors import ConfigError
from ..layers.fused import use_fused_mixer
from .config import SegConfig
from .data import IGNORE_INDEX, EvalPipeline, TrainPipeline, build_seg_dataset
from .metrics import ConfusionMatrix
from .segmentor import Segmentor, create_segmentor

__all__ = [
    "SegmentationRun",
    "build_segmentor",
    "evaluate_segmentation",
    "infer_logits",
    "poly_lr",
    "seg_loss",
    "train_segmentation",
]


def poly_lr(step: int, cfg: SegConfig, base_lr: float) -> float:
    """Poly decay to ``min_lr`` over all steps, multiplied during warm-up by a factor rising linearly from
    ``warmup_ratio`` to 1 (the ADE20K schedule)."""
    lr = (base_lr - cfg.min_lr) * (1 - step / cfg.iterations) ** cfg.poly_power + cfg.min_lr
    if step < cfg.warmup_iters:
        lr *= 1 - (1 - step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def build_segmentor(cfg: SegConfig, num_classes: int) -> Segmentor:
    """The segmentor of ``cfg``; ``fused_mixer`` swaps the backbone's Inception mixers for the Triton ones."""
    segmentor = create_segmentor(
        cfg.head,
        cfg.backbone,
        num_classes,
        drop_path_rate=cfg.drop_path,
        stage_norm=cfg.stage_norm,
        head_channels=cfg.head_channels,
        pretrained=cfg.pretrained and not cfg.backbone_checkpoint,
        backbone_checkpoint=cfg.backbone_checkpoint,
    )
    if cfg.fused_mixer:
        use_fused_mixer(segmentor.backbone, cfg.backbone)
    return segmentor


def seg_loss(model: nn.Module, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    def ce(logits: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)

    loss = ce(outputs["out"])
    if "aux" in outputs:
        loss = loss + getattr(model, "aux_weight", 0.4) * ce(outputs["aux"])
    return loss


@torch.inference_mode()
def infer_logits(
    model: Segmentor,
    img: torch.Tensor,
    out_size: tuple[int, int],
    *,
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
) -> torch.Tensor:
    """Class probabilities (1, C, *out_size) for one normalised image (1, 3, H, W): whole image or sliding window."""
    if mode == "whole":
        logits = model.predict(img)
    else:
        _, _, h, w = img.shape
        ch, cw = min(crop[0], h), min(crop[1], w)
        rows = max(math.ceil((h - ch) / stride[0]), 0) + 1
        cols = max(math.ceil((w - cw) / stride[1]), 0) + 1
        logits = None
        count = torch.zeros(1, 1, h, w, device=img.device)
        for r in range(rows):
            for c in range(cols):
                y0 = min(r * stride[0], h - ch)
                x0 = min(c * stride[1], w - cw)
                part = model.predict(img[:, :, y0 : y0 + ch, x0 : x0 + cw])
                if logits is None:
                    logits = img.new_zeros(1, part.shape[1], h, w)
                logits[:, :, y0 : y0 + ch, x0 : x0 + cw] += part
                count[:, :, y0 : y0 + ch, x0 : x0 + cw] += 1
        logits = logits / count
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(1)


@torch.inference_mode()
def evaluate_segmentation(
    model: Segmentor,
    dataset,
    device: torch.device,
    *,
    mode: str = "whole",
    crop=(512, 512),
    stride=(341, 341),
    aug_test: bool = False,
    ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    amp_dtype=None,
    progress: bool = True,
) -> dict[str, Any]:
    """mIoU / mAcc / aAcc over ``dataset`` (its EvalPipeline leaves masks at full resolution), summed exactly
    over processes. ``aug_test`` averages the class probabilities over scales and horizontal flips."""
    model.eval()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    cm = ConfusionMatrix(model.num_classes, IGNORE_INDEX, device)
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=0,
        generator=torch.Generator(),
    )  # leaves the global RNG alone
    for img, mask in tqdm(loader, desc="eval", leave=False, disable=not progress, unit="img"):
        img, mask = img.to(device), mask.to(device)
        size = tuple(mask.shape[-2:])
        scales = ratios if aug_test else (1.0,)
        probs = 0
        with autocast(device, amp_dtype):
            for s in scales:
                x = img if s == 1.0 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=False)
                for flip in (False, True) if aug_test else (False,):
                    xi = x.flip(-1) if flip else x
                    p = infer_logits(model, xi, size, mode=mode, crop=crop, stride=stride).float()
                    probs = probs + (p.flip(-1) if flip else p)
        cm.update(probs.argmax(1), mask)
    cm.all_reduce()
    return cm.compute()


class SegmentationRun(TrainingRun):
    """One process of a segmentation training run, counted in optimizer steps."""

    task = "segmentation"
    x_column = "step"
    curves = (
        ("train loss", (("train_loss", "train loss"),)),
        ("%", (("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"))),
    )
    best_key = "mIoU"
    checkpoint_keys = ("class_names",)
    nan_advice = "Lower the learning rate (--lr) or use --amp fp32/bf16 instead of fp16."
    runtime_keys = (*TrainingRun.runtime_keys, "fused_mixer", "fused_optimizer")

    def initial_best(self) -> dict[str, Any]:
        return {"mIoU": -1.0, "step": 0}

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        train_pipe = TrainPipeline(
            scale=tuple(cfg.scale),
            ratio_range=tuple(cfg.ratio_range),
            crop_size=tuple(cfg.crop_size),
            cat_max_ratio=cfg.cat_max_ratio,
            photometric=cfg.photometric,
        )
        self.train_set = build_seg_dataset(cfg.data, "train", train_pipe, seed=cfg.seed)
        self.val_set = build_seg_dataset(cfg.data, "val", EvalPipeline(scale=tuple(cfg.scale)), seed=cfg.seed)
        self.class_names = list(self.train_set.classes)
        model = build_segmentor(cfg, len(self.class_names)).to(dist.device)
        if dist.distributed and dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the ADE20K recipes train with SyncBN
        self.lr = cfg.scaled_lr(dist.world_size)
        self.optimizer = build_optimizer(
            model,
            self.lr,
            weight_decay=cfg.weight_decay,
            betas=cfg.betas,
            no_decay=cfg.no_decay,
            fused=cfg.fused_optimizer,
        )
        self.wrap(model)
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        if len(self.sampler) // cfg.batch_size < 1:
            raise ConfigError(
                f"{len(self.train_set)} training images give no batch of {cfg.batch_size} per process: "
                "lower --batch-size"
            )

    def describe(self) -> str:
        cfg = self.cfg
        return (
            f"{cfg.head} + {cfg.backbone}: {len(self.train_set)} train / {len(self.val_set)} val images, "
            f"{len(self.class_names)} classes; batch {cfg.effective_batch(self.dist.world_size)}, "
            f"lr {cfg.lr:g} for batch {cfg.lr_base_batch} scaled to {self.lr:.3g}; {self.dist.device}"
        )

    def evaluate_model(self) -> dict[str, Any]:
        cfg = self.cfg
        return evaluate_segmentation(
            self.model,
            self.val_set,
            self.dist.device,
            mode=cfg.eval_mode,
            crop=tuple(cfg.slide_crop),
            stride=tuple(cfg.slide_stride),
            aug_test=cfg.aug_test,
            amp_dtype=self.amp_dtype,
            progress=self.progress,
        )

    def fit(self) -> dict[str, Any]:
        cfg, device = self.cfg, self.dist.device
        bar = self.progress_bar(total=cfg.iterations, initial=self.step, desc="segment train", unit="step")
        t0, seen = time.perf_counter(), 0
        last_eval: dict[str, Any] = {}
        batches = batches_from_step(
            self.step,
            self.train_set,
            self.sampler,
            cfg.batch_size,
            seed=cfg.seed,
            workers=cfg.workers,
            pin_memory=device.type == "cuda",
        )
        while self.step < cfg.iterations:
            img, mask = next(batches)
            self.ddp.train()
            for g in self.optimizer.param_groups:
                g["lr"] = poly_lr(self.step, cfg, self.lr)
            img, mask = img.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with self.autocast():
                loss = seg_loss(self.model, self.ddp(img), mask)
            self.backward(loss)
            self.optimizer_step()
            seen += len(img) * self.dist.world_size
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step % cfg.eval_interval == 0:
                self.check_finite()
                bar.set_postfix(
                    loss=f"{self.running_loss.mean():.4f}",
                    lr=f"{self.current_lr():.2e}",
                    img_s=f"{seen / (time.perf_counter() - t0):.1f}",
                )
            if self.step % cfg.eval_interval == 0 or self.step == cfg.iterations:
                train_loss = self.running_loss.mean()
                self.average_bn_statistics()  # every process evaluates (and saves) the same statistics
                res = self.evaluate_model()
                row = {
                    "step": self.step,
                    "train_loss": train_loss,
                    "lr": self.current_lr(),
                    "mIoU": res["mIoU"],
                    "mAcc": res["mAcc"],
                    "aAcc": res["aAcc"],
                    "img_per_s": seen / (time.perf_counter() - t0),
                }
                self.record(row)
                self.log(
                    f"step {self.step}/{cfg.iterations}: train loss {train_loss:.4f}, mIoU {res['mIoU']:.2f}, "
                    f"mAcc {res['mAcc']:.2f}, aAcc {res['aAcc']:.2f}"
                )
                last_eval = res
                self.running_loss.reset()
        bar.close()
        return {
            "best": self.best,
            "last": {k: v for k, v in last_eval.items() if k not in ("IoU", "Acc")},
            "per_class_IoU": dict(zip(self.class_names, last_eval.get("IoU", []))),
            "output": str(self.out),
        }


def train_segmentation(cfg: SegConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a segmentation training as described by ``cfg``; under torchrun, call it in every process.

    ``resume``: a training checkpoint to continue from (read and checked before anything is written, never copied);
    by default ``OUTPUT/last.pth`` is resumed when it exists. A file that cannot resume this run raises
    :class:`~inceptionnext.checkpoint.CheckpointError` and leaves the output folder untouched.
    """
    return launch(SegmentationRun, cfg, resume=resume)
