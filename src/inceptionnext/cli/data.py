"""``inceptionnext data pack``: convert an ImageFolder once into WebDataset shards that ``--data wds:OUT`` reads."""

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
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import pack_image_folder

    info = pack_image_folder(args.imagefolder, args.out, shard_size=args.shard_size, seed=args.seed)
    parts = ", ".join(f"{s}: {p['count']} samples in {len(p['shards'])} shards" for s, p in info["splits"].items())
    print(f"packed {len(info['classes'])} classes ({parts}) to {args.out}; train with --data wds:{args.out}")
    return 0
