"""Parameters and MACs counted the way the paper prints them, Table 2's formulas, and Figure 3.

MAC convention (docs/complexity.md has the details):
    * convolutions, linear layers and matrix products (the attention of MetaNeXt-Attn included): one MAC per
      multiply-accumulate;
    * normalisation layers: BatchNorm (eval, affine) 2 per element, LayerNorm (affine) 5 per element;
    * activations, pooling, residual additions and the LayerScale product are free.
This is fvcore's ``FlopCountAnalysis`` convention, the counter of the authors' code bases (we check it against
fvcore in the tests). fvcore's tables print 3 significant digits, and the paper's figures are those, rounded to
the printed precision: InceptionNeXt-A counts 0.50492 GMACs, which fvcore shows as "0.505G" and Table 4 prints
as "0.51" (Table 3: "0.5"). :meth:`ComplexityRow.macs_match` compares the same way.
Counting runs on the ``meta`` device: no memory is allocated and nothing is computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .layers.mixers import InceptionDWConv2d, PartialDWConv2d
from .models.factory import create_model
from .models.registry import get_entry, list_models

__all__ = [
    "count_params",
    "count_macs",
    "ComplexityRow",
    "complexity_table",
    "format_table",
    "table2_check",
    "plot_figure3",
]

_PER_ELEMENT = ((nn.BatchNorm2d, 2), (LayerNorm2d, 5), (nn.LayerNorm, 5))


def count_params(model: nn.Module) -> int:
    """Learnable parameters (buffers such as BatchNorm running statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> int:
    """MACs of one forward pass of one image, in the convention of this module's docstring."""
    device = next(model.parameters()).device
    x = torch.empty(1, *input_size, device=device)
    elementwise = 0

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal elementwise
        for cls, charge in _PER_ELEMENT:
            if isinstance(mod, cls):
                elementwise += charge * output.numel()
                return

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, tuple(c for c, _ in _PER_ELEMENT))
    ]
    was_training = model.training
    model.eval()
    try:
        # the math attention backend runs as matmuls, which the counter sees on every device
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter.get_total_flops() // 2 + elementwise


def as_printed(value: float, printed: str) -> str:
    """``value`` as the paper would print it: fvcore's 3 significant digits, then rounded half-up to the number of
    decimals of ``printed``."""
    shown = Decimal(f"{value:.3g}")
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return str(shown.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


@dataclass(frozen=True, kw_only=True)
class ComplexityRow:
    name: str
    resolution: int
    params: int
    macs: int
    paper_table: str | None
    paper_params: str | None
    paper_macs: str | None

    @staticmethod
    def _matches(value: float, printed: str | None) -> bool | None:
        return None if printed is None else as_printed(value, printed) == printed

    @property
    def params_match(self) -> bool | None:
        return self._matches(self.params / 1e6, self.paper_params)

    @property
    def macs_match(self) -> bool | None:
        return self._matches(self.macs / 1e9, self.paper_macs)


def complexity_row(name: str) -> ComplexityRow:
    entry = get_entry(name)
    with torch.device("meta"):
        model = create_model(name)
    paper = entry.paper
    return ComplexityRow(
        name=name,
        resolution=entry.cfg.input_size[-1],
        params=count_params(model),
        macs=count_macs(model, entry.cfg.input_size),
        paper_table=paper.table if paper else None,
        paper_params=paper.params_m if paper else None,
        paper_macs=paper.macs_g if paper else None,
    )


def complexity_table(pattern: str | None = None, progress: bool = False) -> list[ComplexityRow]:
    names = list_models(pattern)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="counting", unit="model", leave=False)
    return [complexity_row(n) for n in names]


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "DIFF")


def format_table(rows: Iterable[ComplexityRow]) -> str:
    header = ("model", "res", "params (M)", "paper", "", "MACs (G)", "paper", "", "table")
    lines = [
        (
            r.name,
            str(r.resolution),
            f"{r.params / 1e6:.3f}",
            r.paper_params or "-",
            _mark(r.params_match),
            f"{r.macs / 1e9:.3f}",
            r.paper_macs or "-",
            _mark(r.macs_match),
            r.paper_table or "-",
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- Table 2, Figure 3


def dwconv_params(k: int, channels: int) -> int:
    """Table 2, depthwise conv: k^2 C (bias omitted)."""
    return k * k * channels


def inception_dwconv_params(k: int, channels: int) -> float:
    """Table 2, Inception depthwise conv: (2k + 9) C / 8 (square kernel 3, branch ratio 1/8, bias omitted)."""
    return (2 * k + 9) * channels / 8


def _weights_and_flops(module: nn.Module, channels: int, hw: int) -> tuple[int, int]:
    weights = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        module.to("meta")(torch.empty(1, channels, hw, hw, device="meta"))
    return weights, counter.get_total_flops()


@dataclass(frozen=True, kw_only=True)
class Table2Row:
    k: int
    channels: int
    hw: int
    dw_params: int
    dw_flops: int
    inception_params: int
    inception_flops: int

    @property
    def ok(self) -> bool:
        c, hw2 = self.channels, self.hw * self.hw
        return (
            self.dw_params == dwconv_params(self.k, c)
            and self.dw_flops == 2 * self.k**2 * c * hw2
            and self.inception_params == inception_dwconv_params(self.k, c)
            and self.inception_flops == (2 * self.k + 9) * c * hw2 / 4
        )


def table2_check(kernel_sizes: Iterable[int] = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
                 channels: int = 96, hw: int = 56) -> list[Table2Row]:  # fmt: skip
    """Count parameters (weights) and FLOPs of real modules and compare them with Table 2's formulas.

    Defaults are stage 1 of InceptionNeXt-T (96 channels at 56x56).
    """
    rows = []
    for k in kernel_sizes:
        dw = PartialDWConv2d(channels, kernel_size=k)
        inc = InceptionDWConv2d(channels, square_kernel_size=3, band_kernel_size=k, branch_ratio=1 / 8)
        dw_params, dw_flops = _weights_and_flops(dw, channels, hw)
        inception_params, inception_flops = _weights_and_flops(inc, channels, hw)
        rows.append(
            Table2Row(
                k=k, channels=channels, hw=hw, dw_params=dw_params, dw_flops=dw_flops,
                inception_params=inception_params, inception_flops=inception_flops,
            )
        )  # fmt: skip
    return rows


def format_table2(rows: Iterable[Table2Row]) -> str:
    lines = ["k   DW params  (k^2 C)   DW MFLOPs  Inception params  ((2k+9)C/8)  Inception MFLOPs  formula"]
    for r in rows:
        lines.append(
            f"{r.k:<3d} {r.dw_params:>9d}  {dwconv_params(r.k, r.channels):>9d}   {r.dw_flops / 1e6:>9.2f}  "
            f"{r.inception_params:>16d}  {inception_dwconv_params(r.k, r.channels):>12.0f}  "
            f"{r.inception_flops / 1e6:>16.2f}  {'ok' if r.ok else 'DIFF'}"
        )
    return "\n".join(lines)


def plot_figure3(rows: list[Table2Row], path: str | Path) -> Path:
    """Figure 3: FLOPs of depthwise vs. Inception depthwise convolution against kernel size (measured points,
    Table 2 formulas as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r.k for r in rows]
    c, hw = rows[0].channels, rows[0].hw
    dense = [k / 10 + ks[0] for k in range(int((ks[-1] - ks[0]) * 10) + 1)]
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=150)
    ax.plot(dense, [2 * k * k * c * hw * hw / 1e9 for k in dense], color="tab:blue", lw=1.5,
            label=r"depthwise conv, $2k^2CHW$")  # fmt: skip
    ax.plot(dense, [(2 * k + 9) * c * hw * hw / 4 / 1e9 for k in dense], color="tab:red", lw=1.5,
            label=r"Inception depthwise conv, $(2k+9)CHW/4$")  # fmt: skip
    ax.scatter(ks, [r.dw_flops / 1e9 for r in rows], color="tab:blue", s=14, zorder=3, label="counted on modules")
    ax.scatter(ks, [r.inception_flops / 1e9 for r in rows], color="tab:red", s=14, zorder=3)
    ax.set_xlabel("kernel size k")
    ax.set_ylabel("GFLOPs")
    ax.set_yscale("log")
    ax.set_title(f"Figure 3: C={c}, H=W={hw}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
