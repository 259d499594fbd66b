"""Fused dense-positive matching of DenseCL, Triton.

For every image n and query position i (S^2 positions of the C5 map):
    j*(i)   = argmax_j cos(q_b[n, :, i], k_b[n, :, j])        (first j on ties, like torch.max)
    l_pos_i = q_grid[n, :, i] . k_grid[n, :, j*(i)]

The eager chain (two F.normalize, bmm, argmax, gather, multiply, sum) makes several passes
over the N x C x S^2 backbone features, in fp32. Here one program per (image, block of query
positions) streams q_b and k_b once through SRAM in BLOCK_C-channel slices, accumulates the
S^2 x S^2 similarity in fp32 with tl.dot, and does argmax, gather and dot in registers.

Normalisation: argmax over j of <q_i, k_j> / (|q_i| |k_j|) does not depend on |q_i| > 0, and
a zero q_i gives an all-zero row either way (index 0, as the reference), so only the key
norms are computed. Norms are clamped at 1e-12 like F.normalize.

Gradient flows to q_grid only (grad = g * k_grid[:, :, j*]), as in the reference: the key
side is constant and nothing flows through the argmax. That backward is a gather, done with
torch ops in the registered autograd formula.
"""
import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    arch_family,
    autotune_configs,
    can_run_on,
    cast,
    device_guard,
    device_index,
    dot_precision,
    next_power_of_2,
    tiles_to_try,
    upcast_for_interpreter,
    width_of,
    SUPPORTED_DTYPES,
)

# Largest key tile. At 224 px S^2 = 49 fits one tile; larger maps loop over key tiles with a
# running (max, argmax). The interpreter uses 16 so that small tests cross key tiles.
_MAX_BLOCK_K = 16 if INTERPRET else 64


# (BLOCK_Q, BLOCK_C, num_warps, num_stages) the autotuner may try, per (GPU family, width of
# the C5 features). Every entry compiles at C = 2048, S^2 = 49 with no register spill and fits
# shared memory, for the strides a real forward hands over in both model memory formats
# (perf/aot.py records them: channels-last C5 maps flatten to strides (C·S², 1, C), contiguous
# ones to (C·S², S², 1); perf/AOT_SM90.md, tests/test_kernels_aot.py), under both Tritons the
# project runs on (3.8, CI's, and 3.6, the lent GPU machines'). The model hands over bf16
# C5 maps under autocast; fp32 features compare through three-pass TF32 (tf32x3), whose split
# operands need many registers. Left out because they spill on one of the two layouts:
# sm_90 16-bit (16, 128, 4, 3) (channels-last, 12 B); sm_90 fp32 (64, 32, 4, 3), (16, 64, 4, 3),
# (64, 64, 8, 3) (contiguous, 40-280 B at 255 registers), replaced by 8-warp or 32-channel tiles
# that fit both; sm_80 fp32 (16, 32, 4, 3) (channels-last) and (32, 32, 4, 3) (contiguous).
# Left out because they spill under Triton 3.6 only (channels-last, 8 B stores / 4 B loads; 3.8
# allocates them without): sm_90 16-bit (32, 64, 4, 4), replaced by (32, 64, 8, 3) (80 registers
# channels-last, 106-120 contiguous, under both), and sm_90 fp32 (16, 32, 4, 3), replaced by
# (16, 32, 8, 3) (94-121 channels-last, 172-173 contiguous); (32, 64, 4, 3) spills there too;
# sm_80 16-bit (64, 64, 4, 3) (fp16 only, 8 B), replaced by (64, 64, 8, 3) (100-115 registers
# channels-last, 105-172 contiguous).
TILES = {
    ("sm90", "16bit"): [(64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (32, 64, 8, 3)],
    ("sm90", "fp32"): [(64, 32, 8, 3), (32, 32, 8, 3), (16, 32, 8, 3)],
    ("sm80", "16bit"): [(64, 64, 8, 3), (64, 128, 4, 3), (32, 128, 4, 3), (32, 64, 4, 4), (16, 128, 4, 3)],
    ("sm80", "fp32"): [(16, 16, 4, 3), (32, 16, 4, 3), (32, 32, 8, 3)],
}


def _configs():
    gpu = [triton.Config({"BLOCK_Q": bq, "BLOCK_C": bc}, num_warps=w, num_stages=s)
           for bq, bc, w, s in sorted({c for cs in TILES.values() for c in cs})]
    # Interpreter: small tiles so that the CPU tests' maps cross several query and channel tiles.
    return autotune_configs(gpu, triton.Config({"BLOCK_Q": 16, "BLOCK_C": 32}, num_warps=4, num_stages=1))


def _prune(configs, named_args, **kwargs):
    """Keep the configs listed for this GPU and the features' dtype (see TILES)."""
    if INTERPRET:
        return configs
    qb = named_args["qb_ptr"]
    allowed = set(tiles_to_try(TILES[arch_family(device_index(qb.device)), width_of(qb.dtype)]))
    return [c for c in configs
            if (c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages) in allowed]


@triton.autotune(configs=_configs(), key=["C", "S2", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dense_match_kernel(
    qb_ptr, kb_ptr, qg_ptr, kg_ptr, lpos_ptr, idx_ptr,
    C, S2, D,
    s_qb_n, s_qb_c, s_qb_s, s_kb_n, s_kb_c, s_kb_s,
    s_qg_n, s_qg_d, s_qg_s, s_kg_n, s_kg_d, s_kg_s,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < S2
    qb_base = qb_ptr + n * s_qb_n
    kb_base = kb_ptr + n * s_kb_n

    best_val = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_Q], tl.int32)
    for k0 in range(0, S2, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < S2
        sim = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
        k_sq = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_mask = offs_c < C
            # Features are N x C x S^2: a BLOCK_C slice of all positions is one contiguous run.
            qt = tl.load(qb_base + offs_q[:, None] * s_qb_s + offs_c[None, :] * s_qb_c,
                         mask=q_mask[:, None] & c_mask[None, :], other=0.0)
            kt = tl.load(kb_base + offs_c[:, None] * s_kb_c + offs_k[None, :] * s_kb_s,
                         mask=c_mask[:, None] & k_mask[None, :], other=0.0)
            kf = kt.to(tl.float32)
            k_sq += tl.sum(kf * kf, axis=0)
            if UPCAST:
                qt = qt.to(tl.float32)
                kt = kf
            sim = tl.dot(qt, kt, sim, input_precision=DOT_PREC)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(k_sq), 1e-12)
        sim = tl.where(k_mask[None, :], sim * inv_norm[None, :], float("-inf"))
        blk_val = tl.max(sim, axis=1)
        blk_idx = tl.argmax(sim, axis=1, tie_break_left=True) + k0
        # Strictly greater: on a tie across tiles the earlier (lower) index is kept.
        better = blk_val > best_val
        best_val = tl.where(better, blk_val, best_val)
        best_idx = tl.where(better, blk_idx, best_idx)

    # Gather k_grid at the match and dot with q_grid, over D in slices.
    acc = tl.zeros([BLOCK_Q], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = (offs_d[:, None] < D) & q_mask[None, :]
        qg = tl.load(qg_ptr + n * s_qg_n + offs_d[:, None] * s_qg_d + offs_q[None, :] * s_qg_s,
                     mask=mask, other=0.0)
        kg = tl.load(kg_ptr + n * s_kg_n + offs_d[:, None] * s_kg_d + best_idx[None, :] * s_kg_s,
                     mask=mask, other=0.0)
        # The reference multiplies in q_grid's dtype after k_grid.to(q_grid.dtype); keep that
        # rounding of k_grid, but multiply and sum in fp32 (one rounding at the end).
        kg = cast(kg, qg_ptr.dtype.element_ty, INTERPRET)
        acc += tl.sum(qg.to(tl.float32) * kg.to(tl.float32), axis=0)
    out = n * S2 + offs_q
    tl.store(lpos_ptr + out, cast(acc, lpos_ptr.dtype.element_ty, INTERPRET), mask=q_mask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=q_mask)


# ----------------------------------------------------------------------------- host side


def supports(q_b, k_b, q_grid, k_grid) -> bool:
    return (
        q_b.dim() == 3 and k_b.shape == q_b.shape and q_grid.dim() == 3 and k_grid.shape == q_grid.shape
        and q_grid.shape[0] == q_b.shape[0] and q_grid.shape[2] == q_b.shape[2]
        and q_b.numel() > 0 and q_grid.shape[1] > 0
        and all(t.dtype in SUPPORTED_DTYPES for t in (q_b, k_b, q_grid, k_grid))
    )


def dense_match_forward(q_b, k_b, q_grid, k_grid):
    """Returns (l_pos N x S^2 in q_grid's dtype, index N x S^2 int64)."""
    if not supports(q_b, k_b, q_grid, k_grid):
        raise ValueError(
            f"dense_positive_logits (triton): unsupported inputs q_b {tuple(q_b.shape)} {q_b.dtype}, "
            f"k_b {tuple(k_b.shape)} {k_b.dtype}, q_grid {tuple(q_grid.shape)} {q_grid.dtype}, "
            f"k_grid {tuple(k_grid.shape)} {k_grid.dtype}; need N x C x S^2 and N x D x S^2, fp32/fp16/bf16")
    devices = {t.device for t in (q_b, k_b, q_grid, k_grid)}
    if len(devices) != 1 or not can_run_on(q_b.device):
        raise RuntimeError(f"dense_positive_logits (triton): cannot launch on {devices} "
                           "(CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)")
    if k_b.dtype != q_b.dtype:
        # tl.dot wants one dtype; the reference compares in fp32 anyway.
        q_b, k_b = q_b.float(), k_b.float()
    N, C, S2 = q_b.shape
    D = q_grid.shape[1]
    l_pos = torch.empty((N, S2), device=q_grid.device, dtype=q_grid.dtype)
    index = torch.empty((N, S2), device=q_grid.device, dtype=torch.int64)
    block_k = min(_MAX_BLOCK_K, max(16, next_power_of_2(S2)))
    block_d = min(64, max(16, next_power_of_2(D)))
    with device_guard(q_b.device):
        grid = lambda meta: (N, triton.cdiv(S2, meta["BLOCK_Q"]))
        _dense_match_kernel[grid](
            q_b, k_b, q_grid, k_grid, l_pos, index, C, S2, D,
            q_b.stride(0), q_b.stride(1), q_b.stride(2), k_b.stride(0), k_b.stride(1), k_b.stride(2),
            q_grid.stride(0), q_grid.stride(1), q_grid.stride(2),
            k_grid.stride(0), k_grid.stride(1), k_grid.stride(2),
            BLOCK_K=block_k, BLOCK_D=block_d,
            UPCAST=upcast_for_interpreter(q_b.dtype), DOT_PREC=dot_precision(q_b.dtype), INTERPRET=INTERPRET)
    return l_pos, index


# ----------------------------------------------------------------- torch.library registration


@torch.library.custom_op("densecl::dense_positive_logits", mutates_args=())
def _dense_positive_logits_op(q_b: torch.Tensor, k_b: torch.Tensor, q_grid: torch.Tensor,
                              k_grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return dense_match_forward(q_b, k_b, q_grid, k_grid)


@_dense_positive_logits_op.register_fake
def _(q_b, k_b, q_grid, k_grid):
    N, _, S2 = q_grid.shape
    return q_grid.new_empty((N, S2)), q_grid.new_empty((N, S2), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    _, _, q_grid, k_grid = inputs
    _, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(k_grid, index)
    ctx.q_grid_dtype = q_grid.dtype


def _backward(ctx, grad_l_pos, _grad_index):
    k_grid, index = ctx.saved_tensors
    k_match = torch.gather(k_grid, 2, index.unsqueeze(1).expand(-1, k_grid.shape[1], -1))
    grad_q_grid = grad_l_pos.unsqueeze(1) * k_match.to(ctx.q_grid_dtype)
    return None, None, grad_q_grid.to(ctx.q_grid_dtype), None


_dense_positive_logits_op.register_autograd(_backward, setup_context=_setup_context)


def dense_positive_logits_triton(q_b, k_b, q_grid, k_grid):
    """Fused dense positives: same outputs and q_grid gradient as
    kernels.reference.dense_positive_logits_ref."""
    return torch.ops.densecl.dense_positive_logits(q_b.detach(), k_b.detach(), q_grid, k_grid.detach())


# The autotuned kernels, whose chosen config perf.bench_kernels reports.
AUTOTUNED_KERNELS = (_dense_match_kernel,)
