"""InceptionNeXt-T on this CPU: every implementation side by side in one run, with the ratios the speed work aims at.

    python benchmarks/cpu_suite.py                       # batch 32, both layouts, ~25 min on a 2-core CPU
    python benchmarks/cpu_suite.py --batch-size 128      # the paper's batch (much longer here)
    python benchmarks/cpu_suite.py --malloc-tuned        # glibc keeps freed memory (affects every contender)

Prints the raw table, then each target ratio with the two numbers it comes from. Nothing is asserted: this machine is
noisy, so read medians and ratios, and rerun before believing a difference of a few percent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from inceptionnext import benchmark as bm

OURS, TIMM, CONVNEXT = "inceptionnext_tiny", "inception_next_tiny", "convnext_tiny"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--malloc-tuned", action="store_true", help="see inceptionnext.benchmark.tune_glibc_malloc()")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.malloc_tuned:
        bm.tune_glibc_malloc()
    # docs/speed.md's CPU tables were taken under the "this" protocol (fp32, median step, AdamW train step)
    common = dict(device="cpu", batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, protocol="this")
    rate = max(bm.matmul_rate("cpu", n) for n in (1024, 2048, 3072))
    env = bm.environment()
    print(f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, batch {args.batch_size}, fp32, "
          f"malloc {'tuned' if args.malloc_tuned else 'default'}; fp32 matmul rate {rate:.0f} GFLOP/s\n")  # fmt: skip

    runs: list[tuple[str, str, str, str]] = []
    for layout in bm.LAYOUTS:
        runs += [(TIMM, "eager", "infer", layout), (OURS, "eager", "infer", layout), (OURS, "fused", "infer", layout)]
        runs += [(OURS, "compile", "infer", layout), (CONVNEXT, "eager", "infer", layout)]
        runs += [(TIMM, "compile", "infer", layout), (CONVNEXT, "compile", "infer", layout)]
    runs += [(TIMM, "onnxruntime", "infer", "channels_first"), (OURS, "onnxruntime", "infer", "channels_first")]
    runs += [(CONVNEXT, "onnxruntime", "infer", "channels_first")]
    if not args.no_train:
        for layout in bm.LAYOUTS:
            runs += [(TIMM, "eager", "train", layout), (OURS, "eager", "train", layout)]
            runs += [(CONVNEXT, "eager", "train", layout)]
    results: dict[tuple[str, str, str, str], bm.Measurement] = {}
    for i, (name, impl, mode, layout) in enumerate(runs, 1):
        kw = dict(common, steps=args.train_steps) if mode == "train" else common
        m = bm.measure(name, impl=impl, mode=mode, layout=layout, **kw)
        results[(name, impl, mode, layout)] = m
        shown = f"{m.img_per_s:7.2f} img/s" if m.img_per_s else f"failed: {m.error}"
        print(f"[{i:2d}/{len(runs)}] {name:20s} {impl:11s} {mode:5s} {layout:14s} {shown}", flush=True)

    def ips(name: str, impl: str, mode: str, layout: str | None = None) -> float:
        vals = [
            m.img_per_s
            for (n, i, md, lo), m in results.items()
            if n == name and i == impl and md == mode and (layout is None or lo == layout) and m.img_per_s
        ]
        return max(vals) if vals else float("nan")

    ours_impls = ("eager", "fused", "compile", "onnxruntime")
    best_impl = max(ours_impls, key=lambda i: ips(OURS, i, "infer"))
    best = ips(OURS, best_impl, "infer")
    from inceptionnext.complexity import count_macs

    macs = count_macs(bm.build_model(OURS))
    gflops = 2 * macs * best / 1e9
    convnext_best = max(ips(CONVNEXT, i, "infer") for i in ("eager", "compile", "onnxruntime"))
    timm_best = max(ips(TIMM, i, "infer") for i in ("eager", "compile", "onnxruntime"))
    lines = [
        ("fastest path of this package (" + best_impl + ") / timm eager channels_first", best,
         ips(TIMM, "eager", "infer", "channels_first"), 1.7),
        ("fastest path / timm eager channels_last", best, ips(TIMM, "eager", "infer", "channels_last"), 1.3),
        ("fastest path / onnxruntime on timm's export", best, ips(TIMM, "onnxruntime", "infer"), 1.0),
        ("fastest path / timm's best (eager, compile or onnxruntime)", best, timm_best, None),
        ("InceptionNeXt-T best / ConvNeXt-T best, inference (paper A100: 1.20x)", best, convnext_best, None),
    ]  # fmt: skip
    if not args.no_train:
        ours_train = ips(OURS, "eager", "train")
        lines += [
            ("training: this package / timm eager channels_first", ours_train,
             ips(TIMM, "eager", "train", "channels_first"), 1.2),
            ("training: InceptionNeXt-T / ConvNeXt-T, both best layout (paper A100: 1.57x)", ours_train,
             ips(CONVNEXT, "eager", "train"), None),
        ]  # fmt: skip
    print(f"\n{'ratio':<82} {'a':>8} {'b':>8} {'a/b':>6}  target")
    summary = []
    for label, a, b, target in lines:
        r = a / b
        mark = "" if target is None else (f">= {target}  " + ("met" if r >= target else "MISSED"))
        print(f"{label:<82} {a:8.2f} {b:8.2f} {r:6.2f}  {mark}")
        summary.append(dict(label=label, a=a, b=b, ratio=r, target=target))
    frac = gflops / rate
    print(f"\nfastest path: {gflops:.0f} GFLOP/s (2 x {macs / 1e9:.2f} GMACs x {best:.1f} img/s) = {frac:.2f} of the "
          f"measured matmul rate {rate:.0f} GFLOP/s (aim >= 0.85)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(
                    environment=env,
                    batch_size=args.batch_size,
                    malloc_tuned=args.malloc_tuned,
                    matmul_gflops=rate,
                    fastest_impl=best_impl,
                    fastest_gflops=gflops,
                    ratios=summary,
                    measurements=[vars(m) for m in results.values()],
                ),
                indent=2,
            )  # fmt: skip
        )
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
