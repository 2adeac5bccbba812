"""TritonInceptionDWConv2d (the fused kernels of inceptionnext.kernels) against the reference module, forward and
every gradient.

The Triton interpreter must be switched on (TRITON_INTERPRET=1) before the kernels are decorated, i.e. before
``inceptionnext.kernels`` is imported, and the rest of the suite may already have imported triton/torch, so the
checks run in a child process: this file doubles as the worker (``python tests/test_triton_mixer.py interp``),
which runs every case on CPU tensors through the interpreter and prints one JSON line of results. The tests
assert on those results, including the worker's kernel launch counters, which prove the Triton kernels (forward,
backward, weight-grad reduction) actually ran for each case. A second worker (``aot``) compiles the kernels for
an sm_90 GPU ahead of time (no GPU needed), which the interpreter does not: it catches code that only fails in
Triton's compiler (types, control flow, layouts).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from inceptionnext import InceptionDWConv2d
from inceptionnext.layers import TritonInceptionDWConv2d

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no fused kernels to test")

# name: (channels, band kernel, branch ratio, dilation, (B, H, W), channels_last, dtype, autocast)
CASES: dict[str, tuple] = {
    "default_nchw_b2_13x9": (32, 11, 1 / 8, 1, (2, 13, 9), False, "float32", False),
    "default_cl_b1_7x7": (32, 11, 1 / 8, 1, (1, 7, 7), True, "float32", False),
    "k7_c36_nchw_b1_13x9": (36, 7, 1 / 4, 1, (1, 13, 9), False, "float32", False),
    "k7_c36_cl_b3_9x13": (36, 7, 1 / 4, 1, (3, 9, 13), True, "float32", False),
    "dil2_c20_nchw_b2_11x8": (20, 5, 1 / 4, 2, (2, 11, 8), False, "float32", False),
    "small_tiles_c40_cl_b2_13x9": (40, 11, 1 / 8, 1, (2, 13, 9), True, "float32", False),
    "small_tiles_c40_nchw_b2_9x13": (40, 11, 1 / 8, 1, (2, 9, 13), False, "float32", False),
    "default_bf16_cl": (32, 11, 1 / 8, 1, (2, 9, 7), True, "bfloat16", False),
    "default_fp16_nchw": (32, 11, 1 / 8, 1, (2, 7, 9), False, "float16", False),
    "default_autocast_bf16_nchw": (32, 11, 1 / 8, 1, (1, 9, 9), False, "float32", True),
}
# on a CUDA device only (the interpreter would take minutes): InceptionNeXt-T's four stage shapes at 224 px, batch 4,
# with the tiles the kernel picks itself
STAGE_CASES: dict[str, tuple] = {
    f"stage{i}_{c}x{s}_{fmt}_{dt}": (c, 11, 1 / 8, 1, (4, s, s), fmt == "cl", dt, False)
    for i, (c, s) in enumerate(((96, 56), (192, 28), (384, 14), (768, 7)), 1)
    for fmt in ("cl", "nchw")
    for dt in ("float32", "bfloat16")
}
# (BLOCK_P, BLOCK_C) forced for some cases (the module's ``tiles=``): the interpreter's default tiles cover a whole
# test image and group, these split it into several pixel tiles and channel blocks per group, with ragged last
# tiles/blocks (the GPU situation)
FORCED_TILES = {"small_tiles_c40_cl_b2_13x9": (16, 4), "small_tiles_c40_nchw_b2_9x13": (32, 2)}
# (rtol, atol) against an fp32 reference computed from the same (low precision) values: one rounding of the output
TOLERANCES = {"float32": (0.0, 1e-4), "bfloat16": (1e-2, 1e-2), "float16": (1e-3, 1e-3)}


# ------------------------------------------------------------------------------------------------------- worker side
def _run_case(name: str, cfg: tuple, device: str = "cpu") -> dict:
    from inceptionnext.kernels import launch_counts, supports

    channels, band, ratio, dil, (b, h, w), channels_last, dtype_name, autocast = cfg
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    ref = InceptionDWConv2d(channels, band_kernel_size=band, branch_ratio=ratio, dilation=dil)
    for p in ref.parameters():  # non-trivial biases
        torch.nn.init.normal_(p, std=0.5)
    kw = dict(band_kernel_size=band, branch_ratio=ratio, dilation=dil, tiles=FORCED_TILES.get(name))
    fused = TritonInceptionDWConv2d(channels, **kw).to(dtype)
    fused.load_state_dict(ref.state_dict())  # low precision weights; the reference keeps their exact fp32 values
    ref.load_state_dict({k: v.float() for k, v in fused.state_dict().items()})
    fused, ref = fused.to(device), ref.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(b, channels, h, w).to(dtype).to(device=device, memory_format=fmt)
    dy_dtype = torch.bfloat16 if autocast else dtype
    dy = torch.randn(b, channels, h, w).to(dy_dtype).to(device=device, memory_format=fmt)

    before = launch_counts()
    xf = x.detach().clone().requires_grad_()
    convs = (fused.dwconv_hw, fused.dwconv_w, fused.dwconv_h)
    assert supports(xf, fused.split_sizes, convs), "supports() rejected a supported configuration"
    assert fused.uses_kernel(xf), "the module would not run the kernel"
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y = fused(xf)
    y.backward(dy)
    after = launch_counts()

    xr = x.detach().float().requires_grad_()
    yr = ref(xr.to(torch.bfloat16).float() if autocast else xr)  # autocast: the kernel sees bf16 x, fp32 weights
    yr.backward(dy.float())
    out_dtype = torch.bfloat16 if autocast else dtype
    res = {
        "launches": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "y_dtype_ok": y.dtype == out_dtype,
        "layout_ok": y.is_contiguous(memory_format=fmt) and xf.grad.is_contiguous(memory_format=fmt),
        "grad_dtype_ok": xf.grad.dtype == dtype and all(p.grad.dtype == p.dtype for p in fused.parameters()),
        "max_abs": {},
        "mismatch": [],
    }
    rtol, atol = TOLERANCES["bfloat16" if autocast else dtype_name]

    pairs = {"y": (y, yr), "x.grad": (xf.grad, xr.grad)}
    for (n, p), pr in zip(fused.named_parameters(), ref.parameters()):
        pairs[f"{n}.grad"] = (p.grad, pr.grad)
    for key, (got, want) in pairs.items():
        if got is None:
            res["mismatch"].append(f"{key}: no gradient")
            continue
        got, want = got.float(), want.float()
        res["max_abs"][key] = (got - want).abs().max().item()
        # a weight gradient of a real stage sums batch x H x W products: its absolute error grows with its size
        a = atol * max(1.0, want.abs().max().item()) if name in STAGE_CASES else atol
        if not torch.allclose(got, want, rtol=rtol, atol=a):
            res["mismatch"].append(f"{key}: max abs diff {res['max_abs'][key]:.3g} (rtol={rtol}, atol={a:.3g})")
    return res


def _model_case(name: str, size: int, batch: int, device: str) -> dict:
    """A whole model built with ``fused_mixer=True`` against the same weights on the reference mixer: logits and
    every parameter's gradient, and how many fused launches the model made (one forward + one backward per block)."""
    from inceptionnext.kernels import launch_counts
    from inceptionnext.models import create_model

    torch.manual_seed(0)
    ref = create_model(name, num_classes=10).to(device)
    fused = create_model(name, num_classes=10, fused_mixer=True).to(device)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(batch, 3, size, size, device=device)
    before = launch_counts()
    out_f = fused(x)
    out_f.square().sum().backward()
    after = launch_counts()
    out_r = ref(x)
    out_r.square().sum().backward()
    grads = {n: (p.grad, q.grad) for (n, p), q in zip(fused.named_parameters(), ref.parameters())}
    # relative to each gradient's size, floored at 1e-3 of the largest: a bias just before a BatchNorm gets only
    # rounding noise (~1e-13) as gradient, which no relative measure can compare
    floor = 1e-3 * max(r.abs().max().item() for _, r in grads.values())
    rel = max((g - r).abs().max().item() / max(r.abs().max().item(), floor) for g, r in grads.values())
    return {
        "blocks": sum(type(m).__name__ == "TritonInceptionDWConv2d" for m in fused.modules()),
        "launches": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "logits_max_abs": (out_f - out_r).abs().max().item(),
        "grad_max_rel": rel,
    }


def _supports_cases() -> dict[str, bool]:
    """Which configurations the module sends to the kernel, and the kernel's own check of its arguments."""
    from inceptionnext.kernels import supports

    x = torch.randn(1, 64, 8, 8)
    out = {
        name: TritonInceptionDWConv2d(64, **kw).uses_kernel(x)
        for name, kw in {
            "default": {},
            "band_sequential": dict(band_sequential=True),
            "no_square": dict(use_square=False),
            "no_band_w": dict(use_band_w=False),
            "no_band_h": dict(use_band_h=False),
        }.items()
    }
    out["int_input"] = TritonInceptionDWConv2d(64).uses_kernel(x.long())
    out["wrong_channels"] = TritonInceptionDWConv2d(32).uses_kernel(x)
    seq = InceptionDWConv2d(64, band_sequential=True)  # (identity, g, 2g) and two convs: not the kernel's layout
    out["kernel_band_sequential"] = supports(x, seq.split_sizes, (seq.dwconv_hw, seq.dwconv_w, seq.dwconv_h))
    m = InceptionDWConv2d(64)
    out["kernel_swapped_bands"] = supports(x, m.split_sizes, (m.dwconv_hw, m.dwconv_h, m.dwconv_w))
    out["kernel_default"] = supports(x, m.split_sizes, (m.dwconv_hw, m.dwconv_w, m.dwconv_h))
    return out


def _worker_interp() -> dict:
    from inceptionnext.kernels import inception_dw

    return {
        "interpreted": inception_dw._interpret() and type(inception_dw._fwd_kernel).__name__ == "InterpretedFunction",
        "cases": {name: _run_case(name, cfg) for name, cfg in CASES.items()},
        "supports": _supports_cases(),
        "model": _model_case("inceptionnext_atto", 32, 2, "cpu"),
    }


def _worker_cuda(*only: str) -> dict:
    """Every case (or those whose name holds one of ``only``) on the CUDA device, compiled kernels, against the
    reference module on cuDNN (TF32 off)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = {k: v for k, v in {**CASES, **STAGE_CASES}.items() if not only or any(o in k for o in only)}
    return {
        "device": torch.cuda.get_device_name(),
        "cases": {name: _run_case(name, cfg, device="cuda") for name, cfg in cases.items()},
        "model": _model_case("inceptionnext_tiny", 224, 8, "cuda"),
    }


def _worker_aot() -> dict:
    """Compile forward/backward/reduction kernels for sm_90 (default kernel sizes, fp32 and bf16)."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        return {"skip": f"this triton has no ahead-of-time compile API: {err}"}

    from inceptionnext.kernels import inception_dw as k

    const = dict(KS_H=3, KS_W=3, DS_H=1, DS_W=1, KB_W=11, DB_W=1, KB_H=11, DB_H=1, BLOCK_P=64, BLOCK_C=16)
    jobs = [
        (k._fwd_kernel, "bf16", {"x_ptr", "y_ptr", "w_hw", "b_hw", "w_w", "b_w", "w_h", "b_h"}, const),
        (k._bwd_kernel, "bf16", {"dy_ptr", "x_ptr", "dx_ptr", "w_hw", "w_w", "w_h"}, const),
        (k._colsum_kernel, "fp32", set(), dict(BLOCK_R=64, BLOCK_N=64)),
    ]
    out = {}
    for fn, dt, ptrs, consts in jobs:
        names = fn.arg_names
        sig = {
            n: "constexpr" if n in consts else f"*{dt}" if n in ptrs else "*fp32" if "ptr" in n else "i32"
            for n in names
        }
        src = ASTSource(fn, signature=sig, constexprs={(names.index(c),): v for c, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        out[fn.__name__] = sorted(compiled.asm)
    return out


# ------------------------------------------------------------------------------------------------------- pytest side
def _spawn(mode: str, interpret: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.Popen(
        [sys.executable, __file__, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _result(proc: subprocess.Popen, mode: str) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{mode} worker failed:\n{out[-3000:]}\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workers() -> dict:
    """Both workers run concurrently (each is mostly single-threaded); results by mode."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed: no fused kernels to test")
    procs = {"interp": _spawn("interp", interpret=True), "aot": _spawn("aot", interpret=False)}
    return {mode: _result(proc, mode) for mode, proc in procs.items()}


@pytest.fixture(scope="module")
def interp_results(workers) -> dict:
    return workers["interp"]


@needs_triton
def test_worker_ran_the_interpreter(interp_results):
    assert interp_results["interpreted"], "the kernels were not InterpretedFunction: TRITON_INTERPRET did not apply"


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_module(interp_results, case):
    res = interp_results["cases"][case]
    # each fused forward+backward is exactly three Triton launches, so the results below come from the kernels
    assert res["launches"] == {"fwd": 1, "bwd": 1, "colsum": 1}
    assert res["y_dtype_ok"] and res["grad_dtype_ok"], "output in the input dtype, weight grads in the weights' dtype"
    assert res["layout_ok"], "output and grad_input keep the input's memory format"
    assert not res["mismatch"], res["mismatch"]
    assert len(res["max_abs"]) == 8  # y, x.grad, three weights, three biases
    if CASES[case][6] == "float32" and not CASES[case][7]:
        assert max(res["max_abs"].values()) <= 1e-4


def _check_model(res: dict) -> None:
    assert res["blocks"] > 0
    assert res["launches"] == {"fwd": res["blocks"], "bwd": res["blocks"], "colsum": res["blocks"]}, res
    assert res["logits_max_abs"] <= 1e-3, res
    assert res["grad_max_rel"] <= 1e-3, res


@needs_triton
def test_model_built_with_fused_mixer(interp_results):
    """create_model(fused_mixer=True) runs the kernel in every block and trains the same as the reference model."""
    _check_model(interp_results["model"])


@needs_triton
def test_supports(interp_results):
    assert interp_results["supports"] == {
        "default": True,
        "band_sequential": False,
        "no_square": False,
        "no_band_w": False,
        "no_band_h": False,
        "int_input": False,
        "wrong_channels": False,
        "kernel_band_sequential": False,
        "kernel_swapped_bands": False,
        "kernel_default": True,
    }


def test_import_without_device_is_safe():
    """Importable anywhere; with no CUDA device and no interpreter, supports() sends callers to the PyTorch path."""
    from inceptionnext.kernels import supports, triton_available

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert not triton_available()
        m, x = TritonInceptionDWConv2d(64), torch.randn(1, 64, 8, 8)
        assert not supports(x, m.split_sizes, (m.dwconv_hw, m.dwconv_w, m.dwconv_h))
        assert not m.uses_kernel(x)


@needs_triton
def test_kernels_compile_for_sm90(workers):
    out = workers["aot"]
    if "skip" in out:
        pytest.skip(out["skip"])
    assert set(out) == {"_fwd_kernel", "_bwd_kernel", "_colsum_kernel"}
    assert all("cubin" in stages for stages in out.values()), out


@pytest.fixture(scope="module")
def cuda_results() -> dict:
    if not (HAS_TRITON and torch.cuda.is_available()):
        pytest.skip("needs a CUDA device and triton: the compiled kernels on a GPU")
    proc = _spawn("cuda", interpret=False)
    return _result(proc, "cuda")


@pytest.mark.parametrize("case", [*CASES, *STAGE_CASES])
def test_fused_matches_module_on_cuda(cuda_results, case):
    """The compiled kernels on a real GPU: the same checks as under the interpreter, plus the model's stage shapes."""
    res = cuda_results["cases"][case]
    assert res["launches"] == {"fwd": 1, "bwd": 1, "colsum": 1}
    assert res["y_dtype_ok"] and res["grad_dtype_ok"]
    assert res["layout_ok"]
    assert not res["mismatch"], res["mismatch"]


def test_model_built_with_fused_mixer_on_cuda(cuda_results):
    _check_model(cuda_results["model"])


if __name__ == "__main__":
    mode = sys.argv[1]
    workers = {"interp": _worker_interp, "aot": _worker_aot, "cuda": _worker_cuda}
    print(json.dumps(workers[mode](*sys.argv[2:])))
