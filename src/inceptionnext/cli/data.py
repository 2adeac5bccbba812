"""``inceptionnext data pack``: convert an ImageFolder once into WebDataset shards that ``--data wds:OUT`` reads;
``inceptionnext data make``: write an embedded set (digits, photos) as an ImageFolder."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="prepare data for training at scale (WebDataset shards)")
    sub = p.add_subparsers(dest="data_command", required=True)
    q = sub.add_parser(
        "pack",
        help="write an ImageFolder (train/, val/) as WebDataset tar shards plus dataset.json",
        description="Writes OUT/train/shard-000000.tar ..., OUT/val/... and OUT/dataset.json (classes, shards, "
        "counts); then train with --data wds:OUT. Image files are stored as they are (no re-encoding).",
    )
    q.add_argument("imagefolder", help="root with train/<class>/<image> (and val/<class>/<image>)")
    q.add_argument("out", help="a new or empty folder for the shards")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    q.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle across shards (default 0)")
    m = sub.add_parser(
        "make",
        help="write an embedded dataset: digits, photos (ImageFolders), detection (a COCO folder)",
        description="digits: the embedded default set as PNG (the same pixels as training without --data); photos: "
        "a 10-class 224 px JPEG set cut from scikit-image's photographs (train and val crops from disjoint rows). "
        "Any ImageFolder trainer (this one, timm's train.py) can read the folder. detection: the digit composites "
        "of `detect train` as a COCO 2017 folder (annotations/instances_{train,val}2017.json, train2017/, val2017/).",
    )
    m.add_argument("name", choices=["digits", "photos", "detection"])
    m.add_argument("out", help="a new or empty folder")
    m.add_argument("--image-size", type=int, default=None, help="pixels (default: digits 32, photos 224)")
    m.add_argument("--per-class", type=int, nargs=2, default=[60, 20], metavar=("TRAIN", "VAL"),
                   help="photos: images per class in train and val (default 60 20)")  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    if args.data_command == "make" and args.name == "detection":
        from ..detection.data import write_composites_coco

        out = write_composites_coco(args.out)
        print(f"wrote the digit composites as a COCO folder to {out}; train with detect train --data {out}")
        return 0
    if args.data_command == "make":
        from ..data.embedded import write_image_folder

        info = write_image_folder(args.name, args.out, image_size=args.image_size, per_class=tuple(args.per_class))
        c = info["counts"]
        print(
            f"wrote {args.name}: {len(info['classes'])} classes, {c['train']} train / {c['val']} val images of "
            f"{info['image_size']} px to {args.out}; train with --data {args.out}"
        )
        return 0
    from ..data import pack_image_folder

    info = pack_image_folder(args.imagefolder, args.out, shard_size=args.shard_size, seed=args.seed)
    parts = ", ".join(f"{s}: {p['count']} samples in {len(p['shards'])} shards" for s, p in info["splits"].items())
    print(f"packed {len(info['classes'])} classes ({parts}) to {args.out}; train with --data wds:{args.out}")
    return 0
