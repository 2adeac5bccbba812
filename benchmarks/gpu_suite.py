"""The GPU half of the speed suite (needs CUDA; not a test).

    python benchmarks/gpu_suite.py --json gpu_suite.json

1. The fused Triton Inception depthwise convolution against the split / convolve / concatenate module, forward +
   backward, InceptionNeXt-T stage shapes at batch 128 (``benchmarks/bench_mixer_gpu.py``).
2. Model training and inference throughput under the official protocol (the released benchmark.py's: cudnn
   autotuner on, 10 warm-up + 40 timed steps, SGD train step, images / total timed time; see
   ``inceptionnext.benchmark``) at batch 128 in TF32 and bf16 autocast, both layouts, better reported:
   this package's InceptionNeXt-T with the fused mixer (``create_model(..., fused_mixer=True)``, opt-in) against the
   default model (split / convolve / concatenate mixer), timm's ``inception_next_tiny`` and ``convnext_tiny`` (the
   paper's InceptionNeXt-T / ConvNeXt-T ratio: 1.57x training, 1.20x inference on an A100, Table 4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from inceptionnext import benchmark as bm
from inceptionnext.models import create_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="default: the official protocol's 10")
    p.add_argument("--steps", type=int, default=None, help="default: the official protocol's 40")
    p.add_argument("--precisions", nargs="+", default=["tf32", "bf16"], choices=bm.PRECISIONS)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite.py needs a CUDA device; on CPU run benchmarks/cpu_suite.py", file=sys.stderr)
        return 1
    out: dict = {"environment": bm.environment()}
    here = Path(__file__).resolve().parent
    mixer_json = Path(args.json or "gpu_suite.json").with_suffix(".mixer.json")
    subprocess.run([sys.executable, str(here / "bench_mixer_gpu.py"), "--json", str(mixer_json)], check=True)
    out["mixer"] = json.loads(mixer_json.read_text())

    common = dict(device="cuda", batch_size=args.batch_size, warmup=args.warmup, steps=args.steps)
    rows = []
    for precision in args.precisions:
        for mode in ("train", "infer"):
            best: dict[str, float] = {}
            for label, name, triton in (
                ("inceptionnext_tiny (fused mixer)", "inceptionnext_tiny", True),
                ("inceptionnext_tiny (split/cat mixer)", "inceptionnext_tiny", False),
                ("timm inception_next_tiny", "inception_next_tiny", None),
                ("timm convnext_tiny", "convnext_tiny", None),
            ):
                for layout in bm.LAYOUTS:
                    # a fresh instance per run (training updates it); None: measure builds timm's model
                    model = create_model(name, fused_mixer=triton) if triton is not None else None
                    m = bm.measure(name, mode=mode, layout=layout, precision=precision, model=model, **common)
                    rows.append(dict(vars(m), label=label))
                    if m.img_per_s:
                        best[label] = max(best.get(label, 0.0), m.img_per_s)
                    speed = f"{m.img_per_s or float('nan'):8.1f} img/s (batch {m.batch_size}) {m.error or ''}"
                    print(f"{precision} {mode} {label:38s} {layout:14s} {speed}", flush=True)
            ours = best.get("inceptionnext_tiny (fused mixer)", float("nan"))
            for ref in ("inceptionnext_tiny (split/cat mixer)", "timm inception_next_tiny", "timm convnext_tiny"):
                print(f"  {precision} {mode}: ours / {ref}: {ours / best.get(ref, float('nan')):.2f}x")
    out["models"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
