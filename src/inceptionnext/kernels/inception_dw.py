"""Fused Triton kernels for the Inception depthwise convolution (paper Sec. 3.2, Algorithm 1).

The PyTorch module splits the channels into (identity, square k_s x k_s, band 1 x k_b, band k_b x 1) groups with
``torch.split``, runs three depthwise ``nn.Conv2d`` and concatenates the results with ``torch.cat``: the input is
read by the split/conv kernels and the output written twice (conv outputs, then the concatenation), plus one copy of
the identity group. Here the whole mixer is ONE kernel launch that reads every input element once (neighbouring
taps hit the cache) and writes every output element once, directly at its final channel.

Launch grid and tiling
    grid = (pixel tiles, channel blocks, batch). A program owns a tile of ``BLOCK_P`` flattened pixels
    (``p = h * W + w`` of one image) by ``BLOCK_C`` channels. Channel blocks never straddle two groups: blocks are
    enumerated group by group (``ceil(c_id / BLOCK_C)`` identity blocks, then ``ceil(g / BLOCK_C)`` blocks for each
    of the three conv groups), so each program decodes ONE branch from its block index and takes a uniform
    (non-divergent) scalar branch: identity copy, square conv, 1 x k_b conv or k_b x 1 conv. The tap loops are
    unrolled (kernel sizes and dilations are compile-time constants); "same" zero padding is a load mask.
    All addressing goes through the tensors' strides, so NCHW and channels_last (and the strides of an incoming
    gradient) are handled by the same code; Triton specialises unit strides, so the contiguous axis is vectorised.
    The tile shape follows the layout: NCHW has contiguous pixels (tall tiles: many pixels, few channels),
    channels_last has contiguous channels (wide tiles: up to 32 channels by 1024 / BLOCK_C pixels). The block width
    follows the conv group width g (the costly part); identity blocks reuse it. Tiles hold 1024 elements for 4 warps
    (8 per thread): with the unrolled taps, 2048-element tiles made the sm_90 backward spill registers (ptxas -v).
    Accumulation is always fp32; the output is stored in the input dtype, in the input's memory format.

Backward
    y = x * k (cross-correlation with zero padding) gives dx = dy * flip(k): the same depthwise conv, with the tap
    offsets negated, so the backward kernel reuses the forward tap loop with ``SIGN = -1``; identity channels copy
    the gradient through. The weight gradient of tap t of channel c is sum_{b, p} dy[b, c, p] * x[b, c, p + off_t]
    and the bias gradient sum_{b, p} dy[b, c, p]: reductions over batch and space. They are fused into the same
    backward kernel (which already holds the dy tile) as a deterministic two-stage reduction: stage 1 writes one
    fp32 partial per (image, pixel tile) row and (channel, tap) column, stage 2 (``_colsum_kernel``) sums the rows in
    fp32. No atomics, so gradients are bitwise reproducible. The partials are cast to the weights' dtype at the end.

Host API
    The kernels know nothing of the package's modules: :func:`supports` and :func:`inception_dwconv` take the input,
    the channel split ``(identity, g, g, g)`` and the three ``nn.Conv2d`` (square, 1 x k_b, k_b x 1) in channel
    order. :class:`inceptionnext.layers.TritonInceptionDWConv2d` is the module that calls them.

Triton is imported guardedly: ``import inceptionnext.kernels`` works without it and ``supports()`` is then False.
``TRITON_INTERPRET=1`` must be set before this module is imported to run the kernels on CPU tensors (tests).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_ERROR: str | None = None
except ImportError as err:  # keep the module importable; the kernels below are never launched then
    _TRITON_ERROR = str(err)
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=object)

__all__ = ["triton_available", "supports", "inception_dwconv", "launch_counts"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LAUNCHES: Counter[str] = Counter()  # kernel name -> launches in this process (lets tests prove the kernels ran)


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_tap(base, c_off, hh, ww, H, W, s_h, s_w, tile_mask):
    """fp32 tile of ``base[c, hh, ww]``; zero outside the image (the "same" zero padding)."""
    inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    ptrs = base + (hh * s_h + ww * s_w)[:, None] + c_off[None, :]
    return tl.load(ptrs, mask=inside[:, None] & tile_mask, other=0.0).to(tl.float32)


@triton.jit
def _dw_conv(
    base, c_off, h, w, H, W, s_h, s_w, tile_mask, wt, c_loc, c_mask,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Depthwise KH x KW conv of a tile; weights ``wt[c, 0, i, j]`` contiguous. SIGN=-1 flips the kernel."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KH):
        hh = h + SIGN * (i * DH - (KH - 1) * DH // 2)
        for j in tl.static_range(KW):
            ww = w + SIGN * (j * DW - (KW - 1) * DW // 2)
            k = tl.load(wt + c_loc * (KH * KW) + (i * KW + j), mask=c_mask, other=0.0).to(tl.float32)
            acc += _load_tap(base, c_off, hh, ww, H, W, s_h, s_w, tile_mask) * k[None, :]
    return acc


@triton.jit
def _dw_conv_bwd(
    dy_base, dy_coff, x_base, x_coff, dy_c, h, w, H, W, sdy_h, sdy_w, sx_h, sx_w, tile_mask, wt, c_loc, c_mask,
    part_row, col0,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Returns the dx tile (dy conv flipped kernel) and stores the per-tap weight-grad partials of this tile."""
    dx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(KH):
        oh = i * DH - (KH - 1) * DH // 2
        for j in tl.static_range(KW):
            ow = j * DW - (KW - 1) * DW // 2
            k = tl.load(wt + c_loc * (KH * KW) + (i * KW + j), mask=c_mask, other=0.0).to(tl.float32)
            dx += _load_tap(dy_base, dy_coff, h - oh, w - ow, H, W, sdy_h, sdy_w, tile_mask) * k[None, :]
            xs = _load_tap(x_base, x_coff, h + oh, w + ow, H, W, sx_h, sx_w, tile_mask)
            tl.store(part_row + col0 + c_loc * (KH * KW) + (i * KW + j), tl.sum(dy_c * xs, axis=0), mask=c_mask)
    return dx


@triton.jit
def _decode_block(pid_c, n_blk_id, n_blk_br, C_ID, GC, BLOCK_C: tl.constexpr):
    """Channel block -> (branch 0..3 = identity/square/w-band/h-band, channel index in the group, mask, channel)."""
    is_conv = pid_c >= n_blk_id
    r = tl.maximum(pid_c - n_blk_id, 0)
    branch = tl.where(is_conv, 1 + r // n_blk_br, 0)
    blk = tl.where(is_conv, r % n_blk_br, pid_c)
    c_loc = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_loc < tl.where(is_conv, GC, C_ID)
    c = tl.where(is_conv, C_ID + (branch - 1) * GC, 0) + c_loc
    return branch, c_loc, c_mask, c


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, w_hw, b_hw, w_w, b_w, w_h, b_h,
    H, W, C_ID, GC, n_blk_id, n_blk_br,
    sx_b, sx_c, sx_h, sx_w, sy_b, sy_c, sy_h, sy_w,
    KS_H: tl.constexpr, KS_W: tl.constexpr, DS_H: tl.constexpr, DS_W: tl.constexpr,
    KB_W: tl.constexpr, DB_W: tl.constexpr, KB_H: tl.constexpr, DB_H: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    branch, c_loc, c_mask, c = _decode_block(pid_c, n_blk_id, n_blk_br, C_ID, GC, BLOCK_C)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    h, w = p // W, p % W
    tile_mask = (p < H * W)[:, None] & c_mask[None, :]

    x_base = x_ptr + b.to(tl.int64) * sx_b
    x_coff = c * sx_c
    y_ptrs = y_ptr + b.to(tl.int64) * sy_b + (h * sy_h + w * sy_w)[:, None] + (c * sy_c)[None, :]

    if branch == 0:  # identity group: plain copy
        out = _load_tap(x_base, x_coff, h, w, H, W, sx_h, sx_w, tile_mask)
    elif branch == 1:  # square k_s x k_s
        out = _dw_conv(x_base, x_coff, h, w, H, W, sx_h, sx_w, tile_mask, w_hw, c_loc, c_mask,
                       KS_H, KS_W, DS_H, DS_W, 1, BLOCK_P, BLOCK_C)  # fmt: skip
        out += tl.load(b_hw + c_loc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    elif branch == 2:  # horizontal band 1 x k_b
        out = _dw_conv(x_base, x_coff, h, w, H, W, sx_h, sx_w, tile_mask, w_w, c_loc, c_mask,
                       1, KB_W, 1, DB_W, 1, BLOCK_P, BLOCK_C)  # fmt: skip
        out += tl.load(b_w + c_loc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    else:  # vertical band k_b x 1
        out = _dw_conv(x_base, x_coff, h, w, H, W, sx_h, sx_w, tile_mask, w_h, c_loc, c_mask,
                       KB_H, 1, DB_H, 1, 1, BLOCK_P, BLOCK_C)  # fmt: skip
        out += tl.load(b_h + c_loc, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, part_ptr, w_hw, w_w, w_h,
    H, W, C_ID, GC, n_blk_id, n_blk_br, n_cols,
    sdy_b, sdy_c, sdy_h, sdy_w, sx_b, sx_c, sx_h, sx_w, sdx_b, sdx_c, sdx_h, sdx_w,
    KS_H: tl.constexpr, KS_W: tl.constexpr, DS_H: tl.constexpr, DS_W: tl.constexpr,
    KB_W: tl.constexpr, DB_W: tl.constexpr, KB_H: tl.constexpr, DB_H: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_p, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    branch, c_loc, c_mask, c = _decode_block(pid_c, n_blk_id, n_blk_br, C_ID, GC, BLOCK_C)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    h, w = p // W, p % W
    tile_mask = (p < H * W)[:, None] & c_mask[None, :]

    dy_base = dy_ptr + b.to(tl.int64) * sdy_b
    dy_coff = c * sdy_c
    x_base = x_ptr + b.to(tl.int64) * sx_b
    x_coff = c * sx_c
    dx_ptrs = dx_ptr + b.to(tl.int64) * sdx_b + (h * sdx_h + w * sdx_w)[:, None] + (c * sdx_c)[None, :]
    # partials: one row per (image, pixel tile); columns [w_hw | w_w | w_h | b_hw | b_w | b_h], channel-major taps
    part_row = part_ptr + (b.to(tl.int64) * tl.num_programs(0) + pid_p) * n_cols
    col_w = GC * KS_H * KS_W
    col_h = col_w + GC * KB_W
    col_b = col_h + GC * KB_H

    dy_c = _load_tap(dy_base, dy_coff, h, w, H, W, sdy_h, sdy_w, tile_mask)  # dy at the tile's own pixels
    if branch == 0:  # identity: the gradient passes through
        dx = dy_c
    else:
        tl.store(part_row + col_b + (branch - 1) * GC + c_loc, tl.sum(dy_c, axis=0), mask=c_mask)  # bias grad
        if branch == 1:
            dx = _dw_conv_bwd(dy_base, dy_coff, x_base, x_coff, dy_c, h, w, H, W, sdy_h, sdy_w, sx_h, sx_w,
                              tile_mask, w_hw, c_loc, c_mask, part_row, 0,
                              KS_H, KS_W, DS_H, DS_W, BLOCK_P, BLOCK_C)  # fmt: skip
        elif branch == 2:
            dx = _dw_conv_bwd(dy_base, dy_coff, x_base, x_coff, dy_c, h, w, H, W, sdy_h, sdy_w, sx_h, sx_w,
                              tile_mask, w_w, c_loc, c_mask, part_row, col_w,
                              1, KB_W, 1, DB_W, BLOCK_P, BLOCK_C)  # fmt: skip
        else:
            dx = _dw_conv_bwd(dy_base, dy_coff, x_base, x_coff, dy_c, h, w, H, W, sdy_h, sdy_w, sx_h, sx_w,
                              tile_mask, w_h, c_loc, c_mask, part_row, col_h,
                              KB_H, 1, DB_H, 1, BLOCK_P, BLOCK_C)  # fmt: skip
    tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _colsum_kernel(part_ptr, out_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stage 2 of the weight-grad reduction: out[j] = sum_i part[i, j] in fp32 (fixed order, deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        acc += tl.load(part_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=cols < n_cols)


# ------------------------------------------------------------------------------------------------------ host side
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """Triton importable and something to run it on: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    return _TRITON_ERROR is None and (torch.cuda.is_available() or _interpret())


def launch_counts() -> dict[str, int]:
    """Triton kernel launches made by this module in this process, by kernel name."""
    return dict(_LAUNCHES)


@dataclass(frozen=True)
class _Config:
    c_id: int  # identity channels (first)
    gc: int  # channels of each conv branch
    ks: tuple[int, int]  # square kernel (h, w)
    ds: tuple[int, int]  # square dilation (h, w)
    kb_w: int  # 1 x kb_w band
    db_w: int
    kb_h: int  # kb_h x 1 band
    db_h: int


def _same_conv(conv: torch.nn.Module, channels: int) -> bool:
    """Depthwise, stride 1, zero "same" padding, odd kernel, with bias."""
    if not isinstance(conv, torch.nn.Conv2d) or conv.bias is None or conv.padding_mode != "zeros":
        return False
    if conv.groups != channels or conv.in_channels != channels or conv.out_channels != channels:
        return False
    if tuple(conv.stride) != (1, 1) or isinstance(conv.padding, str):
        return False
    return all(k % 2 == 1 and p == d * (k - 1) // 2 for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding))


def _config(split_sizes: Sequence[int], convs: Sequence[torch.nn.Conv2d]) -> _Config:
    hw, bw, bh = convs
    return _Config(
        c_id=split_sizes[0],
        gc=split_sizes[1],
        ks=tuple(hw.kernel_size),
        ds=tuple(hw.dilation),
        kb_w=bw.kernel_size[1],
        db_w=bw.dilation[1],
        kb_h=bh.kernel_size[0],
        db_h=bh.dilation[0],
    )


def supports(x: torch.Tensor, split_sizes: Sequence[int], convs: Sequence[torch.nn.Module]) -> bool:
    """True when :func:`inception_dwconv` computes ``cat(x_id, square(x_1), band_w(x_2), band_h(x_3))`` exactly.

    Args:
        x: the (B, C, H, W) input.
        split_sizes: channels of the (identity, square, horizontal band, vertical band) groups, identity first;
            the three conv groups must have the same width.
        convs: the depthwise ``nn.Conv2d`` of the square (k_s x k_s), horizontal (1 x k_b) and vertical (k_b x 1)
            groups, in that order: stride 1, zero "same" padding, odd kernels, with bias.
    """
    if not triton_available() or len(split_sizes) != 4 or len(convs) != 3:
        return False
    gc = split_sizes[1]
    if tuple(split_sizes[1:]) != (gc, gc, gc) or split_sizes[0] < 0 or gc < 1:
        return False
    if not all(_same_conv(conv, gc) for conv in convs):
        return False
    if convs[1].kernel_size[0] != 1 or convs[2].kernel_size[1] != 1:
        return False
    if x.dim() != 4 or x.shape[1] != sum(split_sizes) or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    device_ok = x.device.type == "cuda" or (x.device.type == "cpu" and _interpret())
    params = [p for conv in convs for p in (conv.weight, conv.bias)]
    return device_ok and all(p.device == x.device and p.dtype in _DTYPES for p in params)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tiles(x: torch.Tensor, cfg: _Config, tiles: tuple[int, int] | None) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for this layout, unless ``tiles`` gives them."""
    if tiles is not None:
        return tiles
    hw = _next_pow2(x.shape[2] * x.shape[3])
    if _interpret():  # few, large programs: the interpreter's cost is per program and per op, not per element
        return min(1024, hw), min(64, _next_pow2(max(cfg.gc, min(cfg.c_id, 64))))
    # blocks are sized for the conv groups (the costly part); identity blocks reuse the width
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels_last: channels are contiguous -> wide tiles
        block_c = min(32, _next_pow2(cfg.gc))
        return min(1024 // block_c, hw), block_c
    return min(256, hw), min(4, _next_pow2(cfg.gc))  # NCHW: pixels are contiguous -> tall tiles


def _grid(x: torch.Tensor, cfg: _Config, block_p: int, block_c: int) -> tuple[tuple[int, int, int], int, int]:
    b, _, h, w = x.shape
    n_blk_id = triton.cdiv(cfg.c_id, block_c)
    n_blk_br = triton.cdiv(cfg.gc, block_c)
    return (triton.cdiv(h * w, block_p), n_blk_id + 3 * n_blk_br, b), n_blk_id, n_blk_br


def _constexprs(cfg: _Config) -> dict[str, int]:
    return dict(
        KS_H=cfg.ks[0], KS_W=cfg.ks[1], DS_H=cfg.ds[0], DS_W=cfg.ds[1],
        KB_W=cfg.kb_w, DB_W=cfg.db_w, KB_H=cfg.kb_h, DB_H=cfg.db_h,
    )  # fmt: skip


def _forward(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], cfg: _Config, tiles: tuple[int, int] | None
) -> torch.Tensor:
    w_hw, b_hw, w_w, b_w, w_h, b_h = weights
    y = torch.empty_like(x)  # keeps the memory format (NCHW or channels_last)
    block_p, block_c = _tiles(x, cfg, tiles)
    grid, n_blk_id, n_blk_br = _grid(x, cfg, block_p, block_c)
    _fwd_kernel[grid](
        x, y, w_hw, b_hw, w_w, b_w, w_h, b_h,
        x.shape[2], x.shape[3], cfg.c_id, cfg.gc, n_blk_id, n_blk_br,
        *x.stride(), *y.stride(),
        **_constexprs(cfg), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    _LAUNCHES["fwd"] += 1
    return y


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_hw: torch.Tensor,
    w_w: torch.Tensor,
    w_h: torch.Tensor,
    cfg: _Config,
    tiles: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, fp32 column sums [w_hw | w_w | w_h | b_hw | b_w | b_h])."""
    dx = torch.empty_like(x)
    block_p, block_c = _tiles(x, cfg, tiles)
    grid, n_blk_id, n_blk_br = _grid(x, cfg, block_p, block_c)
    n_cols = cfg.gc * (cfg.ks[0] * cfg.ks[1] + cfg.kb_w + cfg.kb_h + 3)
    n_rows = grid[0] * grid[2]
    part = torch.empty((n_rows, n_cols), device=x.device, dtype=torch.float32)  # every entry is written once
    _bwd_kernel[grid](
        dy, x, dx, part, w_hw, w_w, w_h,
        x.shape[2], x.shape[3], cfg.c_id, cfg.gc, n_blk_id, n_blk_br, n_cols,
        *dy.stride(), *x.stride(), *dx.stride(),
        **_constexprs(cfg), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    _LAUNCHES["bwd"] += 1
    sums = torch.empty(n_cols, device=x.device, dtype=torch.float32)
    block_n = 64
    block_r = min(64, _next_pow2(n_rows)) if not _interpret() else min(1024, _next_pow2(n_rows))
    _colsum_kernel[(triton.cdiv(n_cols, block_n),)](part, sums, n_rows, n_cols, BLOCK_R=block_r, BLOCK_N=block_n)
    _LAUNCHES["colsum"] += 1
    return dx, sums


class _InceptionDWFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        w_hw: torch.Tensor,
        b_hw: torch.Tensor,
        w_w: torch.Tensor,
        b_w: torch.Tensor,
        w_h: torch.Tensor,
        b_h: torch.Tensor,
        cfg: _Config,
        tiles: tuple[int, int] | None,
    ) -> torch.Tensor:
        weights = tuple(t.contiguous() for t in (w_hw, b_hw, w_w, b_w, w_h, b_h))
        ctx.cfg, ctx.tiles = cfg, tiles
        ctx.param_meta = [(t.shape, t.dtype) for t in (w_hw, w_w, w_h, b_hw, b_w, b_h)]
        ctx.save_for_backward(x, weights[0], weights[2], weights[4])
        return _forward(x, weights, cfg, tiles)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_hw, w_w, w_h = ctx.saved_tensors
        dx, sums = _backward(dy, x, w_hw, w_w, w_h, ctx.cfg, ctx.tiles)
        sizes = [torch.Size(shape).numel() for shape, _ in ctx.param_meta]
        g_w_hw, g_w_w, g_w_h, g_b_hw, g_b_w, g_b_h = (
            s.view(shape).to(dtype) for s, (shape, dtype) in zip(sums.split(sizes), ctx.param_meta)
        )
        return dx, g_w_hw, g_b_hw, g_w_w, g_b_w, g_w_h, g_b_h, None, None


def inception_dwconv(
    x: torch.Tensor,
    split_sizes: Sequence[int],
    convs: Sequence[torch.nn.Conv2d],
    *,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fused ``cat(x_id, square(x_1), band_w(x_2), band_h(x_3))`` over the ``split_sizes`` groups of ``x``.

    Check :func:`supports` first (same arguments). Differentiable: gradients land in the convolutions' ``weight`` and
    ``bias`` and in ``x``. Under autocast an fp32 input is cast to the autocast dtype first (as the convolutions would
    be); weights are read in their own dtype and everything accumulates in fp32. ``tiles`` forces the
    ``(BLOCK_P, BLOCK_C)`` tile shape (tests use it to split small images into several ragged tiles); by default it
    follows the layout.
    """
    if not supports(x, split_sizes, convs):
        raise ValueError("inception_dwconv: unsupported input or convolutions; check supports(...) first")
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    hw, bw, bh = convs
    cfg = _config(split_sizes, convs)
    return _InceptionDWFunction.apply(x, hw.weight, hw.bias, bw.weight, bw.bias, bh.weight, bh.bias, cfg, tiles)
