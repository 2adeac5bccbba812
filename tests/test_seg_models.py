"""Segmentors of Sec. 4.2: parameter counts and MACs against Tables 6-7, output contract, backbone loading, Table 10's
stochastic depth, and the backbone as a segmentation_models_pytorch encoder."""

import functools
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

import inceptionnext
from inceptionnext.complexity import as_printed, count_macs, count_params
from inceptionnext.segmentation.heads import FCNHead, FPNHead, FPNNeck, UPerHead
from inceptionnext.segmentation.segmentor import DROP_PATH_SEG, PAPER_SEG, Segmentor, create_segmentor

PAIRS = list(PAPER_SEG)


def _meta_segmentor(head: str, backbone: str, **kwargs) -> Segmentor:
    with torch.device("meta"):
        return create_segmentor(head, backbone, **kwargs)


@functools.cache
def _default_meta_segmentor(head: str, backbone: str) -> Segmentor:
    """Shared by the read-only tests below (building S/B takes ~1 s each even on the meta device)."""
    return _meta_segmentor(head, backbone)


def _rounded(value: float, printed: str) -> str:
    """The segmentation MACs are printed with 4 significant digits (1020, 1159), which fvcore's 3-digit display
    (:func:`as_printed`) cannot produce; they compare as the GMACs rounded half-up to the printed decimals."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


# counted with stage_norm="batchnorm", BN in the FPN head; recorded so that a change to the layout shows up
COUNTED = {
    ("upernet", "inceptionnext_tiny"): (56_398_340, 933.231),
    ("upernet", "inceptionnext_small"): (77_716_676, 1020.370),
    ("upernet", "inceptionnext_base"): (114_982_732, 1159.019),
    ("fpn", "inceptionnext_tiny"): (28_350_318, 43.587),
    ("fpn", "inceptionnext_small"): (49_668_654, 65.372),
    ("fpn", "inceptionnext_base"): (84_944_054, 99.513),
}


@pytest.mark.parametrize(("head", "backbone"), PAIRS)
def test_params_and_macs_equal_tables_6_and_7(head, backbone):
    paper = PAPER_SEG[head, backbone]
    model = _default_meta_segmentor(head, backbone)
    params = count_params(model)
    assert as_printed(params / 1e6, paper["params_m"]) == paper["params_m"], f"{params / 1e6:.3f}M"
    macs = count_macs(model, (3, *paper["input"])) / 1e9  # eval mode: the auxiliary head does not run
    assert _rounded(macs, paper["macs_g"]) == paper["macs_g"], f"{macs:.3f}G"
    assert (params, round(macs, 3)) == COUNTED[head, backbone]


@pytest.mark.parametrize("backbone", ["inceptionnext_small", "inceptionnext_base"])
def test_table6_counts_include_the_auxiliary_head(backbone):
    # without the FCN head UperNet-S/B count 76.79/113.76M, printed 77/114 instead of Table 6's 78/115 (with it:
    # 77.72/114.98M). T does not decide: 55.47M without it is shown as 55.5 and rounds to 56 as well.
    printed = PAPER_SEG["upernet", backbone]["params_m"]
    model = _default_meta_segmentor("upernet", backbone)
    without_aux = count_params(model) - count_params(model.aux_head)
    assert as_printed(without_aux / 1e6, printed) != printed


def test_stage_norm_and_fpn_norm_do_not_change_the_printed_figures():
    for kwargs in (dict(stage_norm=None), dict(stage_norm="layernorm")):
        model = _meta_segmentor("upernet", "inceptionnext_tiny", **kwargs)
        assert as_printed(count_params(model) / 1e6, "56") == "56"
        assert _rounded(count_macs(model, (3, 512, 2048)) / 1e9, "933") == "933"
    gn = _meta_segmentor("fpn", "inceptionnext_tiny", fpn_norm="groupnorm")
    bn = _meta_segmentor("fpn", "inceptionnext_tiny")
    assert count_params(gn) == count_params(bn)  # both norms have 2 parameters per channel
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32 for m in gn.modules()) == 7
    assert _rounded(count_macs(gn, (3, 512, 512)) / 1e9, "44") == "44"


def test_aux_defaults_and_fpn_head_layout():
    assert _meta_segmentor("upernet", "inceptionnext_atto").aux_head is not None
    fpn = _meta_segmentor("fpn", "inceptionnext_atto")
    assert fpn.aux_head is None and fpn.aux is False
    # Semantic FPN: 1, 1, 2, 3 conv blocks for strides 4, 8, 16, 32
    assert [len(h.blocks) for h in fpn.decode_head.scale_heads] == [1, 1, 2, 3]
    assert [h.upsample for h in fpn.decode_head.scale_heads] == [False, True, True, True]
    up = _meta_segmentor("upernet", "inceptionnext_atto", aux=False)
    assert up.aux_head is None
    assert Segmentor.aux_weight == 0.4 and Segmentor.ignore_index == 255


def test_convs_before_norms_have_no_bias_and_classifiers_do():
    model = _meta_segmentor("upernet", "inceptionnext_tiny")
    head = model.decode_head
    assert head.bottleneck.conv.bias is None and head.fpn_bottleneck.conv.bias is None
    assert all(c.conv.bias is None for c in [*head.lateral_convs, *head.fpn_convs])
    assert head.cls.conv_seg.bias is not None and model.aux_head.cls.conv_seg.bias is not None
    assert model.aux_head.convs[0].conv.in_channels == 384  # stride-16 map of InceptionNeXt-T
    assert head.bottleneck.conv.in_channels == 768 + 4 * 512 and head.fpn_bottleneck.conv.in_channels == 4 * 512


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_output_shapes_and_gradients(head):
    torch.manual_seed(0)
    model = Segmentor("inceptionnext_atto", head, num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["out"].shape == (2, 5, 16, 16)
    if head == "upernet":
        assert out["aux"].shape == (2, 5, 4, 4)
    else:
        assert "aux" not in out
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    stem = model.backbone.stem[0].weight.grad
    assert stem is not None and stem.abs().sum() > 0
    if head == "upernet":
        assert model.aux_head.cls.conv_seg.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        assert set(model(x)) == {"out"}
        assert model.predict(x).shape == (2, 5, 64, 64)
        # sizes not divisible by 32 still give logits at the input's size
        assert model.predict(torch.randn(1, 3, 72, 100)).shape == (1, 5, 72, 100)


def test_heads_standalone():
    feats = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((8, 16, 32, 64))]
    assert UPerHead([8, 16, 32, 64], 3, channels=16).eval()(feats).shape == (2, 3, 32, 32)
    assert FCNHead(32, 3, channels=8).eval()(feats[2]).shape == (2, 3, 8, 8)
    neck = FPNNeck([8, 16, 32, 64], out_channels=32)
    outs = neck(feats)
    assert [o.shape[1] for o in outs] == [32] * 4 and [o.shape[-1] for o in outs] == [32, 16, 8, 4]
    assert FPNHead([32] * 4, [4, 8, 16, 32], 3, channels=32).eval()(outs).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        Segmentor("inceptionnext_atto", "deeplab")


def test_backbone_loads_a_classification_checkpoint(tmp_path):
    torch.manual_seed(1)
    classifier = inceptionnext.create_model("inceptionnext_atto")
    path = tmp_path / "atto.pth"
    torch.save(classifier.state_dict(), path)
    model = Segmentor("inceptionnext_atto", "upernet", num_classes=5, backbone_checkpoint=str(path))
    own = model.backbone.state_dict()
    src = classifier.state_dict()
    assert own and all(torch.equal(v, src[k]) for k, v in own.items())
    assert not any(k.startswith("head.") for k in own)


@pytest.mark.parametrize(("head", "backbone"), PAIRS)
def test_table10_drop_path_lands_in_the_backbone(head, backbone):
    last = _default_meta_segmentor(head, backbone).backbone.stages[-1].blocks[-1].drop_path
    assert last.drop_prob == pytest.approx(DROP_PATH_SEG[head, backbone])


def test_an_explicit_drop_path_rate_wins_over_table10():
    model = _meta_segmentor("upernet", "inceptionnext_tiny", drop_path_rate=0.05)
    assert model.backbone.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.05)
    model = _meta_segmentor("upernet", "inceptionnext_tiny", drop_path_rate=0.0)
    assert isinstance(model.backbone.stages[-1].blocks[-1].drop_path, torch.nn.Identity)


@pytest.mark.parametrize("arch", ["Unet", "FPN"])
def test_smp_uses_the_backbone_as_a_timm_universal_encoder(arch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = getattr(smp, arch)("tu-inceptionnext_atto", encoder_weights=None, classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_the_head_layout_reproduces_table6_convnext_tiny_row_too():
    # an independent check of UperNet's layout: timm's ConvNeXt-T with a LayerNorm per stage output (its mmseg setup)
    pytest.importorskip("timm")
    model = _meta_segmentor("upernet", "convnext_tiny", stage_norm="layernorm")
    assert as_printed(count_params(model) / 1e6, "60") == "60"
    assert _rounded(count_macs(model, (3, 512, 2048)) / 1e9, "939") == "939"
