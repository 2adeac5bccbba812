"""The engine core carries a new task: a toy classifier on random tensors, written as a task would be (model, data,
loss, metric loop, nothing else), gets atomic checkpoints, bit-identical resume after a hard kill, the NaN stop,
metrics.csv, curves and summary from :class:`~inceptionnext.engine.run.TrainingRun`.

Run as a script (``python tests/test_engine_core.py OUTPUT [--epochs N] [--poison-epoch E] [--resume PATH]``) it
trains the toy task in a fresh process, which is how the kill/resume test launches it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from inceptionnext.engine.run import FAULT_ENV, NonFiniteLossError, TrainingRun, launch


@dataclass
class ToyConfig:
    output: str
    epochs: int = 3
    seed: int = 0
    amp: str = "fp32"
    lr: float = 0.1
    poison_epoch: int = -1  # from this epoch (0-based) on, the loss is NaN
    log_interval: int = 1  # unused: a runtime key, which a resume may change

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ToyRun(TrainingRun):
    """Four-class linear classification of 8-dim Gaussian blobs, with dropout so that resume must restore the RNG."""

    task = "toy"
    best_key = "val_acc"

    def build(self) -> None:
        g = torch.Generator().manual_seed(1234)
        centers = torch.randn(4, 8, generator=g) * 2
        y = torch.arange(96) % 4
        x = centers[y] + torch.randn(96, 8, generator=g)
        self.train_loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8, shuffle=True)
        self.val_data = (x[64:], y[64:])
        self.wrap(nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 4)))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=0.9)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.ddp.train()
        for x, y in self.train_loader:
            with self.autocast():
                loss = nn.functional.cross_entropy(self.ddp(x), y)
            if epoch >= self.cfg.poison_epoch >= 0:
                loss = loss * float("nan")
            self.backward(loss)
            self.optimizer_step()
        return {"train_loss": self.running_loss.mean()}

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        x, y = self.val_data
        logits = self.model(x)
        return {
            "val_loss": nn.functional.cross_entropy(logits, y).item(),
            "val_acc": 100.0 * (logits.argmax(1) == y).float().mean().item(),
        }


def train_toy(cfg: ToyConfig, *, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    return launch(ToyRun, cfg, resume=resume)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _run_script(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, __file__, str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_a_toy_task_gets_checkpoints_metrics_curves_and_summary(tmp_path):
    out = tmp_path / "toy"
    summary = train_toy(ToyConfig(str(out)))
    for f in ("last.pth", "best.pth", "metrics.csv", "curves.png", "config.yaml", "summary.json", "log.txt"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_acc", "epoch_time_s"]
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "best", "rng", "config", "git"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 3 * 8 and ckpt["config"]["lr"] == 0.1
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert summary["best"] == {"val_acc": float(best["val_acc"]), "epoch": int(best["epoch"])}
    assert torch.load(out / "best.pth", weights_only=True)["epoch"] == int(best["epoch"]) - 1
    assert json.loads((out / "summary.json").read_text())["last"]["epoch"] == 3
    assert "git" in (out / "config.yaml").read_text()
    # a finished run in the same folder resumes, has nothing left to do and changes nothing
    before = _weights(out / "last.pth")
    train_toy(ToyConfig(str(out)))
    assert "resumed from" in (out / "log.txt").read_text()
    for k, v in _weights(out / "last.pth").items():
        assert torch.equal(v, before[k]), k


def test_a_toy_task_killed_mid_run_resumes_bit_identically(tmp_path):
    full = _run_script(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run_script(tmp_path / "cut", env={FAULT_ENV: "12"})  # 8 steps per epoch: killed inside epoch 2
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["epoch"] == 0
    moved = _run_script(tmp_path / "moved", "--resume", str(tmp_path / "cut" / "last.pth"))  # from another folder
    assert moved.returncode == 0, moved.stderr[-2000:]
    resumed = _run_script(tmp_path / "cut")  # its own last.pth
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = _weights(tmp_path / "full" / "last.pth")
    for run in ("cut", "moved"):
        b = _weights(tmp_path / run / "last.pth")
        for k in a:
            assert torch.equal(b[k], a[k]), (run, k)
    rows = list(csv.DictReader((tmp_path / "cut" / "metrics.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_a_toy_task_stops_on_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as info:
        train_toy(ToyConfig(str(out), poison_epoch=1))
    assert "NaN/inf in epoch 2 (around optimizer step 16)" in str(info.value)
    assert f"the last good checkpoint is {out / 'last.pth'} (epoch 0)" in str(info.value)
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["epoch"] for r in csv.DictReader((out / "metrics.csv").read_text().splitlines())] == ["1"]


def test_a_nan_before_any_checkpoint_says_so(tmp_path):
    out = tmp_path / "nan0"
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        train_toy(ToyConfig(str(out), poison_epoch=0))
    assert not (out / "last.pth").exists()


def test_metrics_rows_stay_aligned_with_the_files_columns(tmp_path):
    """A resumed run appends under the header already on disk (written, say, by an older version with an extra
    column), and a new column rewrites the file under the union instead of shifting values."""
    from inceptionnext.engine.report import MetricsLog

    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss\n1,3,0.5\n2,6,0.25\n")
    log = MetricsLog(tmp_path, x="step")
    log.truncate_after(3)
    log.append({"step": 6, "train_loss": 0.125})
    log.append({"step": 9, "train_loss": 0.0625, "mIoU": 40.0})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train_loss,mIoU",
        "1,3,0.5,",
        ",6,0.125,",
        ",9,0.0625,40",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--poison-epoch", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    train_toy(ToyConfig(args.output, epochs=args.epochs, poison_epoch=args.poison_epoch), resume=args.resume)


def _average_bn_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from inceptionnext.engine.ema import average_bn_statistics

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.running_mean.fill_(float(rank + 1))  # 1 and 2
            bn.running_var.fill_(float(4 * rank + 2))  # 2 and 6
        average_bn_statistics([bn])
        torch.save({"mean": bn.running_mean, "var": bn.running_var}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bn_statistics_are_averaged_over_processes(tmp_path):
    """After an epoch each DDP process holds the statistics of its own last batch; averaged (timm's --dist-bn
    reduce), both processes evaluate and save the same model. Two gloo processes."""
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(_average_bn_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(got["mean"], torch.full((3,), 1.5)) and torch.equal(got["var"], torch.full((3,), 4.0))
