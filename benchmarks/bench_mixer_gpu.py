"""Fused Triton InceptionDWConv2d vs. the split/conv/cat PyTorch module on a CUDA GPU (not a test).

Times forward and forward+backward for the InceptionNeXt-T stage shapes (224px input, batch 128: channels
96/192/384/768 at 56/28/14/7, k_s=3, k_b=11, branch ratio 1/8) in fp32 and bf16, NCHW and channels_last, with
warm-up, CUDA-event timing of every repeat and medians. Prints a table and optionally writes JSON (--json).

    python benchmarks/bench_mixer_gpu.py --json bench_mixer.json

``--smoke`` runs tiny shapes on CPU through the Triton interpreter (TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from inceptionnext.layers import InceptionDWConv2d, TritonInceptionDWConv2d

STAGES = ((96, 56), (192, 28), (384, 14), (768, 7))  # InceptionNeXt-T at 224px
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def _median_ms(fn: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bench_one(
    channels: int, size: int, batch: int, dtype: str, fmt: str, args: argparse.Namespace, device: torch.device
) -> dict:
    module = InceptionDWConv2d(channels).to(device)
    if not args.autocast:
        module = module.to(DTYPES[dtype])
    triton_module = TritonInceptionDWConv2d.from_module(module)  # the same parameters
    in_dtype = torch.float32 if args.autocast else DTYPES[dtype]
    x = torch.randn(batch, channels, size, size, device=device, dtype=in_dtype).to(memory_format=FORMATS[fmt])
    x.requires_grad_()
    dy = torch.randn(batch, channels, size, size, device=device, dtype=DTYPES[dtype]).to(memory_format=FORMATS[fmt])
    assert triton_module.uses_kernel(x), "fused path not supported for this configuration"
    use_autocast = args.autocast and dtype != "fp32"

    def run(fused: bool, backward: bool) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            module.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=use_autocast):
                y = triton_module(x) if fused else module(x)
            if backward:
                y.backward(dy)

        return step

    with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=use_autocast), torch.no_grad():
        max_diff = (triton_module(x).float() - module(x).float()).abs().max().item()
    row = dict(channels=channels, size=size, batch=batch, dtype=dtype, format=fmt, max_abs_diff=max_diff)
    for label, backward in (("fwd", False), ("fwd_bwd", True)):
        ref = _median_ms(run(False, backward), args.warmup, args.repeats, device)
        fused = _median_ms(run(True, backward), args.warmup, args.repeats, device)
        row.update({f"{label}_torch_ms": ref, f"{label}_fused_ms": fused, f"{label}_speedup": ref / fused})
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--autocast", action="store_true", help="bf16 via autocast on fp32 weights/inputs")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through TRITON_INTERPRET=1 (script check)")
    args = parser.parse_args(argv)

    stages = STAGES
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("--smoke needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
            return 2
        device, stages = torch.device("cpu"), ((16, 8), (32, 4))
        args.batch, args.warmup, args.repeats = 2, 1, 2
    elif not torch.cuda.is_available():
        print(
            "bench_mixer_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to time.",
            file=sys.stderr,
        )
        return 1
    else:
        device = torch.device("cuda")
    from inceptionnext.kernels import triton_available

    if not triton_available():
        print("Triton is not available: the fused kernels cannot run.", file=sys.stderr)
        return 1
    torch.manual_seed(0)

    rows = []
    header = (
        f"{'C':>4} {'HxW':>6} {'dtype':>5} {'format':>13} | {'fwd torch':>9} {'fused':>7} {'x':>5} | "
        f"{'f+b torch':>9} {'fused':>7} {'x':>5} | {'max|diff|':>9}"
    )
    print(f"batch {args.batch}, {'autocast' if args.autocast else 'native'} bf16, times in ms (median)")
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes:
        for fmt in args.formats:
            for channels, size in stages:
                r = _bench_one(channels, size, args.batch, dtype, fmt, args, device)
                rows.append(r)
                print(
                    f"{channels:>4} {f'{size}x{size}':>6} {dtype:>5} {fmt:>13} | "
                    f"{r['fwd_torch_ms']:>9.3f} {r['fwd_fused_ms']:>7.3f} {r['fwd_speedup']:>5.2f} | "
                    f"{r['fwd_bwd_torch_ms']:>9.3f} {r['fwd_bwd_fused_ms']:>7.3f} {r['fwd_bwd_speedup']:>5.2f} | "
                    f"{r['max_abs_diff']:>9.2e}",
                    flush=True,
                )
    if args.json:
        import triton

        meta = dict(
            device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__,
            triton=triton.__version__,
            batch=args.batch,
            warmup=args.warmup,
            repeats=args.repeats,
            bf16_mode="autocast" if args.autocast else "bf16 tensors and weights",
            smoke=args.smoke,
        )
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
