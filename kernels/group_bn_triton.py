"""Grouped batch normalisation (statistics per group of consecutive images), Triton.

The activation x (N x C x H x W) is read as G groups of n = N / G consecutive images; per
(group, channel) the statistics run over the group's n·H·W values. In either dense memory format
a group is one contiguous block of n·C·H·W elements, so no copy and no per-group launch is
needed; inside a group a value sits at
    outer · s_outer + inner · s_inner + c · s_c
channels-last: one run of INNER = n·H·W rows, s_inner = C, s_c = 1 (tile rows x channels,
               contiguous along channels);
contiguous:    OUTER = n images of INNER = H·W positions, s_inner = 1, s_c = H·W (contiguous
               along positions).
Both layouts run natively (converting would cost two copies of every activation, the very cost
this replaces); any other strides are made contiguous first. Triton specialises a stride of 1,
so each layout gets loads that are contiguous along its own unit-stride axis.

A group's (outer, inner block) tiles are dealt to S programs per (group, channel block):

forward   _stats_kernel     per program: count, mean and M2 of its tiles, merged tile by tile
                            with Chan's formula (each tile centred on its own mean in registers:
                            no E[x²] - E[x]² cancellation, sound for bf16 inputs with large means)
          _finalize_kernel  merges the S partials in one tile -> mean, invstd per (group, channel),
                            and the running-stat targets (mean of the group means, mean of the
                            unbiased group variances)
          _normalize_kernel y = (x - mean) · invstd · weight + bias, optionally ReLU'd
backward  _bwd_reduce_kernel    partial sums of dy and dy · xhat (dy masked by y > 0 with ReLU)
          _bwd_finalize_kernel  per (group, channel) sums, and dweight / dbias (sums over groups)
          _bwd_dx_kernel        dx = weight · invstd · (dy - mean(dy) - xhat · mean(dy · xhat))

Accumulation in fp32 (fp64 for fp64 inputs, which the tests use to check the formulas tightly).
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, can_run_on, cast, device_guard, device_index, next_power_of_2, sm_count
from .reference import dense_memory_format as memory_format_of

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Elements per tile. Channels-last: 4,096 (32 a thread at 4 warps, rows of 64 contiguous channels,
# vectorised loads: at most 128 registers on sm_90 / sm_80, perf/AOT_SM90.md). Contiguous: 1,024,
# because maps of 7 x 7 or 14 x 14 positions give runs that are not 16-aligned, so every element
# needs its own address: 4,096-element tiles took 255 registers and spilled 40-1,900 bytes there.
# The interpreter uses 256 so that the CPU tests' small maps cross several tiles and programs.
_TILE_ELEMS = 256 if INTERPRET else 4096
_TILE_ELEMS_CONTIGUOUS = 256 if INTERPRET else 1024
_MAX_BLOCK_C = 16 if INTERPRET else 64      # channels-last: channels a tile spans
_MAX_BLOCK_INNER = 16 if INTERPRET else 256  # contiguous: positions a tile spans
# Programs per SM aimed at by the split of a group's tiles (memory-bound kernels: several
# resident programs per SM hide the load latency). The interpreter asks for 8 programs in all,
# so that tests merge several partials per (group, channel).
_PROGRAMS_PER_SM = 4
NUM_WARPS = 4
# The finalize kernels hold the S partials of a block of channels in one tile of at most this many
# elements (S is at most a few hundred: the plan's programs over groups x channel blocks), at most
# 64 channels wide: 8 x 128 spilled 8 bytes on sm_90 (40 registers; ptxas), 8 x 64 does not.
_FINALIZE_ELEMS = 2048
_FINALIZE_MAX_BLOCK_C = 64


def finalize_blocks(splits: int) -> tuple:
    """(BLOCK_S, BLOCK_C) of the finalize kernels for `splits` partials per (group, channel)."""
    block_s = max(2, next_power_of_2(splits))
    return block_s, max(1, min(_FINALIZE_MAX_BLOCK_C, _FINALIZE_ELEMS // block_s))


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> bool:
    return (x.dim() == 4 and x.dtype in SUPPORTED_DTYPES and x.numel() > 0 and groups >= 1
            and x.shape[0] % groups == 0 and weight.shape == bias.shape == (x.shape[1],)
            and weight.dtype in SUPPORTED_DTYPES and bias.dtype in SUPPORTED_DTYPES)


@functools.lru_cache(maxsize=1024)
def plan(shape, channels_last: bool, groups: int, programs: int):
    """Launch geometry: (OUTER, INNER, s_g, s_outer, s_inner, s_c, BLOCK_R, BLOCK_C, NBLK, T, IPP, S)
    for an N x C x H x W activation: T tiles per (group, channel block), IPP of them per program,
    S programs per (group, channel block); `programs` is how many programs to aim for."""
    N, C, H, W = shape
    n, HW = N // groups, H * W
    if channels_last:
        outer, inner, s_outer, s_inner, s_c = 1, n * HW, 0, C, 1
        block_c = min(_MAX_BLOCK_C, max(4, next_power_of_2(C)))
        block_r = max(4, min(_TILE_ELEMS // block_c, next_power_of_2(inner)))
    else:
        outer, inner, s_outer, s_inner, s_c = n, HW, C * HW, 1, HW
        block_r = min(_MAX_BLOCK_INNER, max(4, next_power_of_2(inner)))
        block_c = max(1, min(_TILE_ELEMS_CONTIGUOUS // block_r, next_power_of_2(C)))
    nblk = triton.cdiv(inner, block_r)
    tiles = outer * nblk
    per_slot = groups * triton.cdiv(C, block_c)
    splits = min(tiles, max(1, triton.cdiv(programs, per_slot)))
    ipp = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, ipp)
    return outer, inner, n * C * HW, s_outer, s_inner, s_c, block_r, block_c, nblk, tiles, ipp, splits


def _programs(device: torch.device) -> int:
    return 8 if device.type != "cuda" else _PROGRAMS_PER_SM * sm_count(device_index(device))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _tile(g, t, INNER, NBLK, s_g, s_outer, s_inner, s_c, offs_c, c_mask, BLOCK_R: tl.constexpr):
    """Element offsets, mask and row count of tile t of group g (int64: activations may pass
    2^31 elements)."""
    o = t // NBLK
    b = t % NBLK
    offs_r = b * BLOCK_R + tl.arange(0, BLOCK_R)
    off = (g.to(tl.int64) * s_g + o.to(tl.int64) * s_outer
           + offs_r[:, None].to(tl.int64) * s_inner + offs_c[None, :].to(tl.int64) * s_c)
    mask = (offs_r[:, None] < INNER) & c_mask[None, :]
    return off, mask, tl.minimum(INNER - b * BLOCK_R, BLOCK_R)


@triton.jit
def _stats_kernel(x_ptr, pmean_ptr, pm2_ptr, pcnt_ptr, C, INNER, NBLK, T, IPP, S, s_g, s_outer, s_inner, s_c,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    gs = tl.program_id(0)
    g = gs // S
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    cnt = tl.zeros([BLOCK_C], ACC)
    t0 = (gs % S) * IPP
    for t in range(t0, tl.minimum(t0 + IPP, T)):
        off, mask, rows = _tile(g, t, INNER, NBLK, s_g, s_outer, s_inner, s_c, offs_c, c_mask, BLOCK_R)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        tcnt = rows.to(ACC)
        tmean = tl.sum(xt, axis=0) / tcnt
        d = tl.where(mask, xt - tmean[None, :], 0.0)
        tm2 = tl.sum(d * d, axis=0)
        new = cnt + tcnt
        delta = tmean - mean
        mean += delta * (tcnt / new)
        m2 += tm2 + delta * delta * (cnt * tcnt / new)
        cnt = new
    out = gs * C + offs_c
    tl.store(pmean_ptr + out, mean, mask=c_mask)
    tl.store(pm2_ptr + out, m2, mask=c_mask)
    tl.store(pcnt_ptr + out, cnt, mask=c_mask)


@triton.jit
def _finalize_kernel(pmean_ptr, pm2_ptr, pcnt_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, G, S, C, eps,
                     BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # All S partials of a group in one tile, merged at once (no chain of S dependent steps):
    # n = sum n_s, mean = sum n_s mean_s / n, M2 = sum M2_s + sum n_s (mean_s - mean)^2, every
    # term centred, so as sound as the tile-by-tile merge.
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    c_mask = offs_c < C
    mask = (offs_s[:, None] < S) & c_mask[None, :]
    run_mean = tl.zeros([BLOCK_C], ACC)
    run_var = tl.zeros([BLOCK_C], ACC)
    for g in range(0, G):
        idx = (g * S + offs_s[:, None]) * C + offs_c[None, :]
        pc = tl.load(pcnt_ptr + idx, mask=mask, other=0.0)
        pm = tl.load(pmean_ptr + idx, mask=mask, other=0.0)
        pq = tl.load(pm2_ptr + idx, mask=mask, other=0.0)
        cnt = tl.maximum(tl.sum(pc, axis=0), 1.0)
        mean = tl.sum(pc * pm, axis=0) / cnt
        d = pm - mean[None, :]
        m2 = tl.sum(pq, axis=0) + tl.sum(pc * d * d, axis=0)
        var = m2 / cnt
        tl.store(mean_ptr + g * C + offs_c, mean, mask=c_mask)
        tl.store(invstd_ptr + g * C + offs_c, 1.0 / tl.sqrt(var + eps), mask=c_mask)
        run_mean += mean
        run_var += m2 / tl.maximum(cnt - 1.0, 1.0)   # unbiased, as BatchNorm2d's running_var
    tl.store(rmean_ptr + offs_c, run_mean / G, mask=c_mask)
    tl.store(rvar_ptr + offs_c, run_var / G, mask=c_mask)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, C, INNER, NBLK, T, IPP, S,
                      s_g, s_outer, s_inner, s_c, RELU: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    gs = tl.program_id(0)
    g = gs // S
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mu = tl.load(mean_ptr + g * C + offs_c, mask=c_mask, other=0.0)
    scale = tl.load(invstd_ptr + g * C + offs_c, mask=c_mask, other=0.0) * \
        tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    shift = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    t0 = (gs % S) * IPP
    for t in range(t0, tl.minimum(t0 + IPP, T)):
        off, mask, rows = _tile(g, t, INNER, NBLK, s_g, s_outer, s_inner, s_c, offs_c, c_mask, BLOCK_R)
        xt = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        # Centred first: x · scale + (bias - mean · scale) would cancel when |mean| >> std.
        yt = (xt - mu[None, :]) * scale[None, :] + shift[None, :]
        if RELU:
            yt = tl.maximum(yt, 0.0)
        tl.store(y_ptr + off, cast(yt, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _bwd_reduce_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, invstd_ptr, psdy_ptr, psdyx_ptr, C, INNER, NBLK, T, IPP, S,
                       s_g, s_outer, s_inner, s_c, RELU: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    gs = tl.program_id(0)
    g = gs // S
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mu = tl.load(mean_ptr + g * C + offs_c, mask=c_mask, other=0.0)
    rs = tl.load(invstd_ptr + g * C + offs_c, mask=c_mask, other=0.0)
    sdy = tl.zeros([BLOCK_C], ACC)
    sdyx = tl.zeros([BLOCK_C], ACC)
    t0 = (gs % S) * IPP
    for t in range(t0, tl.minimum(t0 + IPP, T)):
        off, mask, rows = _tile(g, t, INNER, NBLK, s_g, s_outer, s_inner, s_c, offs_c, c_mask, BLOCK_R)
        dyt = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        if RELU:
            dyt = tl.where(tl.load(y_ptr + off, mask=mask, other=0.0) > 0, dyt, 0.0)
        xhat = (tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) - mu[None, :]) * rs[None, :]
        sdy += tl.sum(dyt, axis=0)
        sdyx += tl.sum(dyt * xhat, axis=0)
    out = gs * C + offs_c
    tl.store(psdy_ptr + out, sdy, mask=c_mask)
    tl.store(psdyx_ptr + out, sdyx, mask=c_mask)


@triton.jit
def _bwd_finalize_kernel(psdy_ptr, psdyx_ptr, sdy_ptr, sdyx_ptr, dw_ptr, db_ptr, G, S, C,
                         BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                         INTERPRET: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    c_mask = offs_c < C
    mask = (offs_s[:, None] < S) & c_mask[None, :]
    dw = tl.zeros([BLOCK_C], ACC)
    db = tl.zeros([BLOCK_C], ACC)
    for g in range(0, G):
        idx = (g * S + offs_s[:, None]) * C + offs_c[None, :]
        sdy = tl.sum(tl.load(psdy_ptr + idx, mask=mask, other=0.0), axis=0)
        sdyx = tl.sum(tl.load(psdyx_ptr + idx, mask=mask, other=0.0), axis=0)
        tl.store(sdy_ptr + g * C + offs_c, sdy, mask=c_mask)
        tl.store(sdyx_ptr + g * C + offs_c, sdyx, mask=c_mask)
        dw += sdyx
        db += sdy
    tl.store(dw_ptr + offs_c, cast(dw, dw_ptr.dtype.element_ty, INTERPRET), mask=c_mask)
    tl.store(db_ptr + offs_c, cast(db, db_ptr.dtype.element_ty, INTERPRET), mask=c_mask)


@triton.jit
def _bwd_dx_kernel(dy_ptr, x_ptr, y_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, sdy_ptr, sdyx_ptr, count,
                   C, INNER, NBLK, T, IPP, S, s_g, s_outer, s_inner, s_c, RELU: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr):
    gs = tl.program_id(0)
    g = gs // S
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    stat = g * C + offs_c
    mu = tl.load(mean_ptr + stat, mask=c_mask, other=0.0)
    rs = tl.load(invstd_ptr + stat, mask=c_mask, other=0.0)
    a = rs * tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(ACC)
    mdy = tl.load(sdy_ptr + stat, mask=c_mask, other=0.0) / count
    mdyx = tl.load(sdyx_ptr + stat, mask=c_mask, other=0.0) / count
    t0 = (gs % S) * IPP
    for t in range(t0, tl.minimum(t0 + IPP, T)):
        off, mask, rows = _tile(g, t, INNER, NBLK, s_g, s_outer, s_inner, s_c, offs_c, c_mask, BLOCK_R)
        dyt = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        if RELU:
            dyt = tl.where(tl.load(y_ptr + off, mask=mask, other=0.0) > 0, dyt, 0.0)
        xhat = (tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) - mu[None, :]) * rs[None, :]
        dx = a[None, :] * (dyt - mdy[None, :] - xhat * mdyx[None, :])
        tl.store(dx_ptr + off, cast(dx, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------- host side


def _check(x, weight, bias, groups):
    if not supports(x, weight, bias, groups):
        raise ValueError(f"group_batch_norm (triton): unsupported inputs x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}, bias {tuple(bias.shape)} {bias.dtype}, groups "
                         f"{groups}; need N x C x H x W with N a multiple of groups, fp64/fp32/fp16/bf16")
    devices = {x.device, weight.device, bias.device}
    if len(devices) != 1 or not can_run_on(x.device):
        raise RuntimeError(f"group_batch_norm (triton): cannot launch on {devices} "
                           "(CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)")


def _geometry(x, groups):
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    return x, fmt, plan(tuple(x.shape), fmt == torch.channels_last, groups, _programs(x.device))


def forward(x, weight, bias, groups: int, eps: float, relu: bool):
    """(y in x's dtype and layout, mean G x C, invstd G x C, running-mean target C, running-var
    target C); statistics in fp32 (fp64 for fp64 x)."""
    _check(x, weight, bias, groups)
    x, fmt, p = _geometry(x, groups)
    outer, inner, s_g, s_outer, s_inner, s_c, block_r, block_c, nblk, tiles, ipp, splits = p
    N, C = x.shape[:2]
    acc, tl_acc = _acc_dtype(x.dtype), _tl_acc(x.dtype)
    part = torch.empty((3, groups * splits, C), device=x.device, dtype=acc)
    mean = torch.empty((groups, C), device=x.device, dtype=acc)
    invstd = torch.empty_like(mean)
    run_mean = torch.empty(C, device=x.device, dtype=acc)
    run_var = torch.empty_like(run_mean)
    y = torch.empty_like(x, memory_format=fmt)
    grid = (groups * splits, triton.cdiv(C, block_c))
    geo = (C, inner, nblk, tiles, ipp, splits, s_g, s_outer, s_inner, s_c)
    with device_guard(x.device):
        _stats_kernel[grid](x, part[0], part[1], part[2], *geo, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc,
                            num_warps=NUM_WARPS)
        block_s, block_cf = finalize_blocks(splits)
        _finalize_kernel[(triton.cdiv(C, block_cf),)](
            part[0], part[1], part[2], mean, invstd, run_mean, run_var, groups, splits, C, eps,
            BLOCK_S=block_s, BLOCK_C=block_cf, ACC=tl_acc, num_warps=NUM_WARPS)
        _normalize_kernel[grid](x, y, mean, invstd, weight, bias, *geo, RELU=relu, BLOCK_R=block_r,
                                BLOCK_C=block_c, ACC=tl_acc, INTERPRET=INTERPRET, num_warps=NUM_WARPS)
    return y, mean, invstd, run_mean, run_var


def backward(dy, x, y, mean, invstd, weight, groups: int, relu: bool):
    """(dx in x's dtype and layout, dweight, dbias in weight's dtype). y (the forward's output)
    is read only with relu, for the mask."""
    x, fmt, p = _geometry(x, groups)
    outer, inner, s_g, s_outer, s_inner, s_c, block_r, block_c, nblk, tiles, ipp, splits = p
    dy = dy.contiguous(memory_format=fmt)
    y = y.contiguous(memory_format=fmt) if relu else x
    N, C = x.shape[:2]
    acc, tl_acc = _acc_dtype(x.dtype), _tl_acc(x.dtype)
    part = torch.empty((2, groups * splits, C), device=x.device, dtype=acc)
    sums = torch.empty((2, groups, C), device=x.device, dtype=acc)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight)
    dx = torch.empty_like(x, memory_format=fmt)
    grid = (groups * splits, triton.cdiv(C, block_c))
    geo = (C, inner, nblk, tiles, ipp, splits, s_g, s_outer, s_inner, s_c)
    with device_guard(x.device):
        _bwd_reduce_kernel[grid](dy, x, y, mean, invstd, part[0], part[1], *geo, RELU=relu, BLOCK_R=block_r,
                                 BLOCK_C=block_c, ACC=tl_acc, num_warps=NUM_WARPS)
        block_s, block_cf = finalize_blocks(splits)
        _bwd_finalize_kernel[(triton.cdiv(C, block_cf),)](
            part[0], part[1], sums[0], sums[1], dweight, dbias, groups, splits, C,
            BLOCK_S=block_s, BLOCK_C=block_cf, ACC=tl_acc, INTERPRET=INTERPRET, num_warps=NUM_WARPS)
        count = float(N // groups * x.shape[2] * x.shape[3])   # values per (group, channel)
        _bwd_dx_kernel[grid](dy, x, y, dx, mean, invstd, weight, sums[0], sums[1], count, *geo, RELU=relu,
                             BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl_acc, INTERPRET=INTERPRET, num_warps=NUM_WARPS)
    return dx, dweight, dbias
