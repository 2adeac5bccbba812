"""Every model of the paper as a named variant.

Each function only declares architecture arguments of :class:`~inceptionnext.models.metanext.MetaNeXt`; the builder
(:func:`inceptionnext.create_model`) does weights, features-only mode and checkpoint remapping. Paper figures are
copied from the paper's tables as printed; eval preprocessing of the released weights follows the official code
(crop_pct 0.875 at 224, 1.0 at 384), which the paper's accuracies were measured with. timm evaluates InceptionNeXt-B
at 224 with crop_pct 0.95 instead; ``--crop-pct 0.95`` gives its setting.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..layers.mixers import InceptionDWConv2d, PartialDWConv2d, SelfAttention2d
from .pretrained import PaperFigures, PretrainedCfg
from .registry import register_model

_RELEASE = "https://github.com/sail-sg/inceptionnext/releases/download/model/"
A100 = "A100, TF32, batch 128"
RTX2080TI = "2080Ti, FP32, batch 128"


def _inception_cfg(name: str, hub: str, **kw: Any) -> PretrainedCfg:
    return PretrainedCfg(url=_RELEASE + f"{name}.pth", hf_hub_id=f"timm/{hub}", **kw)


def _inceptionnext(depths, dims, **mixer_kw) -> dict[str, Any]:
    return dict(depths=depths, dims=dims, token_mixers=partial(InceptionDWConv2d, **mixer_kw))


_T = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
_S = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
_B = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))

# ----------------------------------------------------------------------------------------------- Table 3 / 4


@register_model(
    cfg=_inception_cfg("inceptionnext_atto", "inception_next_atto.sail_in1k", recipe="Table 9, column A"),
    paper=PaperFigures(
        table="Table 4",
        params_m="4.2",
        macs_g="0.51",
        top1=75.3,
        train_throughput=2661,
        infer_throughput=9876,
        throughput_device=A100,
        train_throughput_2080ti=992,
        infer_throughput_2080ti=3595,
    ),
    tags=("table3", "table4"),
)
def inceptionnext_atto() -> dict[str, Any]:
    """InceptionNeXt-A: dims 40-320, band kernel 9, branch ratio 1/4."""
    return _inceptionnext((2, 2, 6, 2), (40, 80, 160, 320), band_kernel_size=9, branch_ratio=1 / 4)


@register_model(
    cfg=_inception_cfg("inceptionnext_tiny", "inception_next_tiny.sail_in1k", recipe="Table 9, column T"),
    paper=PaperFigures(
        table="Table 3",
        params_m="28.1",
        macs_g="4.2",
        top1=82.3,
        train_throughput=901,
        infer_throughput=2900,
        throughput_device=A100,
        train_throughput_2080ti=254,
        infer_throughput_2080ti=822,
    ),
    tags=("table3", "table4", "table8"),
)
def inceptionnext_tiny() -> dict[str, Any]:
    """InceptionNeXt-T: ConvNeXt-T's layout with Inception depthwise convolution."""
    return _inceptionnext(**_T)


@register_model(
    cfg=_inception_cfg("inceptionnext_small", "inception_next_small.sail_in1k", recipe="Table 9, column S"),
    paper=PaperFigures(
        table="Table 3",
        params_m="49.4",
        macs_g="8.4",
        top1=83.5,
        train_throughput=521,
        infer_throughput=1750,
        throughput_device=A100,
        train_throughput_2080ti=130,
        infer_throughput_2080ti=447,
    ),
    tags=("table3", "table4"),
)
def inceptionnext_small() -> dict[str, Any]:
    """InceptionNeXt-S."""
    return _inceptionnext(**_S)


@register_model(
    cfg=_inception_cfg(
        "inceptionnext_base", "inception_next_base.sail_in1k", crop_pct=0.875, recipe="Table 9, column B"
    ),
    paper=PaperFigures(
        table="Table 3",
        params_m="86.7",
        macs_g="14.9",
        top1=84.0,
        train_throughput=375,
        infer_throughput=1244,
        throughput_device=A100,
        train_throughput_2080ti=80,
        infer_throughput_2080ti=287,
    ),
    tags=("table3", "table4"),
)
def inceptionnext_base() -> dict[str, Any]:
    """InceptionNeXt-B."""
    return _inceptionnext(**_B)


@register_model(
    cfg=_inception_cfg(
        "inceptionnext_base_384",
        "inception_next_base.sail_in1k_384",
        input_size=(3, 384, 384),
        crop_pct=1.0,
        recipe="Table 9, fine-tune column",
    ),
    paper=PaperFigures(
        table="Table 4",
        params_m="87",
        macs_g="43.6",
        top1=85.2,
        train_throughput=139,
        infer_throughput=428,
        throughput_device=A100,
        train_throughput_2080ti=27,
        infer_throughput_2080ti=97,
    ),
    tags=("table4",),
)
def inceptionnext_base_384() -> dict[str, Any]:
    """InceptionNeXt-B fine-tuned at 384x384 (same architecture as base)."""
    return _inceptionnext(**_B)


# ----------------------------------------------------------------------------------------------- Table 1
# ConvNeXt-T as in the ConvNeXt paper: LayerNorm everywhere, MLP ratio 4 in every stage, final norm + linear head.


def _convnext_tiny(kernel_size: int, conv_ratio: float = 1.0) -> dict[str, Any]:
    return dict(
        **_T,
        token_mixers=partial(PartialDWConv2d, kernel_size=kernel_size, conv_ratio=conv_ratio),
        norm="layernorm",
        mlp_ratios=4,
        head="norm_linear",
    )


def _table1(url: str, *, params_m: str, macs_g: str, top1: float, train: int, infer: int, **cfg: Any) -> dict[str, Any]:
    return dict(
        cfg=PretrainedCfg(url=url, recipe="ConvNeXt-T recipe (Table 1)", **cfg),
        paper=PaperFigures(
            table="Table 1",
            params_m=params_m,
            macs_g=macs_g,
            top1=top1,
            train_throughput=train,
            infer_throughput=infer,
            throughput_device=A100,
        ),
        tags=("table1",),
    )


@register_model(
    **_table1(
        "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
        params_m="28.6",
        macs_g="4.5",
        top1=82.1,
        train=575,
        infer=2413,
        hf_hub_id="timm/convnext_tiny.fb_in1k",
    )  # fmt: skip
)
def convnext_tiny_k7() -> dict[str, Any]:
    """ConvNeXt-T, 7x7 depthwise (the ConvNeXt paper's model)."""
    return _convnext_tiny(7)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k5_1k_224_ema.pth", params_m="28.4", macs_g="4.4", top1=82.0, train=675, infer=2704
    )
)
def convnext_tiny_k5() -> dict[str, Any]:
    """ConvNeXt-T with a 5x5 depthwise convolution."""
    return _convnext_tiny(5)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k3_1k_224_ema.pth", params_m="28.3", macs_g="4.4", top1=81.5, train=798, infer=2802
    )
)
def convnext_tiny_k3() -> dict[str, Any]:
    """ConvNeXt-T with a 3x3 depthwise convolution."""
    return _convnext_tiny(3)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k3_par1_2_1k_224_ema.pth",
        params_m="28.3",
        macs_g="4.4",
        top1=81.4,
        train=818,
        infer=2740,
    )
)
def convnext_tiny_k3_par1_2() -> dict[str, Any]:
    """ConvNeXt-T, 3x3 depthwise on 1/2 of the channels."""
    return _convnext_tiny(3, 1 / 2)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k3_par3_8_1k_224_ema.pth",
        params_m="28.3",
        macs_g="4.4",
        top1=81.4,
        train=847,
        infer=2762,
    )
)
def convnext_tiny_k3_par3_8() -> dict[str, Any]:
    """ConvNeXt-T, 3x3 depthwise on 3/8 of the channels."""
    return _convnext_tiny(3, 3 / 8)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k3_par1_4_1k_224_ema.pth",
        params_m="28.3",
        macs_g="4.4",
        top1=81.3,
        train=871,
        infer=2808,
    )
)
def convnext_tiny_k3_par1_4() -> dict[str, Any]:
    """ConvNeXt-T, 3x3 depthwise on 1/4 of the channels."""
    return _convnext_tiny(3, 1 / 4)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k3_par1_8_1k_224_ema.pth",
        params_m="28.3",
        macs_g="4.4",
        top1=80.8,
        train=901,
        infer=2833,
    )
)
def convnext_tiny_k3_par1_8() -> dict[str, Any]:
    """ConvNeXt-T, 3x3 depthwise on 1/8 of the channels."""
    return _convnext_tiny(3, 1 / 8)


@register_model(
    **_table1(
        _RELEASE + "convnext_tiny_k3_par1_16_1k_224_ema.pth",
        params_m="28.3",
        macs_g="4.4",
        top1=80.1,
        train=916,
        infer=2846,
    )
)
def convnext_tiny_k3_par1_16() -> dict[str, Any]:
    """ConvNeXt-T, 3x3 depthwise on 1/16 of the channels."""
    return _convnext_tiny(3, 1 / 16)


# ----------------------------------------------------------------------------------------------- Table 5
# Isotropic layout: 16x16 patchify stem without norm, one stage at stride 16, final norm + linear head, as the
# isotropic ConvNeXt-S (ConvNeXt paper, Sec. 3.3). DeiT-S-sized: dim 384, MLP ratio 4. The isotropic ConvNeXt has
# no LayerScale (its released code sets the init to 0); the InceptionNeXt and attention variants keep LayerScale,
# the block of Table 9's recipe.


def _isotropic(depth: int, mixer: Any, norm: str, ls_init_value: float | None = 1e-6) -> dict[str, Any]:
    return dict(
        depths=(depth,), dims=(384,), token_mixers=mixer, norm=norm, mlp_ratios=4, head="norm_linear",
        stem_patch_size=16, stem_norm=False, ls_init_value=ls_init_value,
    )  # fmt: skip


def _table5(*, params_m: str, macs_g: str, top1: float, train: int, infer: int) -> dict[str, Any]:
    return dict(
        paper=PaperFigures(
            table="Table 5",
            params_m=params_m,
            macs_g=macs_g,
            top1=top1,
            train_throughput=train,
            infer_throughput=infer,
            throughput_device=RTX2080TI,
        ),
        tags=("table5",),
    )


@register_model(**_table5(params_m="22", macs_g="4.2", top1=79.7, train=310, infer=998))
def inceptionnext_small_iso() -> dict[str, Any]:
    """Isotropic InceptionNeXt-S: 18 InceptionNeXt blocks (BatchNorm) at dim 384."""
    return _isotropic(18, InceptionDWConv2d, "batchnorm")


@register_model(
    cfg=PretrainedCfg(
        url="https://dl.fbaipublicfiles.com/convnext/convnext_iso_small_1k_224_ema.pth", recipe="ConvNeXt paper"
    ),
    **_table5(params_m="22", macs_g="4.3", top1=79.7, train=270, infer=879),
)
def convnext_small_iso() -> dict[str, Any]:
    """Isotropic ConvNeXt-S: 18 ConvNeXt blocks (7x7 depthwise, LayerNorm, no LayerScale) at dim 384."""
    return _isotropic(18, partial(PartialDWConv2d, kernel_size=7), "layernorm", ls_init_value=None)


@register_model(**_table5(params_m="22", macs_g="4.6", top1=3.9, train=288, infer=816))
def metanext_attn_small_iso() -> dict[str, Any]:
    """MetaNeXt-Attn: DeiT-S's 12 x 384 (6 heads) with self-attention as the MetaNeXt token mixer."""
    return _isotropic(12, partial(SelfAttention2d, num_heads=6), "layernorm")


# ----------------------------------------------------------------------------------------------- Table 8
# Ablations of InceptionNeXt-T, one named variant per row.


def _table8(*, params_m: str, top1: float, train: int, infer: int) -> dict[str, Any]:
    """Every row of Table 8 prints 4.2 GMACs."""
    return dict(
        paper=PaperFigures(
            table="Table 8",
            params_m=params_m,
            macs_g="4.2",
            top1=top1,
            train_throughput=train,
            infer_throughput=infer,
            throughput_device=A100,
        ),
        tags=("table8",),
    )


@register_model(**_table8(params_m="28.0", top1=81.9, train=947, infer=3093))
def inceptionnext_tiny_no_horizontal() -> dict[str, Any]:
    """Table 8: horizontal band kernel (1 x k) removed."""
    return _inceptionnext(**_T, use_band_w=False)


@register_model(**_table8(params_m="28.0", top1=81.9, train=954, infer=3173))
def inceptionnext_tiny_no_vertical() -> dict[str, Any]:
    """Table 8: vertical band kernel (k x 1) removed."""
    return _inceptionnext(**_T, use_band_h=False)


@register_model(**_table8(params_m="28.0", top1=82.0, train=940, infer=3004))
def inceptionnext_tiny_no_square() -> dict[str, Any]:
    """Table 8: small square kernel (3 x 3) removed."""
    return _inceptionnext(**_T, use_square=False)


@register_model(**_table8(params_m="28.1", top1=82.1, train=903, infer=2971))
def inceptionnext_tiny_band_sequential() -> dict[str, Any]:
    """Table 8: horizontal and vertical band kernels in sequence instead of in parallel."""
    return _inceptionnext(**_T, band_sequential=True)


@register_model(**_table8(params_m="28.0", top1=82.1, train=905, infer=2946))
def inceptionnext_tiny_band7() -> dict[str, Any]:
    """Table 8: band kernel size 11 -> 7."""
    return _inceptionnext(**_T, band_kernel_size=7)


@register_model(**_table8(params_m="28.1", top1=82.1, train=904, infer=2916))
def inceptionnext_tiny_band9() -> dict[str, Any]:
    """Table 8: band kernel size 11 -> 9."""
    return _inceptionnext(**_T, band_kernel_size=9)


@register_model(**_table8(params_m="28.1", top1=82.0, train=896, infer=2895))
def inceptionnext_tiny_band13() -> dict[str, Any]:
    """Table 8: band kernel size 11 -> 13."""
    return _inceptionnext(**_T, band_kernel_size=13)


@register_model(**_table8(params_m="28.1", top1=82.2, train=834, infer=2499))
def inceptionnext_tiny_ratio1_4() -> dict[str, Any]:
    """Table 8: convolution branch ratio 1/8 -> 1/4."""
    return _inceptionnext(**_T, branch_ratio=1 / 4)


@register_model(**_table8(params_m="28.0", top1=81.8, train=936, infer=3097))
def inceptionnext_tiny_ratio1_16() -> dict[str, Any]:
    """Table 8: convolution branch ratio 1/8 -> 1/16."""
    return _inceptionnext(**_T, branch_ratio=1 / 16)


@register_model(**_table8(params_m="28.1", top1=82.4, train=721, infer=2646))
def inceptionnext_tiny_layernorm() -> dict[str, Any]:
    """Table 8: BatchNorm -> LayerNorm (stem, downsampling and blocks)."""
    return {**_inceptionnext(**_T), "norm": "layernorm"}
