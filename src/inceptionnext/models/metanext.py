"""MetaNeXt: the macro-architecture shared by InceptionNeXt, ConvNeXt and their ablations (paper Sec. 3.1).

A block is ``x + DropPath(gamma * MLP(Norm(TokenMixer(x))))``: one shortcut for mixer and MLP together, which is
what separates MetaNeXt from MetaFormer (two shortcuts). The model is a stem, stages of blocks with 2x2 strided
downsampling between them, and a classifier head. The 4-stage layout is the one of Table 3, the one-stage
(isotropic) layout the one of Table 5.

State-dict keys follow the official InceptionNeXt code and timm's ``inception_next`` (``stem.*``,
``stages.N.downsample.*``, ``stages.N.blocks.M.{token_mixer,norm,mlp,gamma}``, ``head.*``), so those checkpoints load
without remapping; ConvNeXt-layout checkpoints go through :func:`inceptionnext.checkpoint.remap_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models._features import FeatureInfo, feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..layers.mlp import ConvMlp, LinearMlp
from ..layers.swap import replace_modules, share_as

__all__ = ["MetaNeXt", "MetaNeXtBlock", "MetaNeXtStage", "ConvMlp", "MlpHead", "NormLinearHead", "make_norm"]

MixerFactory = Callable[[int], nn.Module]


def make_norm(kind: str, channels: int) -> nn.Module:
    """Norm over the channels of NCHW maps: ``"batchnorm"`` (InceptionNeXt), ``"layernorm"`` (ConvNeXt, eps 1e-6)."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return LayerNorm2d(channels, eps=1e-6)
    raise ConfigError(f"unknown norm {kind!r}: use 'batchnorm' or 'layernorm'")


class MlpHead(nn.Module):
    """InceptionNeXt's classifier: average pool -> Linear (ratio 3) -> GELU -> LayerNorm -> dropout -> Linear.

    Stage 4 uses MLP ratio 3 instead of 4 and the paper moves the saved parameters here (Sec. 3.3).
    """

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 3, drop: float = 0.0) -> None:
        super().__init__()
        self.in_features = dim
        self.num_features = hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    classifier_name = "fc2"

    def reset(self, num_classes: int) -> None:
        self.fc2 = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(self.act(self.fc1(x.mean((2, 3))))))
        return x if pre_logits else self.fc2(x)


class NormLinearHead(nn.Module):
    """ConvNeXt's classifier: average pool -> LayerNorm -> dropout -> Linear."""

    def __init__(self, dim: int, num_classes: int, drop: float = 0.0) -> None:
        super().__init__()
        self.in_features = self.num_features = dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    classifier_name = "fc"

    def reset(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(x.mean((2, 3))))
        return x if pre_logits else self.fc(x)


class MetaNeXtBlock(nn.Module):
    """TokenMixer -> Norm -> MLP -> LayerScale -> DropPath, one shortcut (Eq. 1-3)."""

    def __init__(
        self,
        dim: int,
        token_mixer: MixerFactory,
        norm: str = "batchnorm",
        mlp_ratio: float = 4,
        ls_init_value: float | None = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.token_mixer = token_mixer(dim)
        self.norm = make_norm(norm, dim)
        self.mlp = ConvMlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.token_mixer(x)))
        if self.gamma is not None:
            y = y * self.gamma.reshape(1, -1, 1, 1)
        return x + self.drop_path(y)


class MetaNeXtStage(nn.Module):
    """Optional Norm + 2x2 strided conv downsampling, then ``depth`` blocks."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        token_mixer: MixerFactory,
        *,
        downsample: bool,
        norm: str,
        mlp_ratio: float,
        ls_init_value: float | None,
        drop_path_rates: Sequence[float],
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                make_norm(norm, in_chs), nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *(
                MetaNeXtBlock(out_chs, token_mixer, norm, mlp_ratio, ls_init_value, drop_path_rates[i])
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class MetaNeXt(nn.Module):
    """MetaNeXt classifier and backbone.

    Args:
        depths, dims: blocks and channels per stage. One stage with ``stem_patch_size=16`` is the isotropic layout.
        token_mixers: a factory ``f(channels) -> nn.Module`` or one per stage.
        norm: ``"batchnorm"`` (InceptionNeXt) or ``"layernorm"`` (ConvNeXt); used in the stem, downsampling and blocks.
        mlp_ratios: MLP expansion per stage (InceptionNeXt: 4, 4, 4, 3).
        head: ``"mlp"`` (InceptionNeXt) or ``"norm_linear"`` (ConvNeXt).
        head_mlp_ratio: hidden ratio of the MLP head.
        stem_patch_size: stride of the patchify stem (4 for the 4-stage layout).
        stem_norm: whether the stem has a norm after its convolution (the isotropic ConvNeXt has none).
        drop_rate: dropout before the classifier.
        drop_path_rate: peak stochastic depth, increased linearly over all blocks.
        ls_init_value: LayerScale init (1e-6 in the paper); ``None`` disables LayerScale.
    """

    #: :func:`inceptionnext.checkpoint.load_state_dict_checked` renames original-ConvNeXt and timm-ConvNeXt keys for
    #: this model (every layout of the checkpoint module's docstring maps onto it)
    accepts_foreign_layouts = True

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        token_mixers: MixerFactory | Sequence[MixerFactory],
        norm: str = "batchnorm",
        mlp_ratios: float | Sequence[float] = (4, 4, 4, 3),
        head: str = "mlp",
        head_mlp_ratio: float = 3,
        stem_patch_size: int = 4,
        stem_norm: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float | None = 1e-6,
    ) -> None:
        super().__init__()
        n = len(depths)
        if len(dims) != n:
            raise ConfigError(f"depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        mixers = list(token_mixers) if isinstance(token_mixers, Sequence) else [token_mixers] * n
        ratios = list(mlp_ratios) if isinstance(mlp_ratios, Sequence) else [mlp_ratios] * n
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.features_only = False

        stem: list[nn.Module] = [nn.Conv2d(in_chans, dims[0], kernel_size=stem_patch_size, stride=stem_patch_size)]
        if stem_norm:
            stem.append(make_norm(norm, dims[0]))
        self.stem = nn.Sequential(*stem)

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear in depth
        dp_rates = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(n)]
        stages, prev, reduction = [], dims[0], stem_patch_size
        self.feature_info: list[dict[str, Any]] = []
        for i in range(n):
            if i > 0:
                reduction *= 2
            stages.append(
                MetaNeXtStage(
                    prev,
                    dims[i],
                    depths[i],
                    mixers[i],
                    downsample=i > 0,
                    norm=norm,
                    mlp_ratio=ratios[i],
                    ls_init_value=ls_init_value,
                    drop_path_rates=dp_rates[i],
                )  # fmt: skip
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.total_stride = reduction
        self.num_features = prev
        if head == "mlp":
            self.head: nn.Module = MlpHead(prev, num_classes, head_mlp_ratio, drop_rate)
        elif head == "norm_linear":
            self.head = NormLinearHead(prev, num_classes, drop_rate)
        else:
            raise ConfigError(f"unknown head {head!r}: use 'mlp' or 'norm_linear'")
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- timm interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """LayerScale parameters; norms and biases are 1-D and excluded by the optimizer factory anyway."""
        return {name for name, _ in self.named_parameters() if name.endswith(".gamma")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_mlp_primitive(self, primitive: str) -> MetaNeXt:
        """How the block MLPs run on channels-last maps: ``"conv"`` (:class:`~inceptionnext.layers.ConvMlp`, the
        default) or ``"linear"`` (:class:`~inceptionnext.layers.LinearMlp`).

        Swaps the MLP modules in place, sharing their parameters: the state dict and the parameters an optimizer
        holds are unchanged. ``docs/speed.md`` has the measurements behind the default.
        """
        kinds = {"conv": ConvMlp, "linear": LinearMlp}
        if primitive not in kinds:
            raise ConfigError(f"primitive must be 'conv' or 'linear', got {primitive!r}")
        cls = kinds[primitive]
        replace_modules(self, lambda m: share_as(cls, m) if type(m) in (ConvMlp, LinearMlp) else None)
        return self

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self.head, self.head.classifier_name)

    def classifier_keys(self) -> tuple[str, ...]:
        """State-dict keys of the final classifier layer (re-initialised when num_classes differs)."""
        if not hasattr(self.head, "classifier_name"):  # head pruned (features-only backbone)
            return ()
        name = f"head.{self.head.classifier_name}"
        return f"{name}.weight", f"{name}.bias"

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ConfigError(f"only average pooling is supported, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head.reset(num_classes)
        self.get_classifier().apply(self._init_weights)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ConfigError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ConfigError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"build the model with in_chans={x.shape[1]} or convert the images"
            )
        if x.shape[-2] < self.total_stride or x.shape[-1] < self.total_stride:
            raise ConfigError(
                f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the network's total stride {self.total_stride}; "
                f"use images of at least {self.total_stride}x{self.total_stride}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4/8/16/32 for the 4-stage layout), timm's ``forward_intermediates`` contract."""
        if output_fmt != "NCHW":
            raise ConfigError(f"only NCHW intermediates are supported, got {output_fmt!r}")
        self._check_input(x)
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                feats.append(x)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.head = nn.Identity()
            self.num_classes = 0
        return take

    def as_features(self, out_indices: Sequence[int] | None = None) -> MetaNeXt:
        """Turn this model into a backbone that returns the stage maps in ``out_indices`` (timm ``features_only``).

        The head and stages past the last requested index are removed; the remaining keys are unchanged, so
        classification checkpoints load into the backbone.
        """
        out_indices = tuple(range(len(self.stages))) if out_indices is None else tuple(out_indices)
        take = self.prune_intermediate_layers(list(out_indices))
        self.features_only = True
        self.out_indices = tuple(take)
        self.feature_info = FeatureInfo(self.feature_info, self.out_indices)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))
