"""End-to-end training, this package against timm's reference ``train.py``: same data, same recipe, same seeds.

Each run is a fresh process, timed from launch to exit (imports, data scan, training, evaluation every epoch,
checkpoints), the way a user meets it. Runs alternate between the two trainers (ours, timm, timm, ours, ...) so a
drift in the machine's speed hits both. Printed per workload: median wall time, end-to-end training img/s (training
images x epochs / wall time), their ratio, and the last epoch's top-1 (mean +- std over seeds).

Workloads (each an ImageFolder written by ``inceptionnext data make``):

* ``digits``: the embedded digits (1,438 train / 359 val, 32 px PNG) with the ``digits`` recipe: InceptionNeXt-A,
  30 epochs, batch 64, AdamW lr 2e-3, per-update cosine with 2 warm-up epochs, label smoothing 0.1, EMA 0.99.
  Top-1 is the EMA model's (timm's ``summary.csv`` reports the EMA model when ``--model-ema`` is on).
* ``photos``: 10 classes of 224 px JPEG crops of scikit-image photographs (600 train / 200 val) with the ``tiny``
  recipe's full augmentation (RandAugment m9/mstd0.5, random interpolation, Mixup 0.8 / CutMix 1.0, random erasing
  0.25, label smoothing 0.1, drop path 0.1) on InceptionNeXt-A at batch 32: the loader-heavy case. Top-1 is the raw
  model's (the recipe has no EMA).

    # timm's reference script, from its repository (not in the pip package), e.g. with git:
    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-repo
    python benchmarks/train_vs_timm.py --timm-train /tmp/timm-repo/train.py --seeds 0 1 2

Both trainers get the same hyper-parameters written out below (``timm_args``); everything not written is the
trainer's default, as a new user would run it: this package's include channels_last, persistent loader workers and,
on the CPU, freed memory kept for reuse (``engine.runtime.keep_freed_cpu_memory``; ``INCEPTIONNEXT_KEEP_CPU_MEMORY=0``
runs without it). Nothing here is timed inside a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = {
    "digits": {
        "data": ("digits", {}),
        "epochs": 30,
        "top1": "ema",
        "ours": ["--recipe", "digits"],
        "timm": [
            "--model", "inception_next_atto", "--img-size", "32", "--crop-pct", "1.0",
            "--batch-size", "64", "--lr", "2e-3", "--opt", "adamw", "--weight-decay", "0.05",
            "--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "2", "--warmup-lr", "1e-6",
            "--min-lr", "1e-5", "--hflip", "0", "--color-jitter", "0", "--scale", "0.7", "1.0",
            "--ratio", "0.8", "1.25", "--train-interpolation", "bicubic", "--smoothing", "0.1",
            "--model-ema", "--model-ema-decay", "0.99",
        ],
    },
    "photos": {
        "data": ("photos", {"per_class": (60, 20)}),
        "epochs": 4,
        "top1": "raw",
        "ours": [
            "--recipe", "tiny", "--model", "inceptionnext_atto", "--cooldown-epochs", "0", "--warmup-epochs", "1",
            "--batch-size", "32", "--grad-accum-steps", "1", "--lr", "1e-3", "--lr-base-batch", "32",
        ],
        "timm": [
            "--model", "inception_next_atto", "--img-size", "224", "--batch-size", "32", "--lr", "1e-3",
            "--opt", "adamw", "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "1",
            "--warmup-lr", "1e-6", "--min-lr", "1e-5", "--cooldown-epochs", "0",
            "--aa", "rand-m9-mstd0.5-inc1", "--train-interpolation", "random", "--reprob", "0.25",
            "--remode", "pixel", "--mixup", "0.8", "--cutmix", "1.0", "--mixup-switch-prob", "0.5",
            "--smoothing", "0.1", "--drop-path", "0.1",
        ],
    },
}  # fmt: skip


def make_data(root: Path, name: str) -> Path:
    from inceptionnext.data.embedded import write_image_folder

    kind, kw = WORKLOADS[name]["data"]
    folder = root / name
    if not (folder / "embedded.json").exists():
        write_image_folder(kind, folder, **kw)
    return folder


def n_train(folder: Path) -> int:
    return sum(1 for p in (folder / "train").rglob("*") if p.is_file())


def run_ours(w: dict, data: Path, out: Path, seed: int, epochs: int, workers: int, device: str) -> list[float]:
    cmd = [sys.executable, "-m", "inceptionnext", "train", *w["ours"], "--data", str(data), "--output", str(out)]
    # the trainer takes CUDA when there is one; --device cpu hides it, so both trainers run where they were told
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    if device == "cuda":  # the recipes keep the official fp32 (TF32); both trainers get bf16 autocast here
        cmd += ["--amp", "bf16"]
    cmd += ["--seed", str(seed), "--epochs", str(epochs), "--workers", str(workers)]
    _run(cmd, out, env)
    return top1_of_ours(out, w["top1"])


def top1_of_ours(out: Path, which: str) -> list[float]:
    """Top-1 after every epoch of one of this package's runs (``metrics.csv``): the EMA model's or the raw one's."""
    with open(out / "metrics.csv") as f:
        return [float(r["ema_top1" if which == "ema" else "val_top1"]) for r in csv.DictReader(f)]


# timm's RandAugment keeps 0 bits in posterize when the noisy magnitude is clipped at 10, which Pillow >= 10 refuses
# (ValueError in a loader worker, the run ends); Pillow 9, which the official runs used, gave a black image. This
# package does the latter (data/transforms.py); timm's train.py runs with the same one-line difference, nothing else.
_TIMM_LAUNCH = """
import runpy, sys
from PIL import Image
import timm.data.auto_augment as aa
_posterize = aa.posterize
def posterize(img, bits_to_keep, **kw):
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else _posterize(img, bits_to_keep, **kw)
for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    aa.NAME_TO_OP[name] = posterize
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_timm(
    w: dict, train_py: Path, data: Path, out: Path, seed: int, epochs: int, workers: int, device: str
) -> list[float]:
    cmd = [sys.executable, "-c", _TIMM_LAUNCH, str(train_py), "--data-dir", str(data), "--train-split", "train"]
    cmd += ["--val-split", "val"]
    cmd += ["--num-classes", "10", "--device", device, "--output", str(out.parent), "--experiment", out.name]
    cmd += [*w["timm"], "--seed", str(seed), "--epochs", str(epochs), "-j", str(workers), "--log-interval", "50"]
    if device == "cuda":  # the same bf16 autocast as this package's run; pinned memory as this package's default
        cmd += ["--amp", "--amp-dtype", "bfloat16", "--pin-mem"]
    _run(cmd, out, {})
    return top1_of_timm(out)


def top1_of_timm(out: Path) -> list[float]:
    """Top-1 after every epoch of a timm ``train.py`` run (``summary.csv``; the EMA model's when ``--model-ema``)."""
    with open(out / "summary.csv") as f:
        return [float(r["eval_top1"]) for r in csv.DictReader(f)]


def _run(cmd: list[str], out: Path, env: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | env
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\nsee {out.parent / (out.name + '.log')}")


#: top-1 is also averaged over the last epochs: on small sets it moves by several points between neighbouring epochs
LAST_K = 3


def report(name: str, which: str, epochs: int, images: int, res: dict[str, dict[str, list]]) -> str:
    """The workload's table: median wall time, img/s, top-1 (last epoch, and the mean of the last epochs), ratio,
    and the per-seed difference of top-1 (ours - timm) with its standard error over seeds."""
    med = {k: statistics.median(v["wall"]) for k, v in res.items()}
    late = {k: [statistics.mean(c[-LAST_K:]) for c in v["curve"]] for k, v in res.items()}
    head = f"top-1 ({which})"
    lines = [
        f"\n{name} ({epochs} epochs, {images // epochs} train images, {len(res['ours']['wall'])} seeds)",
        f"{'':6s} {'median wall s':>14s} {'img/s':>8s} {head:>16s} {f'last-{LAST_K} mean':>16s}",
    ]
    lines += [
        f"{k:6s} {med[k]:14.1f} {images / med[k]:8.1f} {summarize(res[k]['top1']):>16s} {summarize(late[k]):>16s}"
        for k in res
    ]
    per_seed = ", ".join(f"{t / o:.2f}" for o, t in zip(res["ours"]["wall"], res["timm"]["wall"]))
    lines.append(f"throughput ours / timm: {med['timm'] / med['ours']:.2f}x  (per-seed: {per_seed})")
    for label, a, b in (("last epoch", res["ours"]["top1"], res["timm"]["top1"]), (f"last-{LAST_K}", *late.values())):
        d = [x - y for x, y in zip(a, b)]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        lines.append(f"top-1 ours - timm ({label}): {statistics.mean(d):+.2f} +- {se:.2f} (standard error over seeds)")
    return "\n".join(lines) + "\n"


def summarize(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timm-train", type=Path, required=True, help="timm's train.py (from timm's repository)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="override, one value per workload")
    p.add_argument("--workers", type=int, default=2, help="loader workers for both trainers (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both trainers run (default cpu)")
    p.add_argument("--out", type=Path, default=Path("output/train_vs_timm"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if not args.timm_train.is_file():
        raise SystemExit(f"--timm-train {args.timm_train}: not a file (timm's train.py from its repository)")
    import timm
    import torch

    import inceptionnext

    print(
        f"torch {torch.__version__}, timm {timm.__version__}, inceptionnext {inceptionnext.__version__}; "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; {args.workers} loader workers; "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    results = {}
    for i, name in enumerate(args.workloads):
        w = WORKLOADS[name]
        epochs = args.epochs[i] if args.epochs else w["epochs"]
        data = make_data(args.out / "data", name)
        images = n_train(data) * epochs
        res: dict[str, dict[str, list]] = {k: {"wall": [], "top1": [], "curve": []} for k in ("ours", "timm")}
        for j, seed in enumerate(args.seeds):
            order = ("ours", "timm") if j % 2 == 0 else ("timm", "ours")
            for who in order:
                out = args.out / name / who / f"seed{seed}"
                if out.exists():
                    raise SystemExit(f"{out} exists: give a new --out (runs are never overwritten)")
                t0 = time.perf_counter()
                if who == "ours":
                    curve = run_ours(w, data, out, seed, epochs, args.workers, args.device)
                else:
                    curve = run_timm(w, args.timm_train, data, out, seed, epochs, args.workers, args.device)
                wall = time.perf_counter() - t0
                res[who]["wall"].append(wall)
                res[who]["top1"].append(curve[-1])
                res[who]["curve"].append(curve)
                print(
                    f"{name} seed {seed} {who:4s}: {wall:7.1f} s  {images / wall:7.1f} img/s  top-1 {curve[-1]:.2f}"
                    f"  (mean of the last {LAST_K} epochs {statistics.mean(curve[-LAST_K:]):.2f})"
                )
        results[name] = {"epochs": epochs, "train_images": images // epochs, "runs": res}
        print(report(name, w["top1"], epochs, images, res))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
