"""Metrics of a run: a CSV row per evaluation (always), TensorBoard (when installed), and a PNG of the curves.

Rows are keyed on a column the task chooses: ``epoch`` for classification, ``step`` for runs counted in optimizer
steps (segmentation). TensorBoard, resume truncation and the plot's x axis all use that column.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Curve", "MetricsLog", "Panel", "plot_curves"]

#: one line of a plot: (CSV column, legend label)
Curve = tuple[str, str]
#: one subplot: (y-axis label, its lines)
Panel = tuple[str, Sequence[Curve]]

_LOSS_PANELS: tuple[Panel, ...] = (("loss", (("train_loss", "train loss"), ("val_loss", "val loss"))),)


class MetricsLog:
    """Appends one row per evaluation to ``metrics.csv``; mirrors scalars to TensorBoard if it can be imported."""

    def __init__(self, output: Path, enabled: bool = True, x: str = "epoch") -> None:
        self.path = Path(output) / "metrics.csv"
        self.enabled = enabled
        self.x = x
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output) / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _header(self) -> list[str] | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with open(self.path, newline="") as f:
            return next(csv.reader(f), None)

    def truncate_after(self, value: int) -> None:
        """On resume, drop the rows past ``value`` (of the x column) that the restored checkpoint does not include."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in self.rows() if int(r[self.x]) <= value]
        fields = list(rows[0]) if rows else None
        with open(self.path, "w", newline="") as f:
            if fields:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        fields = self._header()
        if fields is None:
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerow(values)
        elif set(row) <= set(fields):
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(values)
        else:  # a column the file lacks (a resumed run written by another version): rewrite under the union
            rows = self.rows()
            fields += [k for k in row if k not in fields]
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows([*rows, values])
        if self.tb is not None:
            for k, v in row.items():
                if k != self.x and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row[self.x])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(
    csv_path: Path, png_path: Path, panels: Sequence[Panel] = _LOSS_PANELS, x: str = "epoch"
) -> Path | None:
    """One subplot per panel, each column of a panel against ``x``; a column with no values (EMA off) is skipped.

    Returns None (with a warning) when matplotlib is missing, or when the CSV has no rows.
    """
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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), dpi=120, squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels):
        for column, label in curves:
            points = [(int(r[x]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
            if points:
                ax.plot(*zip(*points), label=label)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
