"""Data that streams: WebDataset tar shards (``--data wds:...``) and Hugging Face datasets (``--data hf:...``).

ImageNet-scale data lives in a few thousand tar shards, not in millions of files on a shared filesystem. The shards
are read with ``webdataset`` (local paths, URLs, ``pipe:`` commands), Hugging Face data with ``datasets``; both
libraries are the optional extra ``inceptionnext[stream]`` and are imported only when such data is used.

A streamed training epoch is a pure function of (seed, epoch, rank, world size, loader workers), so a run resumed
from its last epoch-end checkpoint replays the interrupted epoch sample for sample:

1. the shard order of the epoch is a permutation drawn from (seed, epoch); the shards, concatenated in that order,
   give the epoch's global sequence of ``N`` samples and each sample's index in it (the index seeds its
   augmentation, as a folder's sample index does in :class:`~.datasets.SeededTransform`);
2. rank ``r`` of ``W`` takes the contiguous range ``[r * n, (r + 1) * n)`` of that sequence, ``n`` being
   ``N // W`` rounded down to whole batches: every rank takes the same number of steps (DDP needs it), and the
   at most ``W * batch_size - 1`` samples at the end of the sequence are left out of that epoch (which ones
   changes every epoch with the shard order); every other sample is seen exactly once per epoch;
3. a rank's range is cut into whole batches, and loader worker ``w`` reads a contiguous block of them, so a
   worker reads only the shards its block touches (at most one shard at each end partly, read and skipped);
4. each worker shuffles its block through a buffer of ``shuffle_buffer`` samples with a generator seeded from
   (seed, epoch, rank, worker), never the process RNG.

The order depends on the number of loader workers (the DataLoader takes batches from its workers in turn): a
resume with another ``--workers`` still sees every sample once, in another order. Evaluation splits the samples
among ranks and workers without dropping any and without shuffling.

An unreadable sample (a corrupt image, no image, no class) is logged to ``skip_log`` as ``URL#KEY<TAB>reason``; in
training it is replaced by the next readable sample of the same worker's stream (the previous one at the stream's
end), so batches stay full and step counts equal; in evaluation it is left out, as a folder's unreadable file is.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from .datasets import (
    IMG_EXTENSIONS,
    DataError,
    ImageFolderDataset,
    SeededTransform,
    UnreadableImage,
    unreadable_image,
)
from .datasets import build_dataset as build_local_dataset
from .images import ImageError, read_image

__all__ = [
    "PACK_INFO",
    "HFImageDataset",
    "ShardStream",
    "build_dataset",
    "pack_image_folder",
]

#: the file ``data pack`` writes next to its shards: classes, shard lists and sample counts per split
PACK_INFO = "dataset.json"
_FORMAT = "inceptionnext-webdataset"
_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)


def _needs(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise DataError(f"streamed data needs the {module!r} package: pip install 'inceptionnext[stream]'") from e


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded from a tuple of integers (negative seeds allowed), independent of every process RNG."""
    return np.random.default_rng([int(k) & 0xFFFF_FFFF for k in key])


# ------------------------------------------------------------------------------------------------ WebDataset
class ShardStream(IterableDataset):
    """Samples of WebDataset tar shards (``{key}.{jpg,png,...}`` + ``{key}.cls``), split across ranks and loader
    workers as the module docstring describes. ``counts[i]`` is the number of samples in ``shards[i]``.

    :meth:`configure` sets the transform, seed, rank, world size and batch size; :meth:`set_epoch` the epoch (held
    in shared memory, so persistent loader workers see it). ``len()`` is the number of samples this rank yields.
    """

    def __init__(
        self,
        shards: list[str],
        counts: list[int],
        classes: list[str],
        *,
        train: bool,
        skip_log: str | os.PathLike | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        if not shards or sum(counts) == 0:
            raise DataError(f"no samples in the shards {shards[:3]}")
        self.shards, self.counts, self.classes = list(shards), [int(c) for c in counts], list(classes)
        self.train = train
        self.skip_log = Path(skip_log) if skip_log else None
        self.shuffle_buffer = shuffle_buffer
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.configure(None)

    def configure(
        self, transform: Callable | None, seed: int = 0, rank: int = 0, world: int = 1, batch_size: int = 1
    ) -> ShardStream:
        self.seeded = SeededTransform(self, transform, seed) if transform is not None else None
        self.seed, self.rank, self.world, self.batch_size = seed, rank, world, batch_size
        return self

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def recalibration_batches(self, eval_transform: Callable, num_batches: int) -> Callable:
        """What :class:`~inceptionnext.engine.ema.RecalibrationBatches` is for a folder: ``f(epoch, device,
        channels_last)`` yields the first ``num_batches`` batches of this rank's epoch under ``eval_transform``,
        read in this process by a copy of the stream (its own epoch; no process RNG drawn)."""
        stream = copy.copy(self)
        stream._epoch = torch.zeros(1, dtype=torch.int64)
        stream.configure(eval_transform, self.seed, self.rank, self.world, self.batch_size)
        num_batches = min(num_batches, len(self) // self.batch_size)

        def batches(epoch: int, device: torch.device, channels_last: bool = False) -> Iterator[torch.Tensor]:
            stream.set_epoch(epoch)
            samples = iter(stream)
            for _ in range(num_batches):
                x, _ = default_collate([next(samples) for _ in range(self.batch_size)])
                x = x.to(device, non_blocking=True)
                yield x.contiguous(memory_format=torch.channels_last) if channels_last else x

        return batches

    def _rank_range(self) -> tuple[int, int]:
        n = self.num_samples
        if self.train:
            per_rank = n // self.world // self.batch_size * self.batch_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def __len__(self) -> int:
        start, end = self._rank_range()
        return end - start

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        """The ``[start, end)`` of the epoch's global sequence that loader worker ``worker`` of this rank reads."""
        start, end = self._rank_range()
        if self.train:  # whole batches per worker: the DataLoader then never drops or pads a worker's last batch
            batches = (end - start) // self.batch_size
            lo, hi = worker * batches // workers, (worker + 1) * batches // workers
            return start + lo * self.batch_size, start + hi * self.batch_size
        return start + worker * (end - start) // workers, start + (worker + 1) * (end - start) // workers

    def shard_order(self, epoch: int) -> list[int]:
        if not self.train:
            return list(range(len(self.shards)))
        return _rng(self.seed, epoch).permutation(len(self.shards)).tolist()

    def _raw(self, epoch: int, start: int, end: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global index, raw sample) for the samples ``[start, end)`` of the epoch's sequence, in that order."""
        wds = _needs("webdataset")
        offset = 0
        for s in self.shard_order(epoch):
            lo, hi = max(start, offset), min(end, offset + self.counts[s])
            if lo < hi:
                seen = 0
                for i, sample in enumerate(wds.tariterators.tarfile_samples([{"url": self.shards[s]}])):
                    if i >= lo - offset:
                        yield offset + i, sample
                    seen = i + 1
                    if seen >= hi - offset:
                        break
                if seen < hi - offset:
                    raise DataError(
                        f"{self.shards[s]} holds {seen} samples, {self.counts[s]} were recorded for it: the shard "
                        f"list ({PACK_INFO}) is stale; pack the data again"
                    )
            offset += self.counts[s]
            if offset >= end:
                break

    def _shuffled(self, items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        buf: list[Any] = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        for j in rng.permutation(len(buf)).tolist():
            yield buf[j]

    def _decode(self, sample: dict[str, Any]) -> tuple[Image.Image | UnreadableImage, int]:
        name = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
        target = -1
        try:
            target = int(sample["cls"])
            ext = next((k for k in _IMAGE_KEYS if k in sample), None)
            if ext is None:
                raise ValueError(f"no image in the sample (keys {sorted(k for k in sample if k[:2] != '__')})")
            return read_image(io.BytesIO(sample[ext])), target
        except (ImageError, KeyError, ValueError) as e:
            return unreadable_image(name, e, self.skip_log), target

    def _apply(self, img: Any, index: int) -> Any:
        return self.seeded.apply(img, index) if self.seeded is not None else img

    def ordered(self, epoch: int, worker: int = 0, workers: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global index, raw sample) in the order loader worker ``worker`` of ``workers`` yields them in ``epoch``."""
        start, end = self.worker_range(worker, workers)
        raw = self._raw(epoch, start, end)
        if not self.train:
            return raw
        return self._shuffled(raw, _rng(self.seed, epoch, self.rank, self.world, worker, workers))

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        epoch = int(self._epoch[0])
        if self.seeded is not None:
            self.seeded.set_epoch(epoch)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        raw = self.ordered(epoch, worker, workers)
        if not self.train:
            for index, sample in raw:
                img, target = self._decode(sample)
                yield (img if isinstance(img, UnreadableImage) else self._apply(img, index)), target
            return
        pending: list[int] = []  # unreadable samples waiting for the next readable one
        last = None
        for index, sample in raw:
            img, target = self._decode(sample)
            if isinstance(img, UnreadableImage):
                pending.append(index)
                continue
            last = (img, target)
            for j in [*pending, index]:
                yield self._apply(img, j), target
            pending.clear()
        if pending:
            if last is None:
                start, end = self.worker_range(worker, workers)
                raise DataError(f"none of the samples {start}..{end - 1} of the shards is readable (see skip log)")
            for j in pending:
                yield self._apply(last[0], j), last[1]


def _expand(pattern: str) -> list[str]:
    return list(_needs("webdataset").shardlists.expand_urls(pattern))


@functools.lru_cache(maxsize=8)
def _scan(shards: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
    """Samples per shard and the number of classes (largest ``cls`` + 1), by reading every shard once."""
    wds = _needs("webdataset")
    counts, top = [], -1
    for url in shards:
        n = 0
        try:
            for sample in wds.tariterators.tarfile_samples([{"url": url}]):
                n += 1
                if "cls" in sample:
                    with contextlib.suppress(ValueError):  # a bad class is reported when the sample is read
                        top = max(top, int(sample["cls"]))
        except OSError as e:
            raise DataError(f"shard {url}: cannot read it ({type(e).__name__}: {e})") from e
        counts.append(n)
    return tuple(counts), top + 1


def _read_pack_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable shard list ({type(e).__name__}: {e})") from e
    if not isinstance(info, dict) or not {"classes", "splits"} <= set(info):
        raise DataError(f"{path}: not a shard list written by 'inceptionnext data pack' (needs classes, splits)")
    return info


def _wds_split(spec: str, split: str) -> tuple[list[str], list[int], list[str]]:
    """(shards, counts, classes) of ``split`` for ``wds:`` + ``spec`` (a packed folder, its JSON, or patterns)."""
    local = Path(spec)
    info_path = local / PACK_INFO if local.is_dir() else local if spec.endswith(".json") else None
    if info_path is not None:
        if not info_path.is_file():
            raise DataError(f"{info_path} not found: wds:DIR takes a folder written by 'inceptionnext data pack'")
        info = _read_pack_info(info_path)
        if split not in info["splits"]:
            raise DataError(f"{info_path} has no {split!r} split (it has {sorted(info['splits'])})")
        part = info["splits"][split]
        base = info_path.parent
        remote = ("://", "pipe:")
        shards = [s if any(r in s for r in remote) or os.path.isabs(s) else str(base / s) for s in part["shards"]]
        return shards, list(part["counts"]), list(info["classes"])
    if "::" in spec:
        patterns = dict(zip(("train", "val"), spec.split("::", 1)))
    elif "{split}" in spec:
        patterns = {s: spec.replace("{split}", s) for s in ("train", "val")}
    else:
        raise DataError(
            f"wds:{spec}: say which shards are train and which val: a folder written by 'inceptionnext data pack', "
            "its dataset.json, a pattern with {split} (wds:/data/in1k/{split}-{0000..0063}.tar) or TRAIN::VAL patterns"
        )
    shards = _expand(patterns[split])
    counts, _ = _scan(tuple(shards))
    num_classes = max(_scan(tuple(_expand(p)))[1] for p in patterns.values())
    return shards, list(counts), [str(i) for i in range(num_classes)]


# ------------------------------------------------------------------------------------------------ Hugging Face
class HFImageDataset(Dataset):
    """One split of a Hugging Face ``datasets`` dataset with an image column and a class-label column.

    Images are decoded by :func:`.images.read_image` from their stored bytes, as files are; ``unreadable`` works as
    in :class:`~.datasets.ImageFolderDataset` (``"next"``: the next readable sample, with its label; ``"skip"``:
    :class:`~.datasets.UnreadableImage`). Map-style, so the folder's DistributedSampler and seeding apply unchanged.
    """

    def __init__(
        self, source: str, split: str, skip_log: str | os.PathLike | None = None, unreadable: str = "next"
    ) -> None:
        ds = _needs("datasets")
        self.source = source
        path = Path(source)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
                data = ds.load_from_disk(str(path))
            elif path.is_file():
                kind = path.suffix.lstrip(".").replace("jsonl", "json")
                data = ds.load_dataset(kind, data_files=str(path))
            else:  # a folder of parquet/arrow files, or a hub name
                data = ds.load_dataset(source)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            raise DataError(f"hf:{source}: cannot load it with datasets ({type(e).__name__}: {e})") from e
        if isinstance(data, ds.DatasetDict):
            names = {"train": ("train",), "val": ("val", "validation", "valid")}[split]
            found = next((n for n in names if n in data), None)
            if found is None:
                raise DataError(f"hf:{source} has no {split} split ({' / '.join(names)}); it has {sorted(data)}")
            data = data[found]
        elif split != "train":
            raise DataError(f"hf:{source} is one split; a val split is needed too (save a DatasetDict)")
        image_col = next((k for k, f in data.features.items() if isinstance(f, ds.Image)), None)
        label_col = next((k for k, f in data.features.items() if isinstance(f, ds.ClassLabel)), None)
        label_col = label_col or next((k for k in ("label", "labels") if k in data.features), None)
        if image_col is None or label_col is None:
            raise DataError(f"hf:{source}: needs an Image column and a ClassLabel/label column, has {data.features}")
        feature = data.features[label_col]
        self.data = data.cast_column(image_col, ds.Image(decode=False))
        self.image_col, self.label_col = image_col, label_col
        self.targets = [int(t) for t in self.data[label_col]]
        if isinstance(feature, ds.ClassLabel):
            self.classes = list(feature.names)
        else:
            self.classes = [str(i) for i in range(max(self.targets) + 1)]
        self.skip_log = Path(skip_log) if skip_log else None
        self.unreadable = unreadable
        self.transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def _read(self, index: int) -> Image.Image | UnreadableImage:
        item = self.data[index][self.image_col]
        name = f"{self.source}[{index}]" + (f" ({item['path']})" if item.get("path") else "")
        try:
            if item.get("bytes") is not None:
                return read_image(io.BytesIO(item["bytes"]))
            return read_image(item["path"])
        except (ImageError, TypeError) as e:
            return unreadable_image(name, e, self.skip_log)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for step in range(len(self) if self.unreadable == "next" else 1):
            j = (index + step) % len(self)
            img = self._read(j)
            if not isinstance(img, UnreadableImage):
                return (self.transform(img) if self.transform else img), self.targets[j]
        if self.unreadable == "skip":
            return img, self.targets[index]
        raise DataError(f"hf:{self.source}: none of the {len(self)} images is readable")


# ------------------------------------------------------------------------------------------------ entry points
def build_dataset(
    data: str | None, split: str, img_size: int, skip_log: str | os.PathLike | None = None, unreadable: str = "next"
) -> Dataset:
    """The ``split`` of ``data``: ``None`` the embedded digits; ``wds:SPEC`` a :class:`ShardStream` (SPEC: a folder
    written by ``inceptionnext data pack``, its ``dataset.json``, a shard pattern with ``{split}``, or
    ``TRAIN::VAL`` patterns); ``hf:NAME_OR_PATH`` a :class:`HFImageDataset`; else an ImageFolder root with
    ``train/`` and ``val/``. ``unreadable="skip"`` (evaluation) leaves unreadable images out."""
    if data is not None and data.startswith("wds:"):
        shards, counts, classes = _wds_split(data[4:], split)
        return ShardStream(shards, counts, classes, train=unreadable == "next", skip_log=skip_log)
    if data is not None and data.startswith("hf:"):
        return HFImageDataset(data[3:], split, skip_log=skip_log, unreadable=unreadable)
    return build_local_dataset(data, split, img_size, skip_log=skip_log, unreadable=unreadable)


def pack_image_folder(
    root: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Write the ImageFolder ``root`` (``train/<class>/...``, ``val/<class>/...``) as WebDataset shards
    ``out/<split>/shard-000000.tar ...`` plus ``out/dataset.json``; returns that JSON's content.

    Each sample is ``{key}.{ext}`` (the file's bytes as they are, never re-encoded) and ``{key}.cls`` (the class
    index). Samples are shuffled once (``seed``) before they are cut into shards, so each shard mixes the classes
    and a training epoch's shard shuffle plus buffer shuffle gives well-mixed batches.
    """
    wds = _needs("webdataset")
    root, out = Path(root), Path(out)
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    splits = [s for s in ("train", "val") if (root / s).is_dir()]
    if "train" not in splits:
        raise DataError(f"{root} has no train/ folder; expected {root}/train/<class>/... and {root}/val/<class>/...")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; pack into a new folder")
    folders = {s: ImageFolderDataset(root / s) for s in splits}
    classes = folders["train"].classes
    for s, f in folders.items():
        if f.classes != classes:
            raise DataError(f"{root}: train and {s} class folders differ: {classes[:5]}... vs {f.classes[:5]}...")
    info: dict[str, Any] = {"format": _FORMAT, "version": 1, "source": str(root), "classes": classes, "splits": {}}
    for s, folder in folders.items():
        (out / s).mkdir(parents=True, exist_ok=True)
        order = _rng(seed).permutation(len(folder.samples)).tolist()
        written: list[str] = []
        counts: list[int] = []
        for k in range(0, len(order), shard_size):
            name = f"{s}/shard-{len(written):06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for i in order[k : k + shard_size]:
                    path, label = folder.samples[i]
                    ext = Path(path).suffix.lower().lstrip(".")
                    sink.write({"__key__": f"{i:09d}", ext: Path(path).read_bytes(), "cls": str(label).encode()})
            written.append(name)
            counts.append(len(order[k : k + shard_size]))
        info["splits"][s] = {"shards": written, "counts": counts, "count": sum(counts)}
    (out / PACK_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info
