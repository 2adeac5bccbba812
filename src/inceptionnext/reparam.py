"""Inference re-parameterisation: fold every affine map that sits next to a linear one into it.

A MetaNeXt block in eval mode is ``x + gamma * fc2(GELU(fc1(BN(mixer(x)))))``. BatchNorm with frozen statistics is a
per-channel affine map ``s * y + t``, the mixer's convolution biases add a per-channel constant, and LayerScale is a
per-channel scale, so all of them fold into the 1x1 convolutions around them:

* the post-mixer BatchNorm (and the mixer biases it sees) into ``fc1``:
  ``W1 (s * (y + b) + t) = (W1 s) y + W1 (s b + t)``;
* LayerScale into ``fc2``: ``gamma * (W2 h + b2) = (gamma W2) h + gamma b2``;
* the stem BatchNorm into the stem convolution (conv then norm) and each downsampling BatchNorm into the 2x2 strided
  convolution after it (norm then conv; exact because that convolution has no padding);
* for LayerNorm models (ConvNeXt) the norms stay, but their affine part folds into the layer after them;
* in the head, the LayerNorm affine folds into the classifier.

What is left per block is ``mixer -> fc1 -> GELU -> fc2 -> + x``. :class:`FusedMlp` runs it as GEMMs over the
channels-last view of the map; on CPU it uses oneDNN's linear with the GELU and the residual add fused into the GEMM
epilogue (``mkldnn::_linear_pointwise``), so neither the 4x wide activation nor the sum makes an extra pass over
memory. Elsewhere (CUDA, half precision, ``torch.compile``) it uses plain ``F.linear`` / 1x1 convolutions and leaves
fusion to the backend. Large maps in eager CPU inference are written into buffers that the fused model keeps from
call to call (its :class:`Workspace`; :class:`WorkspaceInceptionDWConv2d` for the mixer output, :class:`FusedMlp` for
the hidden map); :func:`release_workspace` frees them.

The fused model computes the same function as the original in eval mode (max abs difference ~1e-5 in fp32, tested)
and keeps the module tree (``stem``, ``stages.N.downsample``, ``stages.N.blocks.M``, ``head``), so
``forward_features``, ``forward_intermediates`` and backbone use work unchanged. It has no BatchNorm left, so it is
meant for inference, export and benchmarking, not for training.
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .errors import ConfigError
from .layers.mixers import InceptionDWConv2d, PartialDWConv2d
from .layers.mlp import ConvMlp
from .layers.swap import share_as
from .models.metanext import MetaNeXt, MetaNeXtBlock, MlpHead, NormLinearHead

__all__ = [
    "fuse",
    "FusedMlp",
    "FusedMetaNeXtBlock",
    "Workspace",
    "WorkspaceInceptionDWConv2d",
    "is_fused",
    "release_workspace",
]


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine map ``s * x + t`` of an eval-mode BatchNorm, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _ln_affine(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not norm.elementwise_affine:
        return None
    c = norm.normalized_shape[0]
    weight = norm.weight.double() if norm.weight is not None else torch.ones(c, dtype=torch.float64)
    bias = norm.bias.double() if norm.bias is not None else torch.zeros(c, dtype=torch.float64)
    return weight, bias


def _fold_input_affine(weight: torch.Tensor, bias: torch.Tensor | None, scale, shift) -> tuple[torch.Tensor, ...]:
    """``W (s * x + t) + b`` -> ``W' x + b'`` for a linear map or an unpadded convolution (weight (out, in, ...))."""
    w = weight.double()
    view = (1, -1) + (1,) * (w.ndim - 2)
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new_b = b + (w * shift.reshape(view)).flatten(1).sum(1)
    return w * scale.reshape(view), new_b


def _fold_output_affine(weight: torch.Tensor, bias: torch.Tensor | None, scale, shift) -> tuple[torch.Tensor, ...]:
    """``s * (W x + b) + t`` -> ``W' x + b'`` (weight (out, ...))."""
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), b * scale + shift


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)


def _affine_free(norm: nn.LayerNorm) -> nn.LayerNorm:
    if isinstance(norm, LayerNorm2d):
        return LayerNorm2d(norm.normalized_shape[0], eps=norm.eps, affine=False)
    return nn.LayerNorm(norm.normalized_shape[0], eps=norm.eps, elementwise_affine=False)


def _take_mixer_bias(mixer: nn.Module, channels: int) -> torch.Tensor | None:
    """Zero the mixer's biases and return them as a per-channel constant, for mixers whose bias is one.

    The Inception and partial depthwise mixers add their convolution bias uniformly over space on their own
    channels, so it is a per-channel constant of the mixer's output. A sequential band branch is not (the first
    band's bias goes through the zero-padded second band), so that configuration keeps its biases.
    """
    if isinstance(mixer, InceptionDWConv2d) and not mixer.band_sequential:
        names = {"hw": "dwconv_hw", "w": "dwconv_w", "h": "dwconv_h"}
        convs = [getattr(mixer, names[b]) for b in mixer.branches]
        offset = mixer.split_sizes[0]
    elif isinstance(mixer, PartialDWConv2d):
        convs, offset = [mixer.conv], mixer.split_sizes[0]
    else:
        return None
    const = torch.zeros(channels, dtype=torch.float64)
    for conv in convs:
        n = conv.out_channels
        if conv.bias is not None:
            const[offset : offset + n] = conv.bias.detach().double()
            with torch.no_grad():
                conv.bias.zero_()
        offset += n
    return const


_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mkldnn_linear_ok(x: torch.Tensor) -> bool:
    """oneDNN's fused linear epilogues: eager CPU fp32 inference only (compilers and exporters get plain ops)."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    return _MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad


class Workspace:
    """Reusable per-thread buffers of one fused model, so that large maps are not faulted in afresh on every call.

    glibc serves allocations above 32 MiB (its largest mmap threshold) with fresh mmaps: every such tensor costs page
    faults and kernel zeroing. The MLP's 4x wide hidden map crosses that at 224px from batch ~8 (stage 1), so in eager
    CPU inference it (and the mixer output) is computed into a buffer that is reused from call to call and from block
    to block. Buffers are per thread, so threads sharing a model do not overwrite each other's maps.

    Args:
        min_bytes: maps at least this large use the buffers (smaller ones are served from glibc's heap anyway).
    """

    def __init__(self, min_bytes: int = 32 << 20) -> None:
        self.min_bytes = min_bytes
        self._local = threading.local()
        _WORKSPACES.add(self)

    def __reduce__(self):
        return Workspace, (self.min_bytes,)  # copies and pickles start with no buffers

    def wants(self, x: torch.Tensor, numel: int) -> bool:
        """Whether a ``numel``-element map like ``x`` should go to a buffer (large, eager CPU fp32 inference)."""
        return _mkldnn_linear_ok(x) and numel * x.element_size() >= self.min_bytes

    def buffer(self, slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """This thread's buffer ``slot``, grown as needed, as a flat tensor of ``numel`` elements."""
        buf = getattr(self._local, slot, None)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            setattr(self._local, slot, buf)
        return buf[:numel]

    def slots(self) -> set[str]:
        """Names of the buffers this thread holds."""
        return set(vars(self._local))

    def release(self) -> None:
        """Drop every thread's buffers (a thread in the middle of a call keeps its own until it returns)."""
        self._local = threading.local()


_WORKSPACES: weakref.WeakSet[Workspace] = weakref.WeakSet()  # every live workspace, for release_workspace()


def release_workspace(model: nn.Module | None = None) -> None:
    """Free the reusable buffers of the fused ``model`` (default: of every fused model in this process)."""
    if model is None:
        spaces = list(_WORKSPACES)
    else:
        spaces = [m.workspace for m in model.modules() if isinstance(getattr(m, "workspace", None), Workspace)]
    for ws in spaces:
        ws.release()


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class FusedMlp(nn.Module):
    """``fc2(GELU(fc1(x))) + shortcut`` with 2-D weights, run as GEMMs over channels-last maps.

    ``primitive`` picks how the GEMMs run on a channels-last input: ``"auto"`` (oneDNN fused epilogues on CPU fp32
    inference, ``F.linear`` otherwise), ``"linear"`` or ``"conv"`` (1x1 convolutions). NCHW-contiguous inputs always
    use 1x1 convolutions, which read NCHW directly. With a ``workspace``, a large hidden map goes to its buffer.
    """

    def __init__(
        self, fc1: nn.Linear, fc2: nn.Linear, primitive: str = "auto", workspace: Workspace | None = None
    ) -> None:
        super().__init__()
        if primitive not in ("auto", "linear", "conv"):
            raise ConfigError(f"primitive must be 'auto', 'linear' or 'conv', got {primitive!r}")
        self.fc1, self.fc2 = fc1, fc2
        self.primitive = primitive
        self.workspace = workspace

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        grad = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad)
        if self.primitive == "conv" or not _is_channels_last(x):
            h = F.conv2d(x, w1[:, :, None, None], b1)
            h = F.gelu(h) if grad else torch.ops.aten.gelu_(h)
            out = F.conv2d(h, w2[:, :, None, None], b2)
            return out + shortcut if grad else out.add_(shortcut)
        b, c, hh, ww = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: the map is NHWC in memory
        res = shortcut.permute(0, 2, 3, 1).reshape(-1, c)  # a view too when the shortcut is channels-last
        if self.primitive == "auto" and not grad and _mkldnn_linear_ok(rows) and res.is_contiguous():
            hidden = (rows.shape[0], w1.shape[0])
            ws = self.workspace
            if ws is not None and ws.wants(rows, hidden[0] * hidden[1]):
                h = ws.buffer("hidden", hidden[0] * hidden[1], rows).view(hidden)
                torch.ops.aten.gelu_(torch.addmm(b1, rows, w1.t(), out=h))
            else:
                h = torch.ops.mkldnn._linear_pointwise(rows, w1, b1, "gelu", [], "none")
            out = torch.ops.mkldnn._linear_pointwise.binary(h, res, w2, b2, "add")
        else:
            h = F.linear(rows, w1, b1)
            h = F.gelu(h) if grad else torch.ops.aten.gelu_(h)
            out = F.linear(h, w2, b2)
            out = out + res if grad else out.add_(res)
        return out.reshape(b, hh, ww, c).permute(0, 3, 1, 2)


class WorkspaceInceptionDWConv2d(InceptionDWConv2d):
    """The reference mixer concatenating into its workspace buffer on large maps (eager CPU inference).

    Only for the fused model: the output is overwritten by the next block's mixer, which is safe there because it only
    feeds the block's ``fc1``.
    """

    workspace: Workspace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and _is_channels_last(x) and self.workspace.wants(x, x.numel()):
            b, c, h, w = x.shape
            out = self.workspace.buffer("mixed", x.numel(), x).view(b, h, w, c).permute(0, 3, 1, 2)
            return torch.cat(self.forward_groups(x), dim=1, out=out)
        return super().forward(x)


class FusedMetaNeXtBlock(nn.Module):
    """``x + fc2(GELU(fc1(norm(mixer(x)))))`` with BatchNorm and LayerScale folded away (``norm`` is an Identity
    for BatchNorm models, an affine-free LayerNorm for LayerNorm models)."""

    def __init__(self, token_mixer: nn.Module, norm: nn.Module, mlp: FusedMlp) -> None:
        super().__init__()
        self.token_mixer = token_mixer
        self.norm = norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(self.token_mixer(x)), x)


def _fuse_block(block: MetaNeXtBlock, primitive: str, workspace: Workspace) -> FusedMetaNeXtBlock:
    if not isinstance(block.mlp, ConvMlp) or not isinstance(block.mlp.act, nn.GELU):
        raise TypeError(f"cannot fuse a block with MLP {type(block.mlp).__name__}")
    dim = block.mlp.fc1.in_channels
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    w1, b1 = fc1.weight.detach().double().flatten(1), fc1.bias.detach().double()
    w2, b2 = fc2.weight.detach().double().flatten(1), fc2.bias.detach().double()
    norm: nn.Module = nn.Identity()
    if isinstance(block.norm, nn.BatchNorm2d):
        scale, shift = _bn_scale_shift(block.norm)
        const = _take_mixer_bias(block.token_mixer, dim)
        if const is not None:
            shift = shift + scale * const
        w1, b1 = _fold_input_affine(w1, b1, scale, shift)
    elif isinstance(block.norm, nn.LayerNorm):
        affine = _ln_affine(block.norm)
        if affine is not None:
            w1, b1 = _fold_input_affine(w1, b1, *affine)
        norm = _affine_free(block.norm)
    elif not isinstance(block.norm, nn.Identity):
        raise TypeError(f"cannot fuse a block with norm {type(block.norm).__name__}")
    if block.gamma is not None:
        gamma = block.gamma.detach().double()
        w2, b2 = _fold_output_affine(w2, b2, gamma, torch.zeros_like(gamma))
    like = dict(device=fc1.weight.device, dtype=fc1.weight.dtype)
    lin1, lin2 = nn.Linear(w1.shape[1], w1.shape[0], **like), nn.Linear(w2.shape[1], w2.shape[0], **like)
    _assign(lin1, w1, b1)
    _assign(lin2, w2, b2)
    mixer = block.token_mixer
    if type(mixer) is InceptionDWConv2d:  # the reference on CPU: write its output into the workspace
        mixer = share_as(WorkspaceInceptionDWConv2d, mixer, workspace=workspace)
    return FusedMetaNeXtBlock(mixer, norm, FusedMlp(lin1, lin2, primitive, workspace))


def _fuse_head(head: nn.Module) -> None:
    """Fold the head's LayerNorm affine into its classifier (both heads end ``norm -> dropout -> classifier``)."""
    if not isinstance(head, (MlpHead, NormLinearHead)):
        return
    classifier, affine = getattr(head, head.classifier_name), _ln_affine(head.norm)
    if isinstance(classifier, nn.Linear) and affine is not None:
        _assign(classifier, *_fold_input_affine(classifier.weight.detach(), classifier.bias, *affine))
        head.norm = _affine_free(head.norm)


def is_fused(model: nn.Module) -> bool:
    return bool(getattr(model, "fused", False))


@torch.no_grad()
def fuse(model: MetaNeXt, *, inplace: bool = False, primitive: str = "auto") -> MetaNeXt:
    """Return an inference copy of ``model`` with BatchNorm, mixer biases and LayerScale folded (module docstring).

    Args:
        model: a :class:`~inceptionnext.models.metanext.MetaNeXt` (any variant of this package, classifier or
            backbone; trained or freshly built).
        inplace: modify ``model`` itself instead of a deep copy.
        primitive: how the block MLPs run on channels-last maps, see :class:`FusedMlp`.

    The result is in eval mode. For the fastest CPU inference also convert model and input to channels-last
    (``model.to(memory_format=torch.channels_last)``), which is what ``inceptionnext benchmark`` does. Its reusable
    buffers live in ``model.workspace`` (:class:`Workspace`), freed by :func:`release_workspace`. Triton mixers
    (:class:`~inceptionnext.layers.TritonInceptionDWConv2d`) stay Triton mixers.
    """
    if not isinstance(model, MetaNeXt):
        raise TypeError(
            f"fuse() takes a MetaNeXt model of this package, got {type(model).__name__}; "
            "build it with inceptionnext.create_model(...)"
        )
    if is_fused(model):
        return model
    if primitive not in ("auto", "linear", "conv"):  # before the deep copy
        raise ConfigError(f"primitive must be 'auto', 'linear' or 'conv', got {primitive!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    workspace = model.workspace = Workspace()  # shared by every block: one block's buffers are free for the next

    stem = list(model.stem)
    if len(stem) == 2 and isinstance(stem[1], nn.BatchNorm2d):
        conv = stem[0]
        _assign(conv, *_fold_output_affine(conv.weight.detach(), conv.bias, *_bn_scale_shift(stem[1])))
        model.stem = nn.Sequential(conv)

    for stage in model.stages:
        if isinstance(stage.downsample, nn.Sequential):
            norm, conv = stage.downsample
            if isinstance(norm, nn.BatchNorm2d):
                scale, shift = _bn_scale_shift(norm)
            else:
                affine = _ln_affine(norm)
                scale, shift = affine if affine is not None else (None, None)
            if scale is not None:
                if conv.padding != (0, 0) and conv.padding != 0:
                    raise ValueError("cannot fold a norm into a padded downsampling convolution")
                _assign(conv, *_fold_input_affine(conv.weight.detach(), conv.bias, scale, shift))
            first = nn.Identity() if isinstance(norm, nn.BatchNorm2d) else _affine_free(norm)
            stage.downsample = nn.Sequential(first, conv)
        stage.blocks = nn.Sequential(*(_fuse_block(b, primitive, workspace) for b in stage.blocks))
        stage.grad_checkpointing = False

    if not model.features_only and not isinstance(model.head, nn.Identity):
        _fuse_head(model.head)
    model.fused = True
    return model.eval()
