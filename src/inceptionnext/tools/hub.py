"""Hugging Face Hub export, push and pull of this package's checkpoints, in timm's layout.

A model folder holds ``config.json`` (timm's format: architecture, num_classes, model_args, pretrained_cfg with the
eval preprocessing, label_names) and ``model.safetensors``. After ``import inceptionnext``,
``timm.create_model("hf-hub:OWNER/REPO", pretrained=True)`` or ``timm.create_model("local-dir:/path",
pretrained=True)`` rebuild the model with its weights, preprocessing and class names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..inference import LoadedModel
from ..models.pretrained import HUB_WEIGHTS, resolve_data_config, weights_file_for

# weights_file_for lives in the models layer (timm's entry points load these folders through it); kept importable here
__all__ = ["export_folder", "push_to_hub", "weights_file_for"]


def export_folder(loaded: LoadedModel, folder: str | os.PathLike, model_kwargs: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` as a timm-layout model folder (config.json, model.safetensors, README.md)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / HUB_WEIGHTS))
    num_classes = int(getattr(model, "num_classes", 0))
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in resolve_data_config(loaded.preprocessing).items()}
    if model_kwargs is None:
        model_kwargs = (loaded.train_config or {}).get("model_kwargs", {})
    config = {
        "architecture": loaded.name,
        "num_classes": num_classes,
        "num_features": int(getattr(model, "num_features", 0)),
        "global_pool": "avg",
        "model_args": {"num_classes": num_classes, **model_kwargs},
        "pretrained_cfg": {**pre, "num_classes": num_classes, "first_conv": "stem.0"},
    }
    if loaded.class_names:
        config["label_names"] = list(loaded.class_names)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text(
        "---\nlibrary_name: timm\ntags: [image-classification, inceptionnext]\n---\n"
        f"# {loaded.name}\n\nExported by `inceptionnext hub export` from {loaded.weights}.\n\n"
        "```python\nimport inceptionnext, timm  # importing inceptionnext registers its architectures in timm\n"
        "model = timm.create_model('hf-hub:OWNER/REPO', pretrained=True)\n```\n"
    )
    return folder


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an exported folder to the Hugging Face Hub (creates the repository if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message="Add model")
    return f"https://huggingface.co/{repo.repo_id}"
