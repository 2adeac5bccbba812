"""Checkpoint loading: parity with timm's independent implementation, every accepted layout, bad files."""

import io
import re
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.convnext import checkpoint_filter_fn as timm_convnext_filter

from inceptionnext import CheckpointError, create_model, load_checkpoint, remap_state_dict
from inceptionnext.checkpoint import detect_layout, extract_state_dict
from inceptionnext.models import PretrainedWeightsUnavailable, get_entry
from inceptionnext.models import pretrained as pretrained_mod


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter and BN statistic a non-trivial value (LayerScale 1e-6 would hide mixer errors)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("gamma"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.1)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.02)
    return model.eval()


def _save(sd, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    ("timm_name", "ours", "size", "suffix"),
    [
        ("inception_next_atto", "inceptionnext_atto", 224, ".pth"),
        ("inception_next_tiny", "inceptionnext_tiny", 224, ".safetensors"),
        ("inception_next_small", "inceptionnext_small", 160, ".bin"),
        ("inception_next_base", "inceptionnext_base", 160, ".pth"),
    ],
)
def test_timm_inception_next_weights_give_the_same_logits(tmp_path, timm_name, ours, size, suffix):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(timm_name))
    path = _save(ref.state_dict(), tmp_path / f"{timm_name}{suffix}")
    model = create_model(ours, checkpoint_path=path).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff <= 1e-4


def _to_original(sd):
    """timm ConvNeXt keys, or this package's ConvNeXt-variant keys, written in the original ConvNeXt code's layout
    (the released Table 1 files): the inverse of timm's documented filter, plus ``dwconv.conv`` for partial convs."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("token_mixer.conv.", "dwconv.conv.").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v.flatten(1) if "pwconv" in k and k.endswith("weight") else v
    return out


def test_convnext_tiny_original_layout_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    ref = _randomize(timm.create_model("convnext_tiny"))
    original = _to_original(ref.state_dict())
    assert "downsample_layers.1.1.weight" in original and "stages.2.8.pwconv2.weight" in original
    # the conversion is exactly undone by timm's own filter: it really is the original layout
    back = timm_convnext_filter(original, ref)
    assert back.keys() == ref.state_dict().keys()
    path = _save({"model": original}, tmp_path / "convnext_tiny_1k_224_ema.pth")  # released files wrap in "model"
    model = create_model("convnext_tiny_k7", checkpoint_path=path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-4
    # timm's own layout (Hub files of timm/convnext_tiny.*) loads too
    path = _save(ref.state_dict(), tmp_path / "model.safetensors")
    model = create_model("convnext_tiny_k7", checkpoint_path=path).eval()
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-4


def test_remap_is_a_pure_function_with_the_documented_key_map():
    w = torch.zeros(384, 96)
    sd = {
        "downsample_layers.0.0.weight": torch.zeros(96, 3, 4, 4),
        "downsample_layers.2.1.bias": torch.zeros(384),
        "stages.0.1.dwconv.weight": torch.zeros(96, 1, 3, 3),
        "stages.1.0.dwconv.conv.weight": torch.zeros(24, 1, 3, 3),
        "stages.3.2.pwconv1.weight": w,
        "stages.3.2.gamma": torch.zeros(96),
        "norm.weight": torch.zeros(768),
        "head.bias": torch.zeros(1000),
    }
    before = dict(sd)
    out = remap_state_dict(sd)
    assert sd == before and sd["stages.3.2.pwconv1.weight"].shape == (384, 96)  # input untouched
    assert sorted(out) == sorted(
        [
            "stem.0.weight",
            "stages.2.downsample.1.bias",
            "stages.0.blocks.1.token_mixer.conv.weight",
            "stages.1.blocks.0.token_mixer.conv.weight",
            "stages.3.blocks.2.mlp.fc1.weight",
            "stages.3.blocks.2.gamma",
            "head.norm.weight",
            "head.fc.bias",
        ]
    )
    assert out["stages.3.blocks.2.mlp.fc1.weight"].shape == (384, 96, 1, 1)
    native = {"stem.0.weight": torch.zeros(1)}
    assert remap_state_dict(native) == native
    assert detect_layout({"stem.weight": w, "blocks.0.dwconv.weight": w}) == "convnext_iso"


def test_partial_ratio_release_layout_loads(tmp_path):
    src = _randomize(create_model("convnext_tiny_k3_par1_4"))
    original = _to_original(src.state_dict())
    assert original["stages.0.0.dwconv.conv.weight"].shape == (24, 1, 3, 3)
    model = create_model("convnext_tiny_k3_par1_4", checkpoint_path=_save(original, tmp_path / "p.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_isotropic_convnext_release_layout_loads(tmp_path):
    src = _randomize(create_model("convnext_small_iso"))
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace("stem.0.", "stem.").replace("stages.0.blocks.", "blocks.")
        k = k.replace("token_mixer.conv.", "dwconv.").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        sd[k] = v.flatten(1) if "pwconv" in k and k.endswith("weight") else v
    model = create_model("convnext_small_iso", checkpoint_path=_save({"model": sd}, tmp_path / "iso.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_training_checkpoint_ddp_prefix_and_ema(tmp_path):
    raw = _randomize(create_model("inceptionnext_atto"))
    ema = _randomize(create_model("inceptionnext_atto", drop_rate=0.0))
    with torch.no_grad():
        ema.head.fc2.bias.fill_(3.0)
    ckpt = {
        "model": {f"module.{k}": v for k, v in raw.state_dict().items()},
        "ema": ema.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "epoch": 3,
        "config": {"model": "inceptionnext_atto"},
    }
    path = _save(ckpt, tmp_path / "last.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(create_model("inceptionnext_atto", checkpoint_path=path).eval()(x), raw(x))
        m = create_model("inceptionnext_atto", checkpoint_path=path, use_ema=True).eval()
        torch.testing.assert_close(m(x), ema(x))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        extract_state_dict({"model": raw.state_dict()}, use_ema=True)


def test_other_num_classes_reinitialises_the_head_with_a_warning(tmp_path):
    src = _randomize(create_model("inceptionnext_atto"))
    path = _save(src.state_dict(), tmp_path / "in1k.pth")
    with pytest.warns(UserWarning, match=r"head\.fc2\.weight.*re-initialised"):
        model = create_model("inceptionnext_atto", num_classes=10, checkpoint_path=path).eval()
    assert model.head.fc2.weight.shape == (10, 960)
    torch.testing.assert_close(model.head.fc1.weight, src.head.fc1.weight)
    torch.testing.assert_close(model.stages[2].blocks[3].mlp.fc2.weight, src.stages[2].blocks[3].mlp.fc2.weight)


def test_features_only_backbone_takes_a_classification_checkpoint(tmp_path):
    src = _randomize(create_model("inceptionnext_atto"))
    path = _save(src.state_dict(), tmp_path / "in1k.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = create_model("inceptionnext_atto", features_only=True, out_indices=(0, 1), checkpoint_path=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x)[1], src.forward_intermediates(x, indices=[1])[1][0])


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    src = create_model("inceptionnext_atto")
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    path = tmp_path / "truncated.pth"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch"):
        load_checkpoint(src, path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(src, tmp_path / "empty.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(src, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(src, tmp_path / "missing.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="could execute code"):
        load_checkpoint(create_model("inceptionnext_atto"), path)
    assert "this must never run" not in capsys.readouterr().out


def test_foreign_checkpoint_lists_the_keys(tmp_path):
    import torchvision

    path = _save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointError) as err:
        create_model("inceptionnext_atto", checkpoint_path=path)
    msg = str(err.value)
    assert "missing keys: stem.0.weight" in msg
    assert "unexpected keys: conv1.weight" in msg
    assert "another architecture" in msg


def test_shape_mismatch_lists_the_tensors(tmp_path):
    path = _save(create_model("inceptionnext_tiny").state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch: stages\.0\.blocks\.0\.token_mixer\.dwconv_hw\.weight"):
        create_model("inceptionnext_tiny_ratio1_4", checkpoint_path=path)


def test_pretrained_offline_names_the_file_and_how_to_pass_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_model("inceptionnext_tiny", pretrained=True)
    msg = str(err.value)
    assert "https://github.com/sail-sg/inceptionnext/releases/download/model/inceptionnext_tiny.pth" in msg
    assert "huggingface.co/timm/inception_next_tiny.sail_in1k" in msg
    assert "checkpoint_path=" in msg and "Network is unreachable" in msg
    with pytest.raises(PretrainedWeightsUnavailable, match="no pretrained weights"):
        create_model("inceptionnext_tiny_band7", pretrained=True)


def test_pretrained_uses_the_cached_release_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    src = _randomize(create_model("inceptionnext_atto"))
    cached = tmp_path / "hub" / "checkpoints" / "inceptionnext_atto.pth"
    cached.parent.mkdir(parents=True)
    torch.save(src.state_dict(), cached)
    model = create_model("inceptionnext_atto", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    # a published hash that does not match is refused
    cfg = get_entry("inceptionnext_atto").cfg
    import dataclasses

    bad = dataclasses.replace(cfg, sha256="0" * 64)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not match the published sha256"):
        pretrained_mod.fetch_pretrained("inceptionnext_atto", bad)
    good = dataclasses.replace(cfg, sha256=pretrained_mod.sha256_file(cached))
    assert pretrained_mod.fetch_pretrained("inceptionnext_atto", good) == cached


def test_timm_models_keep_their_own_keys(tmp_path):
    # a timm ConvNeXt checkpoint must not be renamed to this package's layout when loaded into timm's ConvNeXt
    src = _randomize(timm.create_model("convnext_atto", num_classes=3))
    path = _save({"model": src.state_dict(), "epoch": 0}, tmp_path / "timm_convnext.pth")
    model = timm.create_model("convnext_atto", num_classes=3)
    load_checkpoint(model, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x))
