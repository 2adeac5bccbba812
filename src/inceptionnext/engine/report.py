"""Per-epoch metrics: CSV (always), TensorBoard (when installed), and a PNG of the curves."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_curves"]


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv``; mirrors scalars to TensorBoard if it can be imported."""

    def __init__(self, output: Path, enabled: bool = True) -> None:
        self.path = output / "metrics.csv"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, value: int, column: str = "epoch") -> None:
        """On resume, drop rows (of epochs or steps) that the restored checkpoint does not include."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in self.rows() if int(r[column]) <= value]
        fields = list(rows[0]) if rows else None
        with open(self.path, "w", newline="") as f:
            if fields:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(csv_path: Path, png_path: Path) -> Path | None:
    """Loss (train, val) and top-1 (raw, EMA) against epoch. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves plot (pip install 'inceptionnext[plot]')", stacklevel=2)
        return None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def col(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name) not in (None, "")]

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    ax1.plot(epochs, col("train_loss"), label="train loss (as optimised)")
    ax1.plot(epochs, col("val_loss"), label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, col("val_top1"), label="top-1")
    if col("ema_top1"):
        ax2.plot(epochs, col("ema_top1"), label="top-1 (EMA)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val accuracy (%)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
