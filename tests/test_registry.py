"""Registry behaviour, metadata as data, and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inceptionnext import UnknownModelError, create_model, get_entry, list_models
from inceptionnext.cli import main
from inceptionnext.models.registry import register_model

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        UnknownModelError, match=r"Unknown model 'inceptionnext_tiy'\. Did you mean: inceptionnext_tiny"
    ):
        create_model("inceptionnext_tiy")
    with pytest.raises(UnknownModelError, match="list_models"):
        create_model("resnet50")


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_model()
        def inceptionnext_tiny():
            return {}


def test_list_models_by_pattern():
    assert list_models("inceptionnext_base*") == ["inceptionnext_base", "inceptionnext_base_384"]
    assert len(list_models("convnext_tiny_k3*")) == 6
    assert list_models("nothing_*") == []


def test_released_weights_are_typed_data():
    tiny = get_entry("inceptionnext_tiny").cfg
    assert tiny.url == "https://github.com/sail-sg/inceptionnext/releases/download/model/inceptionnext_tiny.pth"
    assert tiny.hf_hub_id == "timm/inception_next_tiny.sail_in1k"
    assert (tiny.input_size, tiny.crop_pct, tiny.interpolation) == ((3, 224, 224), 0.875, "bicubic")
    b384 = get_entry("inceptionnext_base_384").cfg
    assert (b384.input_size, b384.crop_pct, b384.hf_hub_id) == (
        (3, 384, 384),
        1.0,
        "timm/inception_next_base.sail_in1k_384",
    )
    assert get_entry("inceptionnext_tiny").paper.top1 == 82.3
    assert get_entry("convnext_tiny_k3_par1_8").cfg.url.endswith("convnext_tiny_k3_par1_8_1k_224_ema.pth")
    for name in list_models():
        entry = get_entry(name)
        assert entry.description, name
        assert entry.paper.top1 is not None, name


def test_model_carries_its_pretrained_cfg():
    model = create_model("inceptionnext_base")
    assert model.pretrained_cfg["crop_pct"] == 0.95
    assert model.pretrained_cfg["architecture"] == "inceptionnext_base"


def test_readme_lists_every_model():
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in list_models() if f"`{n}`" not in readme]
    assert not missing, f"README does not mention {missing}"


def test_cli_list_and_complexity(capsys, tmp_path):
    assert main(["list", "inceptionnext_*", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "inceptionnext_base_384" in out and "inceptionnext_tiny_band7" not in out
    assert main(["complexity", "--model", "inceptionnext_a*", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "inceptionnext_atto" in out and "1/1 models equal" in out
    rows = json.loads((tmp_path / "c.json").read_text())
    assert rows[0]["name"] == "inceptionnext_atto" and rows[0]["macs_match"] is True


def test_cli_unknown_pattern(capsys):
    assert main(["complexity", "--model", "inceptionnext_tinny"]) == 2
    assert "Did you mean: inceptionnext_tiny" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "inceptionnext", "list", "convnext_small*"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("convnext_small_iso")
