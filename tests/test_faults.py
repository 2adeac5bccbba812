"""The engine fails safely (issue 11, the fault probe): a kill at any instant, a full disk, NaN weights or evaluations,
a changed config on resume, a file given as ``--output``, and a process of a torchrun launch that dies, hangs or
cannot read its data all end in a clear error or a correct result, with nothing lost.

Most cases use the toy task of ``test_engine_core.py`` (fast); the NaN-at-the-last-step cases and the CLI messages
use the real classification and segmentation tasks. Run as a script (``python tests/test_faults.py OUTPUT
[--epochs N] [--fail-build-rank R]``), it trains the toy task in a fresh process, under torchrun too, and prints a
:class:`~inceptionnext.errors.UserError` as the CLI does.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import free_port
from inceptionnext.data import DataError
from inceptionnext.engine.checkpointing import CheckpointWriteError
from inceptionnext.engine.run import (
    FAULT_ENV,
    FAULT_RANK_ENV,
    FAULT_SAVE_ENV,
    NonFiniteLossError,
    PeerFailedError,
    launch,
)
from inceptionnext.engine.runtime import DIST_TIMEOUT_ENV, dist_timeout
from inceptionnext.errors import ConfigError, UserError
from test_engine_core import ToyConfig, ToyRun, train_toy

CORE_SCRIPT = Path(__file__).with_name("test_engine_core.py")


def _toy(out: Path, *args: str, env: dict | None = None, script: Path = CORE_SCRIPT) -> subprocess.CompletedProcess:
    """The toy task in a fresh process (``test_engine_core.py`` as a script), as a user's ``train`` would run."""
    return subprocess.run(
        [sys.executable, str(script), str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _rows(out: Path, x: str = "epoch") -> list[str]:
    return [r[x] for r in csv.DictReader((out / "metrics.csv").read_text().splitlines())]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- kills and full disks
def test_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path):
    """Killed while writing best.pth (last.pth already records the new best): the next start re-writes best.pth from
    last.pth, so best.pth, summary.json and the record agree, as in an uninterrupted run."""
    full = _toy(tmp_path / "full", "--epochs", "6")
    assert full.returncode == 0, full.stderr[-2000:]
    # the toy improves at epochs 1 and 4 and never after: kill during the second best.pth write (epoch 4)
    cut = tmp_path / "cut"
    killed = _toy(cut, "--epochs", "6", env={FAULT_SAVE_ENV: "best.pth:2"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    last, stale = _ckpt(cut / "last.pth"), _ckpt(cut / "best.pth")
    assert last["best"]["epoch"] == last["epoch"] + 1  # last.pth says: I am the best
    assert stale["best"] != last["best"]  # best.pth is the previous best
    assert len(list(cut.glob(".best.pth.*.tmp"))) == 1  # the killed write's temporary file

    resumed = _toy(cut, "--epochs", "6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((cut / "summary.json").read_text())
    best = _ckpt(cut / "best.pth")
    assert best["best"] == summary["best"] == json.loads((tmp_path / "full" / "summary.json").read_text())["best"]
    assert best["epoch"] + 1 == summary["best"]["epoch"]
    reference = _ckpt(tmp_path / "full" / "best.pth")["model"]
    for k, v in reference.items():
        assert torch.equal(best["model"][k], v), k
    assert "best.pth re-written from" in (cut / "log.txt").read_text()
    assert _leftovers(cut) == []
    assert _rows(cut) == [str(e) for e in range(1, 7)]


def test_a_kill_during_the_first_write_leaves_no_duplicate_rows_nor_temporary_file(tmp_path):
    """The first epoch's row is in metrics.csv when a kill hits the first write of last.pth; the next start has no
    checkpoint, starts afresh and must not keep that row (nor the 17 kB... or 51 MB temporary file)."""
    out = tmp_path / "run"
    killed = _toy(out, env={FAULT_SAVE_ENV: "last.pth"})
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (out / "last.pth").exists() and _rows(out) == ["1"]
    assert len(list(out.glob(".last.pth.*.tmp"))) == 1
    again = _toy(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _rows(out) == ["1", "2", "3"]
    assert _leftovers(out) == []


def test_checkpoints_get_the_mode_of_the_other_outputs(tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train_toy(ToyConfig(str(out), epochs=1))
    finally:
        os.umask(old)
    modes = {f: stat.S_IMODE((out / f).stat().st_mode) for f in ("last.pth", "best.pth", "metrics.csv", "config.yaml")}
    assert set(modes.values()) == {0o644}, modes


def _full_disk(kind: str):
    if kind == "torch":  # what torch.save raises when the disk fills up under its zip writer
        return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 40704 vs 598")
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", ["torch", "os"])
def test_a_full_disk_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def filling_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1 wrote last.pth and best.pth; the disk is full from epoch 2 on
            f.write(b"partial")
            raise _full_disk(kind)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(CheckpointWriteError) as info:
        train_toy(ToyConfig(str(out)))
    monkeypatch.undo()
    message = str(info.value)
    assert isinstance(info.value, UserError)  # the CLI prints it in one line, exit 2
    assert "disk is full" in message and "the previous last.pth is intact" in message
    assert f"the last good checkpoint is {out / 'last.pth'} (epoch 0)" in message
    assert _ckpt(out / "last.pth")["epoch"] == 0 and _ckpt(out / "best.pth")["epoch"] == 0
    assert _leftovers(out) == []


def test_output_pointing_at_a_file_is_a_usage_error(tmp_path, digits_folder, capsys):
    from inceptionnext.cli import main

    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    args = ["--data", str(digits_folder), "--img-size", "32", "--batch-size", "16", "--workers", "0"]
    assert main(["train", *args, "--output", str(taken)]) == 2
    assert f"{taken} is a file, not a folder" in capsys.readouterr().err
    assert main(["train", *args, "--output", str(taken / "run")]) == 2
    assert f"{taken} is a file, not a folder" in capsys.readouterr().err
    assert main(["segment", "train", "--output", str(taken), "--iterations", "2", "--workers", "0"]) == 2
    assert f"{taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "a file"


# ------------------------------------------------------------------------------------------- non-finite numbers
class NanEvalRun(ToyRun):
    """Epoch 2's evaluation has a NaN loss and a perfect accuracy: it must not become best.pth."""

    def evaluate(self, epoch: int) -> dict[str, float]:
        row = super().evaluate(epoch)
        return row | {"val_loss": float("nan"), "val_acc": 100.0} if epoch == 1 else row


class InfWeightsRun(ToyRun):
    """The last step of epoch 2 overflows a weight, with a finite loss (the NaN shows only afterwards)."""

    def optimizer_step(self) -> None:
        super().optimizer_step()
        if self.step == 16:
            with torch.no_grad():
                self.model[1].weight[0, 0] = float("inf")


@pytest.mark.parametrize(
    ("run_cls", "message"),
    [
        (NanEvalRun, r"the evaluation at epoch 2 gave NaN/inf \(val_loss nan\)"),
        (InfWeightsRun, r"the weights became NaN/inf in epoch 2 \(around optimizer step 16\)"),
    ],
)
def test_non_finite_evaluations_or_weights_are_never_saved_nor_best(tmp_path, run_cls, message):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=message) as info:
        launch(run_cls, ToyConfig(str(out)))
    assert f"the last good checkpoint is {out / 'last.pth'} (epoch 0)" in str(info.value)
    for name in ("last.pth", "best.pth"):
        ckpt = _ckpt(out / name)
        assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()), name
    assert _rows(out) == ["1"]


def _cls_cfg(out: Path, data: Path, **kw):
    from inceptionnext.engine import resolve_config

    base = dict(
        model="inceptionnext_atto", data=str(data), img_size=32, epochs=2, batch_size=16, lr=2e-3, lr_base_batch=16,
        warmup_epochs=0.5, aa=None, color_jitter=0.0, hflip=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0,
        workers=0, output=str(out), crop_pct=1.0, log_interval=100,
    )  # fmt: skip
    return resolve_config(None, base | kw)


def test_classification_does_not_keep_weights_that_overflowed_at_an_epochs_last_step(
    tmp_path, digits_folder, monkeypatch
):
    """6 steps per epoch, no loss check inside the epoch (log_interval 100): the last step of epoch 2 makes the head
    infinite, the validation loss NaN. Before, that epoch was saved (and could be chosen as best)."""
    from inceptionnext.engine import classification, train

    step = classification.ClassificationRun.optimizer_step

    def overflowing(self):
        step(self)
        if self.step == 12:
            with torch.no_grad():
                self.model.head.fc2.weight.fill_(float("inf"))

    monkeypatch.setattr(classification.ClassificationRun, "optimizer_step", overflowing)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="NaN/inf"):
        train(_cls_cfg(out, digits_folder))
    for name in ("last.pth", "best.pth"):
        ckpt = _ckpt(out / name)
        assert ckpt["epoch"] == 0, name
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name
    assert _rows(out) == ["1"]


def test_segmentation_does_not_save_a_nan_from_the_final_step_off_the_intervals(tmp_path, monkeypatch):
    """5 steps, an evaluation every 4 and a loss check every 50: the final step (5) is off both intervals."""
    from inceptionnext.segmentation.config import resolve_seg_config
    from inceptionnext.segmentation.engine import SegmentationRun, train_segmentation

    step = SegmentationRun.optimizer_step

    def poisoned(self):
        step(self)
        if self.step == 5:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(SegmentationRun, "optimizer_step", poisoned)
    out = tmp_path / "seg"
    cfg = resolve_seg_config(
        "textures",
        {"output": str(out), "iterations": 5, "eval_interval": 4, "log_interval": 50, "workers": 0},
    )
    with pytest.raises(NonFiniteLossError, match=f"last good checkpoint is {out / 'last.pth'} \\(step 4\\)"):
        train_segmentation(cfg)
    for name in ("last.pth", "best.pth"):
        ckpt = _ckpt(out / name)
        assert ckpt["step"] == 4, name
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), name
    assert _rows(out, "step") == ["4"]


# ------------------------------------------------------------------------------------------- resume semantics
def test_a_resume_refuses_changed_keys_and_records_what_runs(tmp_path):
    out = tmp_path / "run"
    train_toy(ToyConfig(str(out), epochs=2))
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "log.txt", "metrics.csv", "last.pth")}
    with pytest.raises(ConfigError) as info:
        train_toy(ToyConfig(str(out), epochs=3, lr=0.05))
    message = str(info.value)
    assert "epochs 2 -> 3" in message and "lr 0.1 -> 0.05" in message
    assert "start a new run in another --output" in message
    assert {f: (out / f).read_bytes() for f in before} == before  # nothing written
    # a runtime key may change; a resume from another folder takes that folder's output
    train_toy(ToyConfig(str(out), epochs=2, log_interval=5))
    assert yaml.safe_load((out / "config.yaml").read_text())["log_interval"] == 5
    moved = tmp_path / "moved"
    train_toy(ToyConfig(str(moved), epochs=2), resume=out / "last.pth")
    resolved = yaml.safe_load((moved / "config.yaml").read_text())
    assert resolved["output"] == str(moved) and resolved["resumed_from"] == str(out / "last.pth")
    # the best recorded in the source folder is brought along
    assert _ckpt(moved / "best.pth")["best"] == _ckpt(out / "last.pth")["best"]


def test_rerunning_a_finished_classification_run_with_other_data_or_seed_is_refused(tmp_path, digits_folder):
    from inceptionnext.engine import train

    out = tmp_path / "run"
    train(_cls_cfg(out, digits_folder, epochs=1))
    config = (out / "config.yaml").read_bytes()
    other_data = tmp_path / "other"
    other_data.symlink_to(digits_folder, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"seed 0 -> 1.*--initial-checkpoint"):
        train(_cls_cfg(out, digits_folder, epochs=1, seed=1))
    with pytest.raises(ConfigError, match=f"data '{digits_folder}' -> '{other_data}'"):
        train(_cls_cfg(out, other_data, epochs=1))
    assert (out / "config.yaml").read_bytes() == config


# ------------------------------------------------------------------------------------------- torchrun (2 x gloo)
def _torchrun(*args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_torchrun_with_a_rank_killed_mid_epoch_stops_and_resumes(tmp_path):
    """torchrun stops the survivor; a relaunch resumes and ends where an uninterrupted 2-process run ends (each
    process draws its own dropout masks, from seed + rank, and continues its own stream after the resume)."""
    full = _torchrun(str(CORE_SCRIPT), str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = tmp_path / "cut"
    killed = _torchrun(str(CORE_SCRIPT), str(cut), env={FAULT_ENV: "12", FAULT_RANK_ENV: "1"})  # rank 1, epoch 2
    assert killed.returncode != 0
    assert _ckpt(cut / "last.pth")["epoch"] == 0
    resumed = _torchrun(str(CORE_SCRIPT), str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (cut / "log.txt").read_text()
    a, b = _ckpt(tmp_path / "full" / "last.pth"), _ckpt(cut / "last.pth")
    assert b["world_size"] == 2
    rank0, rank1 = b["rng_per_rank"]  # seed + rank: the processes' streams differ
    assert not torch.equal(rank0["torch"], rank1["torch"]) and rank0["python"] != rank1["python"]
    for k in a["model"]:
        assert torch.equal(b["model"][k], a["model"][k]), k
    assert _rows(cut) == ["1", "2", "3"]


def test_torchrun_with_a_hung_rank_times_out_instead_of_waiting_forever(tmp_path):
    out = tmp_path / "hung"
    hung = _torchrun(str(CORE_SCRIPT), str(out), env={FAULT_ENV: "12:hang", FAULT_RANK_ENV: "1", DIST_TIMEOUT_ENV: "5"})
    assert hung.returncode != 0
    assert "Timed out" in hung.stderr and f"{DIST_TIMEOUT_ENV}=5 s" in hung.stderr
    assert f"the last good checkpoint is {out / 'last.pth'} (epoch 0)" in hung.stderr
    assert _ckpt(out / "last.pth")["epoch"] == 0


def test_torchrun_with_a_rank_that_cannot_read_its_data_stops_every_rank(tmp_path, digits_folder):
    """Rank 1 cannot read the data (the CLI, classification): it prints why, and rank 0 stops too, saying which
    process failed and why, instead of waiting for it; nothing is written."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        "import inceptionnext.engine.classification as task\n"
        "from inceptionnext.data import DataError\n"
        "if os.environ['RANK'] == '1':\n"
        "    def unreadable(root, *args, **kwargs):\n"
        "        raise DataError(f'cannot read {root}: Input/output error')\n"
        "    task.build_dataset = unreadable\n"
        "from inceptionnext.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    args = ["train", "--data", str(digits_folder), "--output", str(out), "--model", "inceptionnext_atto",
            "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0"]  # fmt: skip
    result = _torchrun(str(launcher), *args)
    assert result.returncode != 0
    assert f"error: cannot read {digits_folder}: Input/output error" in result.stderr  # rank 1
    assert f"error: process 1 of 2 stopped while setting up the run: cannot read {digits_folder}" in result.stderr
    for rank in (0, 1):  # the ranks' own messages are one line each (torchrun's report follows)
        assert f"[rank{rank}]: Traceback" not in result.stderr
    assert not out.exists()


def test_the_process_group_timeout_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "7.5")
    assert dist_timeout().total_seconds() == 7.5
    monkeypatch.delenv(DIST_TIMEOUT_ENV)
    assert dist_timeout().total_seconds() >= 600  # generous by default
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=DIST_TIMEOUT_ENV):
            dist_timeout()


def test_a_peer_failure_is_a_runtime_error_unless_it_was_bad_input():
    from inceptionnext.engine.run import PeerUserError

    assert issubclass(PeerUserError, UserError) and issubclass(PeerUserError, PeerFailedError)
    assert not issubclass(PeerFailedError, UserError)


class FailingBuildRun(ToyRun):
    """The toy task whose data cannot be read on one rank (the others read theirs)."""

    fail_rank = -1

    def build(self) -> None:
        if self.dist.rank == self.fail_rank:
            raise DataError(f"cannot read the training data on rank {self.dist.rank}: /mnt/unreachable")
        super().build()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fail-build-rank", type=int, default=-1)
    args = parser.parse_args()
    FailingBuildRun.fail_rank = args.fail_build_rank
    try:
        launch(FailingBuildRun, ToyConfig(args.output, epochs=args.epochs))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
