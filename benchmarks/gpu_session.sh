#!/usr/bin/env bash
# Every GPU measurement this project waits for, in one run (for a lent CUDA machine; not a test).
#
#     OUT=gpu_results bash benchmarks/gpu_session.sh [TIMM_TRAIN_PY]
#
# 1. the fused Triton mixer's correctness on the GPU: tests/test_triton_mixer.py's CUDA cases (the interpreter's
#    cases plus InceptionNeXt-T's four stage shapes, fp32 + bf16, both layouts, the output and every gradient);
# 2. benchmarks/gpu_suite.py: the mixer fwd+bwd fused vs split/cat, and model train/infer img/s against timm;
# 3. a short training of the `tiny` recipe (InceptionNeXt-T, 224 px, its full augmentation) on the photos set, with
#    the default mixer and with --fused-mixer;
# 4. with TIMM_TRAIN_PY: benchmarks/train_vs_timm.py's photos workload on CUDA (one seed).
# Each step has its own time limit and writes into $OUT as it goes, so a cut-off run keeps what it finished.
# STEPS picks steps (default: "correct suite tiny vs_timm"). On an H100 the whole run takes about 10 minutes; the
# correctness step alone 3-4 (it compiles one kernel set per case).
set -u
OUT=${OUT:-output/gpu_session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/inceptionnext_gpu}
mkdir -p "$WORK"
STEPS=${STEPS:-correct suite tiny vs_timm}
step() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

step environment
{
    nvidia-smi
    nproc
    $PY -c "import sys, torch, triton, timm; print(sys.version); print('torch', torch.__version__, 'triton', \
triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"

if want correct; then
    step "mixer correctness (tests/test_triton_mixer.py on CUDA)"
    timeout 300 $PY -m pytest tests/test_triton_mixer.py -q -p no:cacheprovider -k cuda >"$OUT/mixer_tests.log" 2>&1
    echo "rc $?" >>"$OUT/mixer_tests.log"
    tail -3 "$OUT/mixer_tests.log"
fi

if want suite; then
    step "gpu_suite.py"
    timeout 300 $PY benchmarks/gpu_suite.py --json "$OUT/gpu_suite.json" >"$OUT/gpu_suite.log" 2>&1
    echo "rc $?" >>"$OUT/gpu_suite.log"
    grep -E "x$|rror|^rc" "$OUT/gpu_suite.log"
fi

if want tiny; then
    step "tiny recipe, short training"
    $PY -m inceptionnext data make photos "$WORK/photos" >/dev/null 2>&1
    for mixer in --no-fused-mixer --fused-mixer; do
        timeout 75 $PY -m inceptionnext train --recipe tiny --data "$WORK/photos" --epochs 3 --warmup-epochs 1 \
            --cooldown-epochs 0 --batch-size 64 --grad-accum-steps 1 --workers 8 --log-interval 5 \
            $mixer --output "$WORK/tiny$mixer" >"$OUT/train_tiny$mixer.log" 2>&1
        echo "rc $?" >>"$OUT/train_tiny$mixer.log"
        cp "$WORK/tiny$mixer/summary.json" "$OUT/train_tiny$mixer.summary.json" 2>/dev/null
        tail -3 "$OUT/train_tiny$mixer.log"
    done
fi

if want vs_timm && [ $# -ge 1 ]; then
    step "train_vs_timm.py photos on CUDA"
    timeout 130 $PY benchmarks/train_vs_timm.py --timm-train "$1" --workloads photos --seeds 0 --workers 8 \
        --device cuda --out "$WORK/vs_timm" --json "$OUT/train_vs_timm.json" >"$OUT/train_vs_timm.log" 2>&1
    tail -8 "$OUT/train_vs_timm.log"
fi
step done
