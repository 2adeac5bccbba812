"""Params and MACs against the paper's printed figures, fvcore as an independent counter, Table 2, Figure 3."""

import pytest
import torch

from inceptionnext import complexity as cx
from inceptionnext import create_model, get_entry, list_models

WITH_PAPER = [n for n in list_models() if get_entry(n).paper is not None]


def test_every_variant_has_the_papers_figures():
    assert set(WITH_PAPER) == set(list_models())


@pytest.mark.parametrize("name", WITH_PAPER)
def test_params_and_macs_equal_the_paper_at_printed_precision(name):
    row = cx.complexity_row(name)
    paper = get_entry(name).paper
    assert row.params_match, f"{name}: {row.params / 1e6:.3f}M params vs paper {paper.params_m}M"
    assert row.macs_match, f"{name}: {row.macs / 1e9:.4f}G MACs vs paper {paper.macs_g}G"


@pytest.mark.parametrize(
    ("name", "params", "macs"),
    [
        ("inceptionnext_atto", "4.2", "0.51"),
        ("inceptionnext_tiny", "28.1", "4.2"),
        ("inceptionnext_small", "49.4", "8.4"),
        ("inceptionnext_base", "86.7", "14.9"),
        ("inceptionnext_base_384", "86.7", "43.6"),
        ("convnext_tiny_k7", "28.6", "4.5"),
    ],
)
def test_headline_figures(name, params, macs):
    # written out here as well, so a wrong entry in the variant table cannot pass silently
    row = cx.complexity_row(name)
    assert cx.as_printed(row.params / 1e6, params) == params
    assert cx.as_printed(row.macs / 1e9, macs) == macs


def test_as_printed_follows_fvcore_display_then_rounding():
    assert cx.as_printed(0.50492, "0.51") == "0.51"  # fvcore shows 0.505G
    assert cx.as_printed(0.50492, "0.5") == "0.5"
    assert cx.as_printed(43.636, "43.6") == "43.6"
    assert cx.as_printed(28.046, "28.0") == "28.0"
    assert cx.as_printed(22.309, "22") == "22"
    assert cx.as_printed(4.444, "4.5") == "4.4"
    assert cx.as_printed(4.449, "4.5") == "4.5"  # shown as 4.45, then rounded half-up


@pytest.mark.parametrize("name", ["inceptionnext_atto", "convnext_tiny_k3_par1_4", "inceptionnext_small_iso"])
def test_mac_counter_agrees_with_fvcore(name):
    fvcore_nn = pytest.importorskip("fvcore.nn")
    model = create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    flops = fvcore_nn.FlopCountAnalysis(model, x)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    assert cx.count_macs(model) == flops.total()


def test_attention_matmuls_are_counted():
    # fvcore (2022) does not see torch's fused attention: the difference must be exactly q @ k^T and attn @ v
    fvcore_nn = pytest.importorskip("fvcore.nn")
    model = create_model("metanext_attn_small_iso").eval()
    flops = fvcore_nn.FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
    flops.unsupported_ops_warnings(False)
    n, c, blocks = (224 // 16) ** 2, 384, 12
    assert cx.count_macs(model) - flops.total() == blocks * 2 * n * n * c


def test_table2_formulas_hold_on_real_modules():
    rows = cx.table2_check(kernel_sizes=(3, 7, 11, 31), channels=64, hw=14)
    assert all(r.ok for r in rows)
    r11 = rows[2]
    assert r11.inception_params == (2 * 11 + 9) * 64 // 8
    assert r11.dw_params == 11 * 11 * 64


def test_inceptionnext_blocks_follow_table2():
    # the mixer weights of a whole InceptionNeXt-T equal sum over blocks of (2k+9)C/8
    model = create_model("inceptionnext_tiny")
    counted = sum(p.numel() for n, p in model.named_parameters() if "token_mixer" in n and n.endswith("weight"))
    expected = sum(cx.inception_dwconv_params(11, c) * d for c, d in zip((96, 192, 384, 768), (3, 3, 9, 3)))
    assert counted == expected


def test_figure3_is_written(tmp_path):
    rows = cx.table2_check(kernel_sizes=(3, 5, 7))
    path = cx.plot_figure3(rows, tmp_path / "fig3.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
