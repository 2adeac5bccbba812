"""Streamed data: ``data pack`` to WebDataset shards, ``--data wds:`` / ``hf:``, rank/worker splits, exact resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import free_port

pytest.importorskip("webdataset")
pytest.importorskip("datasets")

import webdataset as wds  # noqa: E402

from inceptionnext.cli import main  # noqa: E402
from inceptionnext.data import DataError, ShardStream, UnreadableImage, build_dataset, pack_image_folder  # noqa: E402
from inceptionnext.engine.run import FAULT_ENV, FAULT_RANK_ENV  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def packed(digits_folder, tmp_path_factory):
    """The digits ImageFolder (96 train / 24 val, 4 classes) as shards of 10 samples."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert main(["data", "pack", str(digits_folder), str(out), "--shard-size", "10"]) == 0
    return out


def _keys(stream: ShardStream, epoch: int, workers: int = 1) -> list[list[str]]:
    return [[s["__key__"] for _, s in stream.ordered(epoch, w, workers)] for w in range(workers)]


def _stream(packed, split="train", rank=0, world=1, batch=4, seed=0) -> ShardStream:
    ds = build_dataset(f"wds:{packed}", split, 32, unreadable="next" if split == "train" else "skip")
    return ds.configure(None, seed, rank, world, batch)


def test_pack_keeps_bytes_labels_and_class_names(packed, digits_folder):
    info = json.loads((packed / "dataset.json").read_text())
    assert info["classes"] == [f"class_{c}" for c in range(4)]
    assert info["splits"]["train"]["count"] == 96 and info["splits"]["val"]["count"] == 24
    assert (
        info["splits"]["train"]["shards"][0] == "train/shard-000000.tar"
        and len(info["splits"]["train"]["shards"]) == 10
    )
    files = {p.read_bytes(): int(p.parent.name[-1]) for p in (digits_folder / "train").rglob("*.png")}
    samples = [
        s
        for url in sorted((packed / "train").glob("*.tar"))
        for s in wds.tariterators.tarfile_samples([{"url": str(url)}])
    ]
    assert len(samples) == 96
    for s in samples:  # the original encoded bytes, with their class index
        assert files[s["png"]] == int(s["cls"])
    assert len({s["png"] for s in samples}) == len(files)
    ds = build_dataset(f"wds:{packed}", "train", 32)
    assert isinstance(ds, ShardStream) and ds.classes == info["classes"] and ds.num_samples == 96


@pytest.mark.parametrize("batch", [4, 5])  # 5: 48 samples per rank is not whole batches, 3 are left out per rank
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(packed, batch):
    per_rank = 48 // batch * batch
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            parts = _keys(_stream(packed, rank=rank, world=2, batch=batch), epoch, workers=2)
            assert sum(map(len, parts)) == per_rank and all(len(p) % batch == 0 for p in parts)
            seen += [k for p in parts for k in p]
        assert len(seen) == len(set(seen)) == 2 * per_rank
    # the real loader: 2 worker processes yield the rank's samples, each once
    stream = _stream(packed, rank=1, world=2, batch=batch).configure(_to_target, 0, 1, 2, batch)
    loader = DataLoader(stream, batch, num_workers=2, drop_last=True)
    assert len(loader) == per_rank // batch
    assert sum(len(y) for _, y in loader) == per_rank
    # evaluation: every sample once, none dropped, even where ranks and workers get unequal parts
    val = []
    for rank in (0, 1, 2):
        val += [k for p in _keys(_stream(packed, "val", rank, 3, batch), 0, workers=2) for k in p]
    assert len(val) == len(set(val)) == 24


def _to_target(img):
    return torch.zeros(1)


def test_order_is_a_function_of_seed_and_epoch(packed):
    a, b = _keys(_stream(packed), 3, 2), _keys(_stream(packed), 3, 2)
    assert a == b
    assert _keys(_stream(packed), 4, 2) != a
    assert _keys(_stream(packed, seed=1), 3, 2) != a
    # the global RNGs are neither used nor disturbed
    state = torch.get_rng_state()
    _keys(_stream(packed), 5)
    assert torch.equal(state, torch.get_rng_state())


def test_pattern_specs_and_errors(packed, tmp_path):
    shards = build_dataset(f"wds:{packed}/{{split}}/shard-{{000000..000002}}.tar", "train", 32)
    assert shards.num_samples == 30 and shards.classes == ["0", "1", "2", "3"]
    with pytest.raises(DataError, match="val/shard-000003.tar: cannot read it"):
        build_dataset(f"wds:{packed}/{{split}}/shard-{{000000..000009}}.tar", "val", 32)
    val = build_dataset(f"wds:{packed}/train/shard-000000.tar::{packed}/val/shard-{{000000..000002}}.tar", "val", 32)
    assert val.num_samples == 24 and len(val.classes) == 4
    with pytest.raises(DataError, match="say which shards are train"):
        build_dataset(f"wds:{packed}/train/shard-000000.tar", "train", 32)
    with pytest.raises(DataError, match="dataset.json not found"):
        build_dataset(f"wds:{tmp_path}", "train", 32)


def test_pack_errors_are_data_errors(tmp_path, digits_folder, capsys):
    with pytest.raises(DataError, match="not found"):
        pack_image_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        pack_image_folder(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="no train/ folder"):
        pack_image_folder(tmp_path, tmp_path / "out2")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DataError, match="not empty"):
        pack_image_folder(digits_folder, tmp_path / "full")
    assert main(["data", "pack", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "error: data directory not found" in capsys.readouterr().err


def _corrupt_copy(packed: Path, dest: Path, key_index: int = 3) -> str:
    """A copy of the packed shards with one train image replaced by garbage; returns its key."""
    import shutil

    shutil.copytree(packed, dest)
    shard = dest / "train" / "shard-000002.tar"
    samples = list(wds.tariterators.tarfile_samples([{"url": str(shard)}]))
    with wds.TarWriter(str(shard)) as sink:
        for i, s in enumerate(samples):
            sink.write(
                {"__key__": s["__key__"], "png": b"not an image" if i == key_index else s["png"], "cls": s["cls"]}
            )
    return samples[key_index]["__key__"]


def test_corrupt_sample_is_replaced_in_training_left_out_in_eval_and_logged(packed, tmp_path):
    bad = _corrupt_copy(packed, tmp_path / "bad")
    log = tmp_path / "skipped.txt"
    train = build_dataset(f"wds:{tmp_path / 'bad'}", "train", 32, skip_log=log).configure(_to_target, 0, 0, 1, 4)
    assert len(list(train)) == 96  # replaced by the next readable sample: batches stay full
    assert f"shard-000002.tar#{bad}\t" in log.read_text() and "UnidentifiedImageError" in log.read_text()
    val = build_dataset(f"wds:{tmp_path / 'bad'}", "val", 32, unreadable="skip")
    (tmp_path / "bad" / "dataset.json").write_text(
        (tmp_path / "bad" / "dataset.json").read_text().replace('"val/', '"train/')
    )  # point val at the train shards, corrupt one included
    val = build_dataset(f"wds:{tmp_path / 'bad'}", "val", 32, unreadable="skip")
    items = list(val)
    skipped = [x for x, _ in items if isinstance(x, UnreadableImage)]
    assert len(items) == val.num_samples and [s.path.endswith(f"#{bad}") for s in skipped] == [True]


def _args(out: Path, data: str, *extra: str) -> list[str]:
    return [
        "--data", data, "--output", str(out), "--model", "inceptionnext_atto", "--img-size", "32",
        "--epochs", "2", "--batch-size", "8", "--lr", "2e-3", "--lr-base-batch", "16", "--warmup-epochs", "1",
        "--aa", "none", "--hflip", "0.5", "--scale", "0.6", "1.0", "--reprob", "0", "--mixup", "0.2",
        "--cutmix", "0", "--drop-path", "0.1", "--workers", "0", "--crop-pct", "1.0", "--log-interval", "2",
        *extra,
    ]  # fmt: skip


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_train_from_shards_with_a_corrupt_sample(packed, tmp_path):
    _corrupt_copy(packed, tmp_path / "bad")
    out = tmp_path / "run"
    assert main(["train", *_args(out, f"wds:{tmp_path / 'bad'}", "--epochs", "1", "--model-ema")]) == 0
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["class_names"] == [f"class_{c}" for c in range(4)] and ckpt["step"] == 96 // 8
    assert "shard-000002.tar#" in (out / "skipped_images.txt").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "inceptionnext", "validate", "--checkpoint", str(out / "last.pth"), "--workers", "0"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_train_from_a_hugging_face_dataset_saved_to_disk(digits_folder, tmp_path):
    import datasets

    classes = sorted(p.name for p in (digits_folder / "train").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    parts = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((digits_folder / split).rglob("*.png"))
        parts[name] = datasets.Dataset.from_dict(
            {"image": [str(f) for f in files], "label": [classes.index(f.parent.name) for f in files]},
            features=features,
        )
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf"))
    ds = build_dataset(f"hf:{tmp_path / 'hf'}", "val", 32, unreadable="skip")
    assert len(ds) == 24 and ds.classes == classes
    out = tmp_path / "run"
    assert main(["train", *_args(out, f"hf:{tmp_path / 'hf'}", "--epochs", "1")]) == 0
    assert torch.load(out / "last.pth", weights_only=True)["class_names"] == classes
    with pytest.raises(DataError, match="cannot load"):
        build_dataset(f"hf:{tmp_path / 'missing'}", "train", 32)


def test_hf_folder_of_parquet_files_reads_the_embedded_image_bytes(digits_folder, tmp_path):
    """``hf:FOLDER`` of parquet files named by split (the layout of a Hugging Face hub dataset): images are read from
    the bytes stored in the file (the source folder is deleted before reading)."""
    import shutil

    import datasets

    copy = tmp_path / "copy"
    shutil.copytree(digits_folder, copy)
    classes = sorted(p.name for p in (copy / "train").iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    (tmp_path / "pq").mkdir()
    expected = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((copy / split).rglob("*.png"))
        labels = [classes.index(f.parent.name) for f in files]
        images = [{"bytes": f.read_bytes(), "path": f.name} for f in files]  # as hub parquet files store them
        data = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        data.to_parquet(str(tmp_path / "pq" / f"{name}-00000-of-00001.parquet"))
        expected[split] = (np.asarray(Image.open(files[3]).convert("RGB")), labels[3], len(files))
    shutil.rmtree(copy)
    for split in ("train", "val"):
        ds = build_dataset(f"hf:{tmp_path / 'pq'}", split, 32, unreadable="skip")
        img, label = ds[3]
        pixels, target, n = expected[split]
        assert len(ds) == n and ds.classes == classes and label == target
        assert np.array_equal(np.asarray(img), pixels)


def _torchrun(out: Path, data: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "inceptionnext", "train", *_args(out, data, "--workers", "1")],
        capture_output=True, text=True, timeout=600, env={**ENV, **(env or {})},
    )  # fmt: skip


def test_torchrun_from_shards_killed_mid_epoch_resumes_to_the_same_weights(packed, tmp_path):
    data = f"wds:{packed}"
    full = _torchrun(tmp_path / "full", data)
    assert full.returncode == 0, full.stderr[-3000:]
    # 96 samples, 2 ranks x batch 8: 6 steps per epoch; rank 1 dies hard at step 9, inside epoch 2
    killed = _torchrun(tmp_path / "cut", data, env={FAULT_ENV: "9", FAULT_RANK_ENV: "1"})
    assert killed.returncode != 0
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["epoch"] == 0
    resumed = _torchrun(tmp_path / "cut", data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (tmp_path / "cut" / "log.txt").read_text()
    a, b = _state(tmp_path / "full" / "last.pth"), _state(tmp_path / "cut" / "last.pth")
    assert torch.load(tmp_path / "cut" / "last.pth", weights_only=True)["step"] == 12
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_resume_of_a_stream_refuses_another_worker_count():
    """The worker count shapes a shard stream's order: a resume that changes it would not replay the epoch, so it
    is refused for ``wds:`` data (a folder run may change it)."""
    from inceptionnext.engine.classification import ClassificationRun
    from inceptionnext.engine.config import resolve_config
    from inceptionnext.engine.runtime import DistInfo

    stream = ClassificationRun(resolve_config("digits", {"data": "wds:/nowhere", "workers": 2}), DistInfo())
    folder = ClassificationRun(resolve_config("digits", {"data": "/nowhere", "workers": 2}), DistInfo())
    assert "workers" not in stream.changeable_keys()
    assert "workers" in folder.changeable_keys()
