"""CPU deployment below fp32: speed and accuracy cost of the int8 (onnxruntime) and bf16 (torch) exports, in one run.

    # speed (random weights; weights do not change the speed), InceptionNeXt-T, batch 16, 224 px, 2 threads:
    python benchmarks/deploy_cpu.py --json deploy.json
    # + accuracy: top-1 of each checkpoint vs its fp32 ONNX, int8 and bf16 exports on the same val set
    python benchmarks/deploy_cpu.py --eval /tmp/q/digits/best.pth=digits --eval /tmp/q/photos/best.pth=/tmp/q/photos
    # + the calibration comparison (methods x ops kept in fp32) on each --eval checkpoint
    python benchmarks/deploy_cpu.py --no-speed --eval CKPT=DATA --sweep
    # released ImageNet checkpoints (weights download through the hub code), on an ImageNet val folder
    python benchmarks/deploy_cpu.py --no-speed --imagenet /data/imagenet \
        --pretrained inceptionnext_atto inceptionnext_tiny inceptionnext_small inceptionnext_base

Speed: the contenders are built first, then timed round-robin (``--rounds`` rounds of one batch each, after
``--warmup`` untimed batches), so that a machine that gets slower or faster during the run affects all of them alike;
the table gives the median img/s and the ratios the deployment work aims at (int8 >= 1.5x the fused fp32
onnxruntime path, bf16 >= 1.3x the fused fp32 torch path). Accuracy: every file is measured by the same code as
``inceptionnext validate`` (``--exported`` for the files) on the same images. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from inceptionnext import benchmark as bm
from inceptionnext import create_model, fuse
from inceptionnext.engine import validate
from inceptionnext.export import export_onnx
from inceptionnext.inference import load_model
from inceptionnext.quantize import DEFAULT_FP32_OPS, DEFAULT_METHOD, export_bf16, quantize_onnx
from inceptionnext.serve import OnnxClassifier, TorchScriptClassifier, cpu_supports, load_exported_model

SWEEP_METHODS = ("minmax", "entropy", "percentile")
SWEEP_FP32_OPS = (("none",), ("head",), ("stem", "head"), ("head", "add"), ("head", "dwconv"))


def _export_all(model, pre, meta, out: Path, calibration, *, method=DEFAULT_METHOD, fp32_ops=DEFAULT_FP32_OPS,
                batches=8, batch_size=16, min_agreement=0.0) -> dict[str, Path]:  # fmt: skip
    """fp32 ONNX, int8 ONNX and bf16 TorchScript of one model (fused, 1x1 convs), as ``inceptionnext export`` does."""
    fused = fuse(model, primitive="conv")
    size = tuple(pre["input_size"])
    common = dict(image_size=size, metadata=meta, reference=model)
    fp32 = export_onnx(fused, out / "fp32.onnx", **common).path
    int8 = quantize_onnx(fp32, out / "int8.onnx", calibration, method=method, fp32_ops=fp32_ops, batches=batches,
                         batch_size=batch_size, min_agreement=min_agreement).path  # fmt: skip
    bf16 = export_bf16(fused, out / "bf16.pt", min_agreement=min_agreement, **common).path
    return {"fp32_onnx": fp32, "int8": int8, "bf16": bf16}


# --------------------------------------------------------------------------------------------------------- speed
def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def speed(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    pre = {"input_size": (3, args.img_size, args.img_size)}
    meta = {"model_name": args.model}
    calibration = args.calibration
    if calibration is None:  # speed does not depend on the ranges: random inputs are enough for random weights
        g = torch.Generator().manual_seed(0)
        calibration = [torch.randn((args.batch_size, 3, args.img_size, args.img_size), generator=g).numpy()
                       for _ in range(4)]  # fmt: skip
    files = _export_all(model, pre, meta, tmp / "speed", calibration, batch_size=args.batch_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    xn = x.numpy()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fused = fuse(model).to(memory_format=torch.channels_last)  # the fastest fp32 torch path (docs/speed.md)
    ort_fp32 = OnnxClassifier(files["fp32_onnx"], intra_op_threads=args.threads)
    ort_int8 = OnnxClassifier(files["int8"], intra_op_threads=args.threads)
    bf16 = TorchScriptClassifier(files["bf16"], precision="bf16")

    def autocast_eager():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused(x_cl)

    variants = {}
    if args.speed_sweep:  # int8 with other groups of ops left in fp32: what each exclusion costs in speed
        for ops in SWEEP_FP32_OPS:
            if tuple(ops) != tuple(DEFAULT_FP32_OPS):
                q = quantize_onnx(files["fp32_onnx"], tmp / f"int8_{'_'.join(ops)}.onnx", calibration, fp32_ops=ops,
                                  batch_size=args.batch_size, min_agreement=0.0)  # fmt: skip
                clf = OnnxClassifier(q.path, intra_op_threads=args.threads)
                variants[f"onnxruntime int8, fp32 ops {'+'.join(ops)}"] = lambda clf=clf: clf(xn)
    contenders = {
        "onnxruntime fp32 (fused export)": lambda: ort_fp32(xn),
        "onnxruntime int8 (QDQ, static)": lambda: ort_int8(xn),
        "torch fp32 (fuse(), channels-last)": lambda: fused(x_cl),
        "torch bf16 (exported file, autocast)": lambda: bf16.forward(x),
        "torch bf16 (fuse(), eager autocast)": autocast_eager,
        **variants,
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.inference_mode():
        for f in contenders.values():
            for _ in range(args.warmup):
                f()
        for _ in range(args.rounds):
            for k, f in contenders.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    ips = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    print(f"\nspeed: {args.model}, batch {args.batch_size}, {args.img_size} px, {args.threads} threads, "
          f"median of {args.rounds} round-robin rounds")  # fmt: skip
    for k, v in ips.items():
        spread = ", ".join(f"{args.batch_size / t:.1f}" for t in times[k])
        print(f"  {k:40s} {v:8.2f} img/s   ({spread})")
    r8 = ips["onnxruntime int8 (QDQ, static)"] / ips["onnxruntime fp32 (fused export)"]
    r16 = ips["torch bf16 (exported file, autocast)"] / ips["torch fp32 (fuse(), channels-last)"]
    kept = "+".join(DEFAULT_FP32_OPS)
    print(f"  int8 ({kept} in fp32) / onnxruntime fp32 = {r8:.2f}x (target >= 1.5x: {_met(r8 >= 1.5)})")
    print(f"  bf16 (exported file) / torch fp32 = {r16:.2f}x (target >= 1.3x: {_met(r16 >= 1.3)})")
    sizes = {k: p.stat().st_size for k, p in files.items()}
    return {"img_per_s": ips, "raw_seconds": times, "ratios": {"int8_vs_ort_fp32": r8, "bf16_vs_torch_fp32": r16},
            "file_bytes": sizes}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ accuracy
def _eval(loaded=None, data=None, **kw) -> dict[str, Any]:
    return validate(data=data, loaded=loaded, batch_size=64, workers=0, progress=False, **kw)


def accuracy(name: str, source: dict[str, Any], data: str | None, calibration: str, tmp: Path, args,
             sweep: bool) -> dict[str, Any]:  # fmt: skip
    """Top-1 of the model as loaded (torch fp32) and of its fp32 ONNX, int8 and bf16 exports, on ``data``."""
    loaded = load_model(**source)
    meta = {"model_name": loaded.name, "class_names": loaded.class_names, "weights": loaded.weights,
            **{k: v for k, v in loaded.preprocessing.items() if k != "input_size"}}  # fmt: skip
    out = tmp / name.replace("/", "_")
    row: dict[str, Any] = {"model": name, "data": data or "digits"}
    ref = _eval(data=data, model_name=source.get("name"), checkpoint=source.get("checkpoint"),
                pretrained=source.get("pretrained", False), amp="fp32")  # fmt: skip
    row["torch_fp32"], row["loss"] = ref["top1"], {"torch_fp32": ref["loss"]}
    files = _export_all(loaded.model, loaded.preprocessing, meta, out, calibration, batches=args.calibration_batches)
    for key, path in files.items():
        res = _eval(loaded=load_exported_model(path), data=data)
        row[key], row["loss"][key] = res["top1"], res["loss"]
    print(f"  {name} on {row['data']}: torch fp32 {row['torch_fp32']:.2f}  onnx fp32 {row['fp32_onnx']:.2f}  "
          f"int8 {row['int8']:.2f} ({row['int8'] - row['torch_fp32']:+.2f})  bf16 {row['bf16']:.2f} "
          f"({row['bf16'] - row['torch_fp32']:+.2f})")  # fmt: skip
    if sweep:
        row["sweep"] = []
        for method in args.sweep_methods:
            for ops in SWEEP_FP32_OPS:
                t = time.perf_counter()
                q = quantize_onnx(files["fp32_onnx"], out / f"int8_{method}_{'_'.join(ops)}.onnx", calibration,
                                  method=method, fp32_ops=ops, batches=args.calibration_batches,
                                  min_agreement=0.0)  # fmt: skip
                secs = time.perf_counter() - t
                res = _eval(loaded=load_exported_model(q.path), data=data)
                top1, loss = res["top1"], res["loss"]
                row["sweep"].append({"method": method, "fp32_ops": list(ops), "top1": top1, "loss": loss,
                                     "calibration_s": secs, "bytes": q.size_bytes})  # fmt: skip
                print(f"    {method:10s} fp32 ops {'+'.join(ops):12s} top-1 {top1:6.2f} "
                      f"({top1 - row['torch_fp32']:+.2f})  loss {loss:.4f} ({loss - ref['loss']:+.4f})  "
                      f"{q.size_bytes / 2**20:.1f} MiB  [{secs:.1f}s]")  # fmt: skip
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="inceptionnext_tiny", help="speed: the model (random weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calibration", default=None, help="speed: calibration images (default: random inputs)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--speed-sweep", action="store_true", help="also time int8 with the other fp32 op groups")
    p.add_argument("--eval", action="append", default=[], metavar="CKPT=DATA",
                   help="a training checkpoint and its data (an ImageFolder root or 'digits'); repeatable")  # fmt: skip
    p.add_argument("--pretrained", nargs="*", default=[], help="released ImageNet checkpoints to measure")
    p.add_argument("--imagenet", default=None, help="ImageNet root with val/ (and train/ for calibration)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--sweep", action="store_true", help="also compare calibration methods and fp32 ops (--eval)")
    p.add_argument("--sweep-methods", nargs="+", default=list(SWEEP_METHODS), choices=SWEEP_METHODS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    env = bm.environment()
    isa = {k: cpu_supports(k)[1] for k in ("int8", "bf16")}
    print(f"{env['cpu']}, {args.threads} threads, torch {env['torch']}; int8: {isa['int8']}; bf16: {isa['bf16']}")
    report: dict[str, Any] = {"environment": env, "isa": isa, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="deploy-cpu-") as tmp:
        if not args.no_speed:
            report["speed"] = speed(args, Path(tmp))
        rows = []
        if args.eval or args.pretrained:
            print("\naccuracy (top-1 %, drop vs the checkpoint in torch fp32):")
        for item in args.eval:
            ckpt, _, data = item.partition("=")
            data = None if data in ("", "digits") else data
            name = Path(ckpt).parent.name if Path(ckpt).stem in ("best", "last") else Path(ckpt).stem
            rows.append(accuracy(name, {"checkpoint": ckpt}, data, data or "digits", Path(tmp), args, args.sweep))
        if args.pretrained and not args.imagenet:
            print("--pretrained needs --imagenet ROOT (with val/)", file=sys.stderr)
            return 2
        for name in args.pretrained:
            root = Path(args.imagenet)
            calib = str(root / "train") if (root / "train").is_dir() else str(root / "val")
            rows.append(accuracy(name, {"name": name, "pretrained": True}, str(root), calib, Path(tmp), args, False))
        if rows:
            report["accuracy"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
