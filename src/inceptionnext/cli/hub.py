"""``inceptionnext hub export | push``: checkpoints in timm's Hugging Face layout."""

from __future__ import annotations

import argparse

from .options import add_model_source, load_model_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("hub", help="export / push checkpoints in timm's Hugging Face layout")
    hub = p.add_subparsers(dest="hub_command", required=True)
    q = hub.add_parser("export", help="write config.json + model.safetensors to a folder")
    add_model_source(q)
    q.add_argument("folder")
    q = hub.add_parser("push", help="export and upload to the Hugging Face Hub")
    add_model_source(q)
    q.add_argument("repo_id", help="OWNER/NAME on huggingface.co")
    q.add_argument("--private", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    import tempfile

    from ..tools.hub import export_folder, push_to_hub

    loaded = load_model_from_args(args)
    if args.hub_command == "export":
        print(f"exported {loaded.name} to {export_folder(loaded, args.folder)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"pushed {loaded.name} to {push_to_hub(export_folder(loaded, tmp), args.repo_id, private=args.private)}")
    return 0
