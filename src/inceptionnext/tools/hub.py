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

from ..errors import UserError
from ..inference import LoadedModel
from ..models.pretrained import HUB_WEIGHTS, resolve_data_config, weights_file_for

# weights_file_for lives in the models layer (timm's entry points load these folders through it); kept importable here
__all__ = ["HubError", "export_folder", "push_to_hub", "weights_file_for"]

# the packages whose exceptions mean "the Hub could not be reached or refused the request"
_NETWORK_PACKAGES = {"huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3", "ssl", "socket"}


class HubError(UserError, RuntimeError):
    """The Hugging Face Hub could not be reached, or refused the upload; the message says which and what to check."""


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
    """Upload an exported folder to the Hugging Face Hub (creates the repository if needed).

    A network failure (offline, DNS, proxy, timeout) or a refusal (no token, no write access) raises
    :class:`HubError` with what to check, instead of the HTTP client's traceback.
    """
    from huggingface_hub import HfApi, constants

    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message="Add model")
    except Exception as e:
        if not _is_hub_failure(e):
            raise
        raise _hub_error(e, repo_id, constants.ENDPOINT) from e
    return f"https://huggingface.co/{repo.repo_id}"


def _is_hub_failure(e: BaseException) -> bool:
    packages = {cls.__module__.split(".")[0] for cls in type(e).__mro__}
    return isinstance(e, OSError) or bool(packages & _NETWORK_PACKAGES)


def _hub_error(e: BaseException, repo_id: str, endpoint: str) -> HubError:
    detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:  # the Hub answered
        return HubError(
            f"the Hugging Face Hub ({endpoint}) refused to create or upload to {repo_id} (HTTP {status}; {detail}); "
            "check that you are logged in (`hf auth login` or HF_TOKEN) with write access to that namespace"
        )
    if "token" in detail.lower() or "logged in" in detail.lower():
        return HubError(f"not logged in to the Hugging Face Hub ({detail}); run `hf auth login` or set HF_TOKEN")
    return HubError(
        f"could not reach the Hugging Face Hub at {endpoint} to push {repo_id}: a network problem ({detail}); check "
        "the connection, proxy settings (HTTPS_PROXY) and HF_ENDPOINT, or unset HF_HUB_OFFLINE; `inceptionnext hub "
        "export FOLDER` writes the same files locally for a later upload"
    )
