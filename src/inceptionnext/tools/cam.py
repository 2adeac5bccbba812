"""Class activation maps (Grad-CAM and the other methods of the ``grad-cam`` library) and Figure-4 style grids.

The CAM methods themselves come from ``pytorch_grad_cam`` (pip ``grad-cam``); this module picks each model's
target layer, prepares images with the model's eval preprocessing and lays the results out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..inference import ImageError, LoadedModel, distinct, eval_transform, read_image, unique_names

__all__ = ["CAM_METHODS", "CamResult", "target_layer", "compute_cam", "save_overlay", "cam_grid"]


# method name (the --method choices) -> class of pytorch_grad_cam
_CAM_CLASSES = {
    "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
    "layercam": "LayerCAM", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM", "fullgrad": "FullGrad", "gradcamelementwise": "GradCAMElementWise",
}  # fmt: skip
CAM_METHODS = tuple(_CAM_CLASSES)


def _methods() -> dict[str, type]:
    try:
        import pytorch_grad_cam as g
    except ImportError as e:  # pragma: no cover - a dependency of the cam extra
        raise ImportError("CAMs need the grad-cam library: pip install 'inceptionnext[cam]'") from e
    return {name: getattr(g, cls) for name, cls in _CAM_CLASSES.items()}


def _to_nchw(channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reshape transform for layers whose output is NHWC (Swin) or tokens (ViT/DeiT, prefix tokens dropped)."""

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 4 and t.shape[1] != channels and t.shape[-1] == channels:
            return t.permute(0, 3, 1, 2)
        if t.ndim == 3:
            n = t.shape[1]
            side = int(n**0.5)
            t = t[:, n - side * side :]  # drop class/distillation tokens
            return t.reshape(t.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return t

    return reshape


def target_layer(model: nn.Module, layer: str | None = None) -> tuple[nn.Module, Callable | None]:
    """The module whose activations and gradients make the CAM, and a reshape transform if it is not NCHW.

    Default: the last stage, as Figure 4 uses. This package's models and timm's CNNs: the module of the last
    ``feature_info`` entry (ResNet ``layer4``, ConvNeXt/InceptionNeXt ``stages.3``); ViT/DeiT: the first norm of the
    last block (the usual choice for transformers, which have no spatial last stage); Swin: the last stage.
    """
    if layer is not None:
        try:
            module = model.get_submodule(layer)
        except AttributeError as e:
            raise ConfigError(f"{type(model).__name__} has no module {layer!r}") from e
        return module, _to_nchw(getattr(model, "num_features", 0))
    if hasattr(model, "blocks") and hasattr(model, "cls_token") or type(model).__name__ == "VisionTransformer":
        return model.blocks[-1].norm1, _to_nchw(model.num_features)
    info = getattr(model, "feature_info", None)
    if info:
        last = info.info[-1] if hasattr(info, "info") else info[-1]
        return model.get_submodule(last["module"]), _to_nchw(last["num_chs"])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"no default CAM layer for {type(model).__name__}: pass one (--layer NAME)")
    return convs[-1], None


@dataclass
class CamResult:
    cam: np.ndarray  # H x W in [0, 1], aligned with ``image``
    image: np.ndarray  # H x W x 3 float in [0, 1]: the model's eval crop of the input
    target: int
    label: str
    prob: float


def compute_cam(
    loaded: LoadedModel, image_path: str | os.PathLike, *, method: str = "gradcam", target_class: int | None = None,
    layer: str | None = None,
) -> CamResult:  # fmt: skip
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    methods = _methods()
    if method not in methods:
        raise ConfigError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    pil = read_image(image_path)
    x = eval_transform(loaded.preprocessing)(pil)[None]
    view = eval_transform({**loaded.preprocessing, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})(pil)
    model = loaded.model.eval()
    device = next(model.parameters()).device
    x = x.to(device)
    with torch.no_grad():
        probs = model(x).float().softmax(-1)[0]
    n_classes = probs.shape[0]
    target = int(probs.argmax()) if target_class is None else int(target_class)
    if not 0 <= target < n_classes:
        raise ConfigError(f"target class {target} is out of range for a {n_classes}-class model")
    module, reshape = target_layer(model, layer)
    with methods[method](model=model, target_layers=[module], reshape_transform=reshape) as cam:
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    label = loaded.class_names[target] if loaded.class_names else str(target)
    return CamResult(np.clip(grayscale, 0, 1), view.permute(1, 2, 0).numpy().clip(0, 1), target, label,
                     float(probs[target]))  # fmt: skip


def save_overlay(result: CamResult, path: str | os.PathLike) -> Path:
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(show_cam_on_image(result.image.astype(np.float32), result.cam, use_rgb=True)).save(path)
    return path


def cam_grid(
    images: Sequence[str | os.PathLike], models: Sequence[tuple[str, LoadedModel]], output: str | os.PathLike, *,
    method: str = "gradcam", target_class: int | None = None, layer: str | None = None, progress: bool = True,
) -> tuple[Path, list[Path], list[str]]:  # fmt: skip
    """Overlays for every (image, model) pair and a grid (rows: images, columns: input + models) like Figure 4.

    Returns (grid path, overlay paths, problems). Unreadable images are reported and left out. Overlays are named
    ``<image>__<model>.png`` with both parts made unique (:func:`~inceptionnext.inference.unique_names`), so two
    images with one stem, or two checkpoints of one architecture, do not overwrite each other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from tqdm import tqdm

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Path, list[CamResult]]] = []
    problems: list[str] = []
    overlays: list[Path] = []
    images = [Path(i) for i in images]
    image_names = unique_names(images)
    model_names = distinct([_safe(title) for title, _ in models])
    bar = tqdm(total=len(images) * len(models), desc=method, unit="map", disable=not progress)
    for img, img_name in zip(images, image_names):
        results: list[CamResult] = []
        try:
            for (_, loaded), model_name in zip(models, model_names):
                r = compute_cam(loaded, img, method=method, target_class=target_class, layer=layer)
                overlays.append(save_overlay(r, out / f"{img_name}__{model_name}.png"))
                results.append(r)
                bar.update(1)
        except ValueError as e:
            problems.append(str(e))
            bar.update(len(models) - len(results))
            continue
        rows.append((img, results))
    bar.close()
    if not rows:
        raise ImageError("no readable image to draw: " + "; ".join(problems))
    cols = len(models) + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), dpi=130, squeeze=False)
    for r, (img, results) in enumerate(rows):
        axes[r][0].imshow(results[0].image)
        axes[r][0].set_title("Input" if r == 0 else "", fontsize=9)
        axes[r][0].set_ylabel(img.name, fontsize=7)
        for c, (title, res) in enumerate(zip(distinct([t for t, _ in models]), results), start=1):
            axes[r][c].imshow(show_cam_on_image(res.image.astype(np.float32), res.cam, use_rgb=True))
            header = f"{title}\n" if r == 0 else ""
            axes[r][c].set_title(f"{header}{res.label} ({100 * res.prob:.0f}%)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{method} activation maps (target: {'predicted class' if target_class is None else target_class})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    grid = out / "cam_grid.png"
    fig.savefig(grid)
    plt.close(fig)
    return grid, overlays, problems


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
