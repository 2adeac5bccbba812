"""Segmentation data: ADE20K folder checks and label mapping, the train/eval pipelines, the texture mosaics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from inceptionnext.segmentation.data import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ADE20KDataset,
    EvalPipeline,
    SegDataError,
    TextureMosaicDataset,
    TrainPipeline,
    build_seg_dataset,
    random_crop,
    random_rescale,
    rescale_size,
    resize_mask,
)

MEAN = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.asarray(IMAGENET_STD, np.float32)[:, None, None]


def denormalize(img: torch.Tensor) -> np.ndarray:
    return img.numpy() * STD + MEAN


def write_pair(root: Path, split: str, stem: str, rgb: np.ndarray, mask: np.ndarray) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "images" / split / f"{stem}.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{stem}.png")


def random_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(4):  # a few labelled rectangles on "other" (0)
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        mask[y : y + rng.integers(8, h // 2), x : x + rng.integers(8, w // 2)] = rng.integers(1, 151)
    return rgb, mask


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    """A tiny ADEChallengeData2016: 3 training and 2 validation pairs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ADEChallengeData2016"
    for split, stems in (("training", ["ADE_train_02", "ADE_train_01", "ADE_train_03"]), ("validation", ["v1", "v2"])):
        for stem in stems:
            write_pair(root, split, stem, *random_sample(rng, 48, 64))
    # a hand-made mask for the mapping check: the first training sample after sorting by stem
    mask = np.zeros((48, 64), np.uint8)
    mask[:, 16:32] = 1
    mask[:, 32:48] = 150
    mask[:, 48:] = 75
    Image.fromarray(mask, mode="L").save(root / "annotations" / "training" / "ADE_train_01.png")
    return root


# ------------------------------------------------------------------------------------------------ ADE20K


def test_ade20k_classes():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert ADE20K_CLASSES[44] == "chest of drawers"
    assert ADE20K_CLASSES[-3:] == ("glass", "clock", "flag")


def test_ade_pairing_and_reduce_zero_label(ade_root: Path):
    ds = ADE20KDataset(ade_root, "training")
    assert len(ds) == 3 and ds.num_classes == 150 and ds.classes == ADE20K_CLASSES
    assert [(i.stem, a.stem) for i, a in ds.samples] == [(f"ADE_train_0{k}",) * 2 for k in (1, 2, 3)]
    img, mask = ds.load(0)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert mask.shape == (48, 64) and mask.dtype == np.int64
    # 0 ("other") -> ignored, 1 -> 0, 150 -> 149, 75 -> 74
    expected_row = np.array([255] * 16 + [0] * 16 + [149] * 16 + [74] * 16)
    assert (mask == expected_row[None]).all()

    raw = ADE20KDataset(ade_root, "training", reduce_zero_label=False)
    assert raw.num_classes == 151 and raw.classes[0] == "other"
    assert (raw.load(0)[1] == np.array([0] * 16 + [1] * 16 + [150] * 16 + [75] * 16)[None]).all()

    x, y = ds[0]  # no pipeline: uint8 image, int64 mask
    assert x.shape == (3, 48, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert len(ADE20KDataset(ade_root, "validation")) == 2


def test_ade_missing_root_and_folders(tmp_path: Path, ade_root: Path):
    with pytest.raises(SegDataError, match="not found"):
        ADE20KDataset(tmp_path / "nope")
    import shutil

    shutil.rmtree(ade_root / "annotations" / "validation")
    with pytest.raises(SegDataError, match=r"annotations[/\\]validation"):
        ADE20KDataset(ade_root, "validation")
    with pytest.raises(SegDataError, match="split"):
        ADE20KDataset(ade_root, "test")


def test_ade_missing_pairs(ade_root: Path):
    rng = np.random.default_rng(1)
    rgb, mask = random_sample(rng, 32, 32)
    Image.fromarray(rgb).save(ade_root / "images" / "training" / "lonely_image.jpg")
    Image.fromarray(mask, mode="L").save(ade_root / "annotations" / "training" / "lonely_mask.png")
    with pytest.raises(SegDataError, match="missing pairs") as e:
        ADE20KDataset(ade_root, "training")
    assert "lonely_image.jpg" in str(e.value) and "lonely_mask.png" in str(e.value)


def test_ade_empty_split(tmp_path: Path):
    for d in ("images/training", "annotations/training"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(SegDataError, match="empty split"):
        ADE20KDataset(tmp_path, "training")


def test_ade_bad_labels_size_mismatch_corrupt(ade_root: Path):
    ann = ade_root / "annotations" / "training"
    bad = np.zeros((48, 64), np.uint8)
    bad[0, 0] = 200
    Image.fromarray(bad, mode="L").save(ann / "ADE_train_02.png")
    Image.fromarray(np.zeros((40, 30), np.uint8), mode="L").save(ann / "ADE_train_03.png")
    ds = ADE20KDataset(ade_root, "training")  # problems inside files show when they are read
    with pytest.raises(SegDataError, match="outside 0..150") as e:
        ds.load(1)
    assert "ADE_train_02.png" in str(e.value) and "200" in str(e.value)
    with pytest.raises(SegDataError, match="size mismatch") as e:
        ds[2]
    assert "ADE_train_03" in str(e.value) and "64x48" in str(e.value) and "30x40" in str(e.value)
    (ade_root / "images" / "training" / "ADE_train_01.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(SegDataError, match="ADE_train_01.jpg"):
        ds.load(0)


# ------------------------------------------------------------------------------------------------ pipelines


def test_rescale_size_hand_computed():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)  # a typical ADE20K image: unchanged
    assert rescale_size(100, 300, (2048, 512)) == (512, 1536)  # short side bound, enlarged
    assert rescale_size(1000, 4000, (2048, 512)) == (512, 2048)  # both bounds reached
    assert rescale_size(2000, 100, (2048, 512)) == (2048, 102)  # long side bound (tall image)
    assert rescale_size(2000, 100, (512, 2048)) == (2048, 102)  # order of the scale does not matter


def test_random_rescale_respects_ratio_range():
    img = np.zeros((300, 400, 3), np.uint8)
    mask = np.zeros((300, 400), np.int64)
    shorts = []
    for seed in range(60):
        out, m = random_rescale(img, mask, (2048, 512), (0.5, 2.0), np.random.default_rng(seed))
        h, w = out.shape[:2]
        assert m.shape == (h, w)
        assert 256 <= min(h, w) <= 1024 and max(h, w) <= 4096
        assert abs(w / h - 4 / 3) < 0.01  # aspect ratio kept
        shorts.append(h)
    assert min(shorts) < 320 and max(shorts) > 900  # the whole range is used
    out, _ = random_rescale(img, mask, (2048, 512), (0.75, 0.75), np.random.default_rng(0))
    assert out.shape[:2] == (384, 512)


def test_resize_mask_is_nearest():
    mask = np.arange(12).reshape(3, 4)
    up = resize_mask(mask, (6, 8))
    assert (up == np.repeat(np.repeat(mask, 2, 0), 2, 1)).all()
    assert set(np.unique(resize_mask(mask, (5, 7)))) <= set(range(12))


def test_train_pipeline_shapes_dtype_and_padding():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    mask = rng.integers(0, 150, (100, 150))
    pipe = TrainPipeline(scale=(150, 100), ratio_range=(1.0, 1.0), crop_size=(128, 192), photometric=False)
    x, y = pipe(img, mask, np.random.default_rng(3))
    assert x.shape == (3, 128, 192) and x.dtype == torch.float32
    assert y.shape == (128, 192) and y.dtype == torch.int64
    assert (y[100:] == IGNORE_INDEX).all() and (y[:, 150:] == IGNORE_INDEX).all()
    assert (x[:, 100:] == 0).all() and (x[:, :, 150:] == 0).all()
    assert (y[:100, :150] != IGNORE_INDEX).all()

    x, y = TrainPipeline(crop_size=(64, 96))(img, mask, np.random.default_rng(1))  # full defaults
    assert x.shape == (3, 64, 96) and y.shape == (64, 96)
    assert x.abs().max() < 3.0  # normalised


def test_cat_max_ratio():
    # class 0 everywhere except a 32x32 corner of class 1: only crops reaching well into the corner qualify
    mask = np.zeros((64, 64), np.uint8)
    mask[32:, 32:] = 1
    img = np.zeros((64, 64, 3), np.uint8)

    def dominant_share(crop: np.ndarray) -> float:
        counts = np.bincount(crop.ravel(), minlength=2)
        return counts.max() / counts.sum()

    ok_with = ok_without = 0
    for seed in range(200):
        _, crop = random_crop(img, mask, (32, 32), 0.75, np.random.default_rng(seed))
        ok_with += dominant_share(crop) < 0.75
        _, crop = random_crop(img, mask, (32, 32), 1.0, np.random.default_rng(seed))
        ok_without += dominant_share(crop) < 0.75
    assert ok_without < 100  # about 36% of the crops qualify by chance...
    assert ok_with > 185  # ...and 10 tries almost always find one (1 - 0.64**10 = 99%)

    # ignored pixels do not count: the corner of class 1 plus ignore elsewhere -> a single class, never accepted,
    # but the crop is still returned (the last draw)
    mask2 = np.where(mask == 1, 1, IGNORE_INDEX).astype(np.uint8)
    _, crop = random_crop(img, mask2, (32, 32), 0.75, np.random.default_rng(0))
    assert crop.shape == (32, 32)


def test_flip_moves_image_and_mask_together():
    # every pixel's value encodes its label, and labels encode the column: the pair must stay consistent
    h, w = 40, 60
    mask = np.tile(np.arange(w), (h, 1))
    img = np.repeat((mask * 4)[:, :, None], 3, axis=2).astype(np.uint8)
    pipe = TrainPipeline(scale=(w, h), ratio_range=(1.0, 1.0), crop_size=(32, 48), photometric=False)
    flipped = 0
    for seed in range(20):
        x, y = pipe(img, mask, np.random.default_rng(seed))
        assert np.allclose(denormalize(x), (y.numpy() * 4)[None], atol=1e-3)
        row = y[0].numpy()
        assert (np.diff(row) == 1).all() or (np.diff(row) == -1).all()
        flipped += int(row[0] > row[-1])
    assert 3 < flipped < 17

    always = TrainPipeline(scale=(w, h), ratio_range=(1.0, 1.0), crop_size=(h, w), photometric=False, flip_prob=1.0)
    x, y = always(img, mask, np.random.default_rng(0))
    assert (y.numpy() == mask[:, ::-1]).all()


def test_photometric_changes_image_not_mask():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = rng.integers(0, 150, (32, 32))
    kw = dict(scale=(32, 32), ratio_range=(1.0, 1.0), crop_size=(32, 32), flip_prob=0.0, cat_max_ratio=1.0)
    plain, _ = TrainPipeline(photometric=False, **kw)(img, mask, np.random.default_rng(0))
    changed = 0
    for seed in range(8):
        x, y = TrainPipeline(**kw)(img, mask, np.random.default_rng(seed))
        assert (y.numpy() == mask).all()
        values = denormalize(x)
        assert values.min() >= -1e-3 and values.max() <= 255 + 1e-3
        changed += not torch.allclose(x, plain)
    assert changed >= 5


def test_eval_pipeline_keeps_aspect_and_mask():
    rng = np.random.default_rng(0)
    for (h, w), expected in (((100, 300), (512, 1536)), ((600, 3000), (410, 2048)), ((512, 683), (512, 683))):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 150, (h, w))
        x, y = EvalPipeline()(img, mask)
        assert tuple(x.shape) == (3, *expected) and x.dtype == torch.float32
        assert max(expected) <= 2048 and min(expected) <= 512
        assert abs(expected[1] / expected[0] - w / h) / (w / h) < 0.01
        assert y.dtype == torch.int64 and (y.numpy() == mask).all()  # the mask is left at the original size


def test_dataset_determinism(ade_root: Path):
    pipe = TrainPipeline(scale=(128, 64), crop_size=(32, 32))
    a = ADE20KDataset(ade_root, "training", pipeline=pipe, seed=5)
    b = ADE20KDataset(ade_root, "training", pipeline=pipe, seed=5)
    x1, y1 = a[1]
    x2, y2 = b[1]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(a[1][0], x1)  # repeatable in one process too
    a.set_epoch(1)
    assert not torch.equal(a[1][0], x1)
    b.set_epoch(1)
    assert torch.equal(a[1][0], b[1][0])
    assert not torch.equal(ADE20KDataset(ade_root, "training", pipeline=pipe, seed=6)[1][0], x1)

    ev = ADE20KDataset(ade_root, "validation", pipeline=EvalPipeline())
    x, y = ev[0]
    assert x.shape == (3, 512, 683) and y.shape == (48, 64)


# ------------------------------------------------------------------------------------------------ texture mosaics


def test_texture_mosaic_basics():
    ds = TextureMosaicDataset("train", length=30)
    assert ds.classes == ("brick", "grass", "gravel") and ds.num_classes == 3
    assert len(ds) == 30 and len(TextureMosaicDataset("train")) == 400 and len(TextureMosaicDataset("val")) == 100
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 128, 128) and x.dtype == torch.uint8
        assert y.shape == (128, 128) and y.dtype == torch.int64
        labels = set(y.unique().tolist())
        assert labels <= {0, 1, 2} and len(labels) >= 2
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey photographs stacked to RGB


@pytest.mark.parametrize("split", ["train", "val"])
def test_texture_mosaic_pixels_come_from_the_right_texture_rows(split: str):
    """Rebuild every region from the original photographs: labels are exact and each split uses only its rows."""
    textures = [np.asarray(getattr(skimage.data, name)()) for name in ("brick", "grass", "gravel")]
    ds = TextureMosaicDataset(split, length=10, intensity_jitter=0.0)
    r0, r1 = (0, 384) if split == "train" else (384, 512)
    assert ds.texture_rows == (r0, r1)
    for i in range(len(ds)):
        m = ds.mosaic(i)
        assert set(np.unique(m.regions)) == set(range(len(m.placements)))
        for r, (label, y0, x0, flip_v, flip_h, gain) in enumerate(m.placements):
            assert gain == 1.0 and r0 <= r0 + y0 and r0 + y0 + 128 <= r1
            crop = textures[label][r0 + y0 : r0 + y0 + 128, x0 : x0 + 128]
            crop = crop[::-1] if flip_v else crop
            crop = crop[:, ::-1] if flip_h else crop
            where = m.regions == r
            assert (m.mask[where] == label).all()
            assert (m.image[where] == crop[where]).all()

    # with the default intensity jitter, regions are scaled copies of the same crops
    m = TextureMosaicDataset(split, length=1).mosaic(0)
    for r, (label, *_, gain) in enumerate(m.placements):
        assert 0.9 <= gain <= 1.1 and (m.mask[m.regions == r] == label).all()


def test_texture_mosaic_epochs():
    val = TextureMosaicDataset("val", length=5, seed=0)
    first = [val[i] for i in range(5)]
    val.set_epoch(3)
    other_seed = TextureMosaicDataset("val", length=5, seed=9)
    for i, (x, y) in enumerate(first):
        assert torch.equal(val[i][0], x) and torch.equal(val[i][1], y)
        assert torch.equal(other_seed[i][0], x)

    train = TextureMosaicDataset("train", length=5)
    before = [train[i][1] for i in range(5)]
    assert torch.equal(train[2][1], before[2])
    train.set_epoch(1)
    assert all(not torch.equal(train[i][1], before[i]) for i in range(5))
    assert not torch.equal(train[0][1], train[1][1])


def test_texture_mosaic_with_pipelines_and_builder(ade_root: Path):
    train = TextureMosaicDataset(
        "train", length=4, pipeline=TrainPipeline(scale=(512, 128), crop_size=(128, 128)), seed=1
    )
    x, y = train[0]
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32 and y.shape == (128, 128)
    assert set(y.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
    val = TextureMosaicDataset("val", length=2, size=96, pipeline=EvalPipeline(scale=(512, 128)))
    x, y = val[1]
    assert x.shape == (3, 128, 128) and y.shape == (96, 96)
    big = TextureMosaicDataset("val", length=1, size=160)  # larger than the 128-row val band: mirrored
    assert big[0][0].shape == (3, 160, 160)

    d = build_seg_dataset(None, "val", None)
    assert isinstance(d, TextureMosaicDataset) and d.split == "val" and len(d) == 100
    d = build_seg_dataset(str(ade_root), "train", None, seed=3)
    assert isinstance(d, ADE20KDataset) and d.split == "training" and len(d) == 3 and d.seed == 3
    assert build_seg_dataset(ade_root, "val", EvalPipeline()).split == "validation"
