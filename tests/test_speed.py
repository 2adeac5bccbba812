"""Fast paths are exact: fuse(), the MLP primitives, torch.compile without graph breaks; the benchmark machinery.

No timing is asserted anywhere: speed lives in ``inceptionnext benchmark`` and ``benchmarks/``.
"""

from __future__ import annotations

import csv
import json

import pytest
import timm
import torch
from torch import nn

import inceptionnext
from inceptionnext import benchmark as bm
from inceptionnext.cli import main
from inceptionnext.layers import ConvMlp, LinearMlp
from inceptionnext.reparam import FusedMetaNeXtBlock, Workspace, WorkspaceInceptionDWConv2d, fuse

ATOL = 1e-4


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, norm affines, LayerScale and biases, so every fold is exercised."""
    g = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                rand(m.running_mean, -0.5, 0.5)
                rand(m.running_var, 0.5, 2.0)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                rand(m.weight, 0.5, 1.5)
                rand(m.bias, -0.3, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                rand(p, 0.2, 1.0)
            elif name.endswith("bias") and "token_mixer" in name:
                rand(p, -0.3, 0.3)
    return model.eval()


# one of each structure: BN/LN, 4-stage/isotropic, Inception/partial/full DW/attention mixers, ablations
FUSE_MODELS = [
    "inceptionnext_atto",
    "inceptionnext_tiny_band_sequential",
    "inceptionnext_tiny_no_square",
    "inceptionnext_tiny_layernorm",
    "convnext_tiny_k7",
    "convnext_tiny_k3_par1_4",
    "inceptionnext_small_iso",
    "convnext_small_iso",
    "metanext_attn_small_iso",
]


@pytest.mark.parametrize("name", FUSE_MODELS)
def test_fuse_is_exact(name):
    torch.manual_seed(0)
    model = _perturb(inceptionnext.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        fused = fuse(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert not any(n.endswith("gamma") for n, _ in fused.named_parameters())
        assert all(isinstance(b, FusedMetaNeXtBlock) for s in fused.stages for b in s.blocks)
        for fmt in (torch.contiguous_format, torch.channels_last):
            for primitive in ("auto", "linear", "conv"):
                for blk in (b for s in fused.stages for b in s.blocks):
                    blk.mlp.primitive = primitive
                out = fused.to(memory_format=fmt)(x.contiguous(memory_format=fmt))
                diff = (out - ref).abs().max().item()
                assert diff <= ATOL, f"{name} {fmt} {primitive}: max abs diff {diff}"
    # the original is untouched (fuse copies by default) and still has its norms
    assert any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for m in model.modules())


def test_fuse_workspace_path_is_exact():
    """Large maps reuse per-thread buffers for the mixer output and the MLP hidden map: same numbers."""
    import inceptionnext.reparam as rp

    model = _perturb(inceptionnext.create_model("inceptionnext_atto", num_classes=10), seed=5)
    fused = fuse(model).to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ws = fused.workspace  # one workspace, owned by the fused model and shared by its blocks
    assert isinstance(ws, Workspace) and ws.min_bytes == 32 << 20
    blocks = [b for s in fused.stages for b in s.blocks]
    assert all(b.mlp.workspace is ws and b.token_mixer.workspace is ws for b in blocks)
    assert all(type(b.token_mixer) is WorkspaceInceptionDWConv2d for b in blocks)
    ws.min_bytes = 0  # every map goes through the buffers
    rp.release_workspace()
    with torch.inference_mode():
        ref = model(x)
        first = fused(x)
        assert ws.slots() == {"hidden", "mixed"}
        second = fused(x[:2])  # a smaller batch reuses the same (larger) buffers
    assert (first - ref).abs().max().item() <= ATOL
    assert (second - ref[:2]).abs().max().item() <= ATOL
    rp.release_workspace(fused)
    assert ws.slots() == set()
    with torch.inference_mode():
        fused(x)
    assert ws.slots() == {"hidden", "mixed"}
    rp.release_workspace()  # no model: every fused model's buffers
    assert ws.slots() == set()


def test_fused_workspace_is_per_model_and_not_copied():
    """Copies and pickles of a fused model get their own, empty workspace; the original's buffers stay its own."""
    import copy

    fused = fuse(inceptionnext.create_model("inceptionnext_atto", num_classes=10))
    fused.workspace.min_bytes = 0
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fused.to(memory_format=torch.channels_last)(x)
    for other in (copy.deepcopy(fused), _reload(fused)):
        ws = other.workspace
        assert ws is not fused.workspace and ws.slots() == set() and ws.min_bytes == 0
        assert all(b.mlp.workspace is ws for s in other.stages for b in s.blocks)
    assert fused.workspace.slots() == {"hidden", "mixed"}


def _reload(model: nn.Module) -> nn.Module:
    import io

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_fused_matches_timm_reference():
    """Independent reference: timm's own InceptionNeXt-A with the same weights, against the fused model."""
    ours = _perturb(inceptionnext.create_model("inceptionnext_atto"), seed=3)
    ref = timm.create_model("inception_next_atto").eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    fused = fuse(ours).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert (fused(x) - ref(x)).abs().max().item() <= ATOL


def test_fuse_backbone_and_inplace():
    model = _perturb(inceptionnext.create_model("inceptionnext_atto", features_only=True, out_indices=(1, 3)))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        same = fuse(model, inplace=True)
        assert same is model and inceptionnext.fuse(same) is same  # idempotent
        for a, b in zip(model(x), ref):
            assert a.shape == b.shape and (a - b).abs().max().item() <= ATOL


def test_fuse_errors():
    with pytest.raises(TypeError, match="MetaNeXt"):
        fuse(timm.create_model("resnet18"))
    model = inceptionnext.create_model("inceptionnext_atto")
    model.stem[1] = nn.BatchNorm2d(40, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        fuse(model)
    with pytest.raises(ValueError, match="primitive"):
        fuse(inceptionnext.create_model("inceptionnext_atto"), primitive="gemm")


def test_mlp_primitives_agree_in_training():
    """'linear' over the channels-last view: same outputs and gradients as the 1x1 convolutions, same keys."""
    torch.manual_seed(0)
    a = inceptionnext.create_model("inceptionnext_atto", num_classes=5).to(memory_format=torch.channels_last)
    b = inceptionnext.create_model("inceptionnext_atto", num_classes=5).to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    params = dict(b.named_parameters())
    b.set_mlp_primitive("linear")  # swaps the MLP modules; the parameter objects stay
    mlps = [m for m in b.modules() if isinstance(m, ConvMlp)]
    assert mlps and all(type(m) is LinearMlp for m in mlps)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(p is params[n] for n, p in b.named_parameters())
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 3])
    for m in (a, b):
        nn.functional.cross_entropy(m.train()(x), y).backward()
    ga, gb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in ga:
        assert torch.allclose(ga[k].grad, gb[k].grad, atol=1e-5, rtol=1e-4), k
    with pytest.raises(ValueError, match="primitive"):
        a.set_mlp_primitive("gemm")
    b.set_mlp_primitive("conv")
    assert all(type(m) is ConvMlp for m in b.modules() if isinstance(m, ConvMlp))


@pytest.mark.parametrize("fused", [False, True])
def test_compile_without_graph_breaks(fused):
    """fullgraph=True turns any graph break into an error; aot_eager also traces the backward."""
    torch._dynamo.reset()
    model = _perturb(inceptionnext.create_model("inceptionnext_atto", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    if fused:
        model = fuse(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.inference_mode():
            assert (compiled(x) - model(x)).abs().max().item() <= ATOL
        return
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    out = compiled(x)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    explain = torch._dynamo.explain(model.eval())(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


# ------------------------------------------------------------------------------------------------ benchmark
def test_measure_infer_and_train_smoke():
    common = dict(batch_size=2, img_size=64, warmup=1, steps=2, device="cpu")
    m = bm.measure("inceptionnext_atto", impl="fused", mode="infer", layout="channels_last", **common)
    assert m.error is None and m.img_per_s > 0 and len(m.step_ms) == 2 and m.batch_size == 2
    t = bm.measure("resnet18", impl="eager", mode="train", **common)
    assert t.error is None and t.img_per_s > 0
    bad = bm.measure("resnet18", impl="fused", mode="infer", **common)
    assert bad.img_per_s is None and "this package" in bad.error


def test_measure_precisions_and_onnxruntime():
    common = dict(batch_size=2, img_size=64, warmup=0, steps=1, device="cpu")
    for precision in ("bf16", "tf32"):
        m = bm.measure("inceptionnext_atto", impl="eager", mode="train", precision=precision, **common)
        assert m.error is None and m.img_per_s > 0, m.error
    ort = bm.measure("inceptionnext_atto", impl="onnxruntime", **common)
    assert ort.error is None and ort.img_per_s > 0, ort.error
    with pytest.raises(ValueError, match="CPU fp32"):
        bm.measure("inceptionnext_atto", impl="onnxruntime", precision="bf16", **common)
    with pytest.raises(ValueError, match="impl"):
        bm.measure("inceptionnext_atto", impl="tensorrt", **common)
    with pytest.raises(ValueError, match="precision"):
        bm.measure("inceptionnext_atto", precision="fp8", **common)


def test_measure_halves_batch_on_out_of_memory(monkeypatch):
    real = bm._inference_step

    def limited(model, name, impl, device, layout, x):
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, name, impl, device, layout, x)

    monkeypatch.setattr(bm, "_inference_step", limited)
    # halving is the "this" protocol's; the official one steps down as timm does (tests/test_benchmark_protocol.py)
    m = bm.measure("inceptionnext_atto", batch_size=16, img_size=64, warmup=0, steps=1, device="cpu", protocol="this")
    assert m.error is None and m.batch_size == 2
    monkeypatch.setattr(bm, "_inference_step", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    m = bm.measure("inceptionnext_atto", batch_size=4, img_size=64, warmup=0, steps=1, device="cpu")
    assert m.img_per_s is None and "boom" in m.error


def test_summarize_best_layout_ratios_and_paper_figures():
    ms = [
        bm.Measurement("inceptionnext_atto", "eager", "infer", "channels_first", "fp32", "cpu", 224, 8, 100.0),
        bm.Measurement("inceptionnext_atto", "eager", "infer", "channels_last", "fp32", "cpu", 224, 8, 150.0),
        bm.Measurement("inceptionnext_atto", "eager", "train", "channels_last", "fp32", "cpu", 224, 8, 30.0),
        bm.Measurement("convnext_atto", "eager", "infer", "channels_first", "fp32", "cpu", 224, 8, 60.0),
        bm.Measurement("convnext_atto", "eager", "train", "channels_first", "fp32", "cpu", 224, 8, None, error="x"),
    ]
    rows = {r.model: r for r in bm.summarize(ms, baseline="convnext_atto")}
    ours = rows["inceptionnext_atto"]
    assert ours.infer == 150.0 and ours.infer_layout == "channels_last" and ours.infer_ratio == pytest.approx(2.5)
    assert ours.train == 30.0 and ours.train_ratio is None  # the baseline's training failed
    # sizes come from the models, figures from the paper's Table 4 (ours) and the peers table (timm's)
    assert round(ours.params_m, 1) == 4.2 and abs(ours.macs_g - 0.51) < 0.01
    assert ours.paper_top1 == 75.3 and ours.paper_train == 2661
    assert rows["convnext_atto"].paper_top1 == 75.7 and rows["convnext_atto"].paper_infer == 4539
    assert ours.gflops_per_s == pytest.approx(2 * ours.macs_g * 150.0)
    with pytest.raises(ValueError, match="baseline"):
        bm.summarize(ms, baseline="resnet50")


def test_benchmark_cli_writes_table_csv_json_plot(tmp_path, capsys):
    args = [
        "benchmark", "inceptionnext_atto", "resnet18", "--impl", "eager,fused", "--device", "cpu",
        "--batch-size", "2", "--img-size", "64", "--warmup", "0", "--steps", "1",
        "--csv", str(tmp_path / "raw.csv"), "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "f1.png"),
        "--plot-mode", "infer", "--baseline", "resnet18",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "inceptionnext_atto" in out and "fused" in out and "ratios relative to resnet18" in out
    rows = list(csv.DictReader((tmp_path / "raw.csv").read_text().splitlines()))
    # atto: eager x {infer, train} x 2 layouts + fused x infer x 2 layouts; resnet18: eager x 2 x 2
    assert len(rows) == 10 and {r["layout"] for r in rows} == {"channels_first", "channels_last"}
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["baseline"] == "resnet18" and "torch" in data["environment"]
    base = next(r for r in data["summary"] if r["model"] == "resnet18")
    assert base["infer_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "f1.png").stat().st_size > 1000


def test_tune_glibc_malloc_in_a_fresh_process():
    import subprocess
    import sys

    code = (
        "from inceptionnext.benchmark import tune_glibc_malloc as t; t(); "
        "import torch; print(torch.ones(9 << 20).sum())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tensor(9437184.)"


def test_benchmark_cli_rejects_unknown_model(capsys):
    assert main(["benchmark", "inceptionnext_tinyy", "--device", "cpu"]) == 2
    assert "inceptionnext_tiny" in capsys.readouterr().err
