"""Is this package's training augmentation as hard as timm's ``train.py``'s? One fixed trained model scores both.

The two trainers build their batches differently: this package augments every sample from (seed, epoch, index) in
its loader workers and applies Mixup/CutMix, then random erasing, to the float batch in the main process; timm's
``train.py`` (with its default prefetcher) mixes uint8 images in the loader's collate function and erases after
normalising. Both call timm's own
transforms. If the distributions of the training batches differ (stronger, weaker or correlated draws), a model
scores differently on them. This script takes one trained model (a run directory of ``inceptionnext train``, e.g.
one of ``train_vs_timm.py``'s photos runs), reads N epochs of training batches from each pipeline on the same
ImageFolder with the run's recipe, and prints the model's mean loss and top-1 against the (mixed) targets, with their
standard errors. Equal losses within a few standard errors: the pipelines are equally hard for this model.

    python benchmarks/augment_vs_timm.py --run output/train_vs_timm/photos/ours/seed0 --epochs 12

The run's config must use Mixup/CutMix (the photos workload does). Nothing here is timed inside a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch
import yaml


def ours(cfg, epochs: int):
    """The batches ``inceptionnext train`` trains on: the run's own loader and Mixup, built by the engine."""
    from inceptionnext.engine.classification import ClassificationRun
    from inceptionnext.engine.runtime import init_distributed

    run = ClassificationRun(cfg, init_distributed("cpu"))
    run.build()  # writes no file
    for epoch in range(epochs):
        run.sampler.set_epoch(epoch)
        run.train_set.set_epoch(epoch)
        for x, y in run.train_loader:
            x, y = run.mixup(x, y)
            yield (run.erasing(x) if run.erasing is not None else x), y


def timm_train_py(cfg, model_cfg, epochs: int):
    """The batches of timm's ``train.py`` for the same arguments: ``create_loader`` with its prefetcher and
    ``FastCollateMixup``, as ``train.py`` calls them."""
    from timm.data import FastCollateMixup, create_dataset, create_loader

    from inceptionnext.data.transforms import eval_preprocessing

    pre = eval_preprocessing(cfg, model_cfg)
    dataset = create_dataset("", root=cfg.data, split="train", is_training=True, batch_size=cfg.batch_size)
    loader = create_loader(
        dataset,
        input_size=pre["input_size"],
        batch_size=cfg.batch_size,
        is_training=True,
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        mean=pre["mean"],
        std=pre["std"],
        num_workers=cfg.workers,
        device=torch.device("cpu"),
        use_prefetcher=True,
        collate_fn=FastCollateMixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            switch_prob=cfg.mixup_switch_prob,
            label_smoothing=cfg.smoothing,
            num_classes=len(dataset.reader.class_to_idx),
        ),
    )
    for _ in range(epochs):
        yield from loader


def _patch_timm_posterize() -> None:
    """timm's posterize with 0 bits kept gives a black image (Pillow 9, the official runs) instead of raising
    (Pillow >= 10); the same one-line difference ``train_vs_timm.py`` runs timm's ``train.py`` with."""
    import timm.data.auto_augment as aa
    from PIL import Image

    original = aa.posterize

    def posterize(img, bits_to_keep, **kw):
        return Image.new(img.mode, img.size) if bits_to_keep <= 0 else original(img, bits_to_keep, **kw)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        aa.NAME_TO_OP[name] = posterize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run", type=Path, required=True, help="an inceptionnext train run directory (config.yaml, last.pth)"
    )
    p.add_argument("--data", type=Path, default=None, help="the ImageFolder (default: the run's)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs read from each pipeline (default 8)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    from timm.loss import SoftTargetCrossEntropy

    from inceptionnext.checkpoint import extract_state_dict, read_checkpoint
    from inceptionnext.engine.classification import build_model
    from inceptionnext.engine.config import TrainConfig

    saved = yaml.safe_load((args.run / "config.yaml").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    cfg = dataclasses.replace(cfg, data=str(args.data or cfg.data), workers=args.workers, output=str(args.run))
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        raise SystemExit(f"{args.run}: the run's config has no Mixup/CutMix; this compares mixed batches")
    model = build_model(cfg, int(saved["num_classes"]))
    model.load_state_dict(extract_state_dict(read_checkpoint(args.run / "last.pth")))
    model.eval()
    _patch_timm_posterize()
    criterion = SoftTargetCrossEntropy()
    print(f"model {cfg.model} from {args.run / 'last.pth'}; data {cfg.data}; {args.epochs} epochs per pipeline")
    print(f"{'pipeline':24s} {'batches':>8s} {'loss':>16s} {'top-1 (mixed target)':>22s} {'s':>6s}")
    torch.manual_seed(0)
    results = {}
    for name, batches in (
        ("this package", ours(cfg, args.epochs)),
        ("timm train.py", timm_train_py(cfg, model.pretrained_cfg, args.epochs)),
    ):
        losses, hits = [], []
        t0 = time.perf_counter()
        with torch.no_grad():
            for x, y in batches:
                out = model(x)
                losses.append(criterion(out, y).item())
                hits.append((out.argmax(1) == y.argmax(1)).float().mean().item() * 100)
        se = statistics.stdev(losses) / math.sqrt(len(losses))
        se_top1 = statistics.stdev(hits) / math.sqrt(len(hits))
        results[name] = (statistics.mean(losses), se)
        print(
            f"{name:24s} {len(losses):8d} {statistics.mean(losses):9.4f} +- {se:.4f} "
            f"{statistics.mean(hits):14.1f} +- {se_top1:.1f} {time.perf_counter() - t0:6.0f}"
        )
    (a, sa), (b, sb) = results.values()
    print(f"difference (this package - timm): {a - b:+.4f} = {(a - b) / math.hypot(sa, sb):+.1f} standard errors")


if __name__ == "__main__":
    main()
