"""Every registered variant, small inputs: shape, finiteness, gradients, layouts, checkpointing, features."""

import pytest
import torch

import inceptionnext
from inceptionnext import create_model, list_models

ALL = list_models()
FOUR_STAGE = [n for n in ALL if not n.endswith("_iso")]
SIZE = 64  # smallest size that keeps every stage at >= 2x2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _x(batch: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def test_registry_is_complete():
    # Tables 3/4, Table 1, Table 5 and the ten ablation rows of Table 8
    assert len(list_models("inceptionnext_*", tag="table3") + ["inceptionnext_base_384"]) == 5
    assert len(list_models(tag="table1")) == 8
    assert set(list_models(tag="table5")) == {
        "inceptionnext_small_iso",
        "convnext_small_iso",
        "metanext_attn_small_iso",
    }
    assert len(list_models(tag="table8")) == 11  # baseline + 10 rows


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_finite_and_gradients(name):
    # LayerScale 1 instead of 1e-6 so that a gradient of exactly zero would mean a disconnected parameter
    model = create_model(name, num_classes=7, ls_init_value=1.0).train()
    out = model(_x())
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", ALL)
def test_channels_last_equals_contiguous(name):
    model = create_model(name, ls_init_value=1.0).eval()
    x = _x()
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_grad_checkpointing_equals_plain(name):
    model = create_model(name, ls_init_value=1.0, num_classes=5).train()
    x = _x()
    out_plain = model(x)
    out_plain.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.square().sum().backward()
    torch.testing.assert_close(out_ckpt, out_plain)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ALL)
def test_features_only_matches_feature_info(name):
    model = create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(_x(1))
    assert len(feats) == len(model.feature_info.out_indices)
    for f, chs, red in zip(feats, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (1, chs, SIZE // red, SIZE // red)


def test_four_stage_strides_and_out_indices():
    model = create_model("inceptionnext_tiny", features_only=True, out_indices=(1, 3))
    assert model.feature_info.reduction() == [8, 32]
    assert model.feature_info.channels() == [192, 768]
    feats = model(_x(1))
    assert [f.shape[1] for f in feats] == [192, 768]
    full = create_model("inceptionnext_tiny")
    assert [i["reduction"] for i in full.feature_info] == [4, 8, 16, 32]


def test_forward_intermediates_and_head():
    model = create_model("inceptionnext_atto").eval()
    x = _x(1)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [40, 80, 160, 320]
        torch.testing.assert_close(final, model.forward_features(x))
        pre = model.forward_head(final, pre_logits=True)
        assert pre.shape == (1, 960)  # MLP head hidden = 3 x 320
        torch.testing.assert_close(model.get_classifier()(pre), model(x))


def test_reset_classifier_and_no_weight_decay():
    model = create_model("inceptionnext_atto")
    model.reset_classifier(3)
    assert model(_x(1)).shape == (1, 3)
    nwd = model.no_weight_decay()
    assert nwd and all(n.endswith(".gamma") for n in nwd)
    assert len(nwd) == sum(2 if i != 2 else 6 for i in range(4))  # one LayerScale per block: 2+2+6+2
    groups = model.group_matcher()
    assert groups["stem"] == r"^stem"


def test_drop_path_is_linear_in_depth():
    model = create_model("inceptionnext_tiny", drop_path_rate=0.1)
    rates = [
        b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for s in model.stages for b in s.blocks
    ]
    assert len(rates) == 18
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.1)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert max(steps) == pytest.approx(min(steps))


def test_wrong_input_channels_is_a_clear_error():
    model = create_model("inceptionnext_atto")
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1.*in_chans=1"):
        model(torch.randn(1, 1, 64, 64))
    assert create_model("inceptionnext_atto", in_chans=1)(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_image_too_small_is_a_clear_error():
    model = create_model("inceptionnext_atto")
    with pytest.raises(ValueError, match=r"16x16 is smaller than the network's total stride 32"):
        model(torch.randn(1, 3, 16, 16))
    iso = create_model("convnext_small_iso")
    with pytest.raises(ValueError, match="total stride 16"):
        iso(torch.randn(1, 3, 8, 64))


def test_unbatched_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        create_model("inceptionnext_atto")(torch.randn(3, 64, 64))


def test_timm_create_model_builds_the_same_model():
    import timm

    assert "inceptionnext_tiny" in timm.list_models("inceptionnext_*")
    torch.manual_seed(0)
    ours = create_model("inceptionnext_atto").eval()
    torch.manual_seed(0)
    via_timm = timm.create_model("inceptionnext_atto").eval()
    assert type(via_timm) is inceptionnext.MetaNeXt
    x = _x(1)
    with torch.no_grad():
        torch.testing.assert_close(via_timm(x), ours(x))
    feats = timm.create_model("inceptionnext_atto", features_only=True, out_indices=(0, 2))
    assert feats.feature_info.channels() == [40, 160]
    # names timm already owns are not overridden
    assert type(timm.create_model("convnext_atto")).__module__.startswith("timm.")


def test_fused_mixer_is_opt_in_with_the_same_keys_and_numbers():
    """The Triton mixer is used only when asked for; it changes neither checkpoint keys nor (off GPU) outputs."""
    from inceptionnext.layers import InceptionDWConv2d, TritonInceptionDWConv2d

    default = create_model("inceptionnext_atto").eval()
    mixers = [m for m in default.modules() if isinstance(m, InceptionDWConv2d)]
    assert mixers and all(type(m) is InceptionDWConv2d for m in mixers)
    fused = create_model("inceptionnext_atto", fused_mixer=True).eval()
    assert all(type(m) is TritonInceptionDWConv2d for m in fused.modules() if isinstance(m, InceptionDWConv2d))
    assert fused.state_dict().keys() == default.state_dict().keys()
    fused.load_state_dict(default.state_dict())
    x = _x(1)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), default(x), rtol=0, atol=0)
