"""Queue InfoNCE, the earlier two-pass design (backward recomputes the logits), Triton.

Kept only as the comparison point for perf/bench_kernels.py (`recompute`) until the one-pass
kernel's GPU figures are on record: kernels/queue_infonce_triton.py is what the model runs.

Forward  _fwd_kernel:     grid (row blocks, K splits); online log-sum-exp per split.
         _combine_kernel: merges split partials and the positive into lse and the row loss.
Backward _bwd_kernel:     recomputes every logit tile from q and lse, p = exp(s - lse), and
                          accumulates dL/dq = g/(T M) sum_j p_ij queue_j per split.
Three matmuls over the queue (forward, recompute, p @ queue^T) and two exponentials per logit.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    LOG2E_C,
    LN2_C,
    INTERPRET,
    cast,
    autotune_configs,
    device_guard,
    dot_precision,
    next_power_of_2,
    sm_count,
    upcast_for_interpreter,
)
from .queue_infonce_triton import _load_q_tile, _load_queue_tile, cast_like_autocast, check_inputs


MAX_D = 256
# Every split covers a multiple of this many columns, so it is a multiple of any BLOCK_N
# below and every split but the last is made of whole tiles.
_SPLIT_ALIGN = 128
_MIN_COLS_PER_SPLIT = 512          # amortises the q-tile load and the epilogue of a program
_MAX_PARTIAL_BYTES = 32 << 20      # backward fp32 partial grad_q buffers, all splits together


def _configs():
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            # Chosen from sm_90 builds (ptxas, no spills for bf16 at D = 64 / 128).
            (128, 128, 8, 3),
            (128, 64, 8, 3),
            (64, 128, 4, 3),
            (64, 64, 4, 4),
            (128, 128, 8, 2),
            # Fits shared memory for every case (fp32 tiles at D = 256 included), so the
            # autotuner always has at least one config that launches.
            (64, 32, 4, 2),
        ]
    ]
    # Small tiles in the interpreter: the tests then cross several row/column tiles and tails.
    return autotune_configs(gpu, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1))


_HEURISTICS = {"EVEN_K": lambda a: a["K"] % a["BLOCK_N"] == 0}


@triton.autotune(configs=_configs(), key=["M", "K", "D"])
@triton.heuristics(_HEURISTICS)
@triton.jit
def _fwd_kernel(
    q_ptr, queue_ptr, part_ptr,
    M, K, D, cols_per_split,
    stride_qm, stride_qd, stride_kd, stride_kn,
    qk_scale,  # log2(e) / T: logits are kept in base 2 so exp2 is a single instruction
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q_tile(q_ptr, offs_m, offs_d, M, D, stride_qm, stride_qd, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)

    k_start = pid_s * cols_per_split
    k_end = tl.minimum(k_start + cols_per_split, K)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(k_start, k_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        # queue_infonce_triton hands over the queue in q's dtype; the cast only matters for
        # direct callers of queue_infonce_forward with mixed dtypes (reference: queue.to(q.dtype)).
        kt = _load_queue_tile(queue_ptr, offs_d, offs_n, D, k_end, stride_kd, stride_kn,
                              EVEN_K, EVEN_D)
        kt = cast(kt, q_ptr.dtype.element_ty, INTERPRET)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if not EVEN_K:
            s = tl.where((offs_n < k_end)[None, :], s, float("-inf"))
        # Every split has at least one real column, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(part_ptr + pid_s * M + offs_m, m_i + tl.log2(l_i), mask=offs_m < M)


@triton.jit
def _combine_kernel(
    part_ptr, lpos_ptr, lse_ptr, loss_ptr,
    M, n_split, stride_lpos, inv_t,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    pos = tl.load(lpos_ptr + offs * stride_lpos, mask=mask, other=0.0).to(tl.float32) * inv_t
    pos2 = pos * LOG2E_C
    m = pos2
    for s in range(n_split):
        m = tl.maximum(m, tl.load(part_ptr + s * M + offs, mask=mask, other=0.0))
    acc = tl.exp2(pos2 - m)
    for s in range(n_split):
        acc += tl.exp2(tl.load(part_ptr + s * M + offs, mask=mask, other=0.0) - m)
    lse = (m + tl.log2(acc)) * LN2_C
    tl.store(lse_ptr + offs, lse, mask=mask)
    tl.store(loss_ptr + offs, lse - pos, mask=mask)


@triton.autotune(configs=_configs(), key=["M", "K", "D"])
@triton.heuristics(_HEURISTICS)
@triton.jit
def _bwd_kernel(
    q_ptr, queue_ptr, lse_ptr, lpos_ptr, grad_ptr, dq_ptr, dlpos_ptr,
    M, K, D, cols_per_split,
    stride_qm, stride_qd, stride_kd, stride_kn, stride_lpos, stride_dlpos,
    stride_dqs, stride_dqm, stride_dqd,
    qk_scale, scale,  # scale = 1 / (T * M): the mean over rows and the 1/T of the logits
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    # The incoming gradient is read on the device: no host sync, CUDA-graph friendly.
    g = tl.load(grad_ptr).to(tl.float32) * scale
    q = _load_q_tile(q_ptr, offs_m, offs_d, M, D, stride_qm, stride_qd, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)
    lse2 = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0) * LOG2E_C

    k_start = pid_s * cols_per_split
    k_end = tl.minimum(k_start + cols_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(k_start, k_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _load_queue_tile(queue_ptr, offs_d, offs_n, D, k_end, stride_kd, stride_kn,
                              EVEN_K, EVEN_D)
        kt = cast(kt, q_ptr.dtype.element_ty, INTERPRET)
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if not EVEN_K:
            # Padded columns load zeros and would add nothing, but exp2 of a zero logit can
            # overflow when lse is very negative, and inf * 0 is NaN.
            p = tl.where((offs_n < k_end)[None, :], p, 0.0)
        # p is rounded to the queue's dtype for the second tensor-core product, as in
        # flash-attention's backward; p <= 1, so bf16 keeps ~3 significant digits of each term.
        pb = cast(p, kt.dtype, INTERPRET)
        if UPCAST:
            pb = pb.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(pb, tl.trans(kt), acc, input_precision=DOT_PREC)

    dq_ptrs = dq_ptr + pid_s * stride_dqs + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, cast(acc * g, dq_ptr.dtype.element_ty, INTERPRET),
             mask=m_mask[:, None] & (offs_d[None, :] < D))

    # d/dl_pos only needs lse, so only the first split writes it.
    pos2 = tl.load(lpos_ptr + offs_m * stride_lpos, mask=m_mask, other=0.0).to(tl.float32) * qk_scale
    dlpos = (tl.exp2(pos2 - lse2) - 1.0) * g
    tl.store(dlpos_ptr + offs_m * stride_dlpos, cast(dlpos, dlpos_ptr.dtype.element_ty, INTERPRET),
             mask=m_mask & (pid_s == 0))


# ----------------------------------------------------------------------------- host side


def _num_splits(M: int, K: int, D: int, device: torch.device) -> int:
    """How many column ranges the queue is cut into (see the module docstring)."""
    if device.type != "cuda":
        return 1
    want = triton.cdiv(2 * sm_count(device.index or 0), triton.cdiv(M, 128))
    max_by_k = max(1, K // _MIN_COLS_PER_SPLIT)
    max_by_mem = max(1, _MAX_PARTIAL_BYTES // (M * D * 4))
    return max(1, min(want, max_by_k, max_by_mem))


def _split_layout(M, K, D, device):
    n = _num_splits(M, K, D, device)
    cols = triton.cdiv(triton.cdiv(K, n), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(K, cols), cols


def _common_meta(q, queue):
    D = q.shape[1]
    block_d = max(16, next_power_of_2(D))
    return dict(
        BLOCK_D=block_d,
        EVEN_D=block_d == D,
        UPCAST=upcast_for_interpreter(q.dtype),
        DOT_PREC=dot_precision(q.dtype),
        INTERPRET=INTERPRET,
    )


def queue_infonce_forward(q, l_pos, queue, temperature):
    """Returns (loss fp32 scalar, lse fp32 M)."""
    check_inputs(q, l_pos, queue, MAX_D)
    M, D = q.shape
    K = queue.shape[1]
    n_split, cols = _split_layout(M, K, D, q.device)
    part = torch.empty((n_split, M), device=q.device, dtype=torch.float32)
    lse = torch.empty((M,), device=q.device, dtype=torch.float32)
    row_loss = torch.empty((M,), device=q.device, dtype=torch.float32)
    with device_guard(q.device):
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_split)
        _fwd_kernel[grid](
            q, queue, part, M, K, D, cols,
            q.stride(0), q.stride(1), queue.stride(0), queue.stride(1),
            LOG2E / temperature, **_common_meta(q, queue))
        block = 256
        _combine_kernel[(triton.cdiv(M, block),)](
            part, l_pos, lse, row_loss, M, n_split, l_pos.stride(0), 1.0 / temperature, BLOCK=block)
    return row_loss.mean(), lse


def queue_infonce_backward(grad, q, l_pos, queue, lse, temperature):
    """Returns (grad_q like q, grad_l_pos like l_pos)."""
    M, D = q.shape
    K = queue.shape[1]
    n_split, cols = _split_layout(M, K, D, q.device)
    grad = grad.reshape(1).to(torch.float32)
    dlpos = torch.empty(l_pos.shape, device=l_pos.device, dtype=l_pos.dtype)
    if n_split == 1:
        dq = torch.empty((1, M, D), device=q.device, dtype=q.dtype)
    else:
        dq = torch.empty((n_split, M, D), device=q.device, dtype=torch.float32)
    with device_guard(q.device):
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_split)
        _bwd_kernel[grid](
            q, queue, lse, l_pos, grad, dq, dlpos, M, K, D, cols,
            q.stride(0), q.stride(1), queue.stride(0), queue.stride(1), l_pos.stride(0), dlpos.stride(0),
            dq.stride(0), dq.stride(1), dq.stride(2),
            LOG2E / temperature, 1.0 / (temperature * M), **_common_meta(q, queue))
    dq = dq[0] if n_split == 1 else dq.sum(0).to(q.dtype)
    return dq, dlpos


# ----------------------------------------------------------------- torch.library registration
# Custom ops make torch.compile see one opaque node per direction (no graph break, no tracing
# into Triton); the fake implementations give it shapes, register_autograd the backward.


@torch.library.custom_op("densecl::queue_infonce_recompute", mutates_args=())
def _queue_infonce_op(q: torch.Tensor, l_pos: torch.Tensor, queue: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return queue_infonce_forward(q, l_pos, queue, temperature)


@_queue_infonce_op.register_fake
def _(q, l_pos, queue, temperature):
    return q.new_empty((), dtype=torch.float32), q.new_empty((q.shape[0],), dtype=torch.float32)


@torch.library.custom_op("densecl::queue_infonce_recompute_backward", mutates_args=())
def _queue_infonce_backward_op(grad: torch.Tensor, q: torch.Tensor, l_pos: torch.Tensor,
                               queue: torch.Tensor, lse: torch.Tensor,
                               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return queue_infonce_backward(grad, q, l_pos, queue, lse, temperature)


@_queue_infonce_backward_op.register_fake
def _(grad, q, l_pos, queue, lse, temperature):
    return q.new_empty(q.shape), l_pos.new_empty(l_pos.shape)


def _setup_context(ctx, inputs, output):
    q, l_pos, queue, temperature = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    # queue is saved by reference and version-checked: modifying it in place before backward
    # raises, exactly as with the reference (which saves it for q @ queue's backward).
    ctx.save_for_backward(q, l_pos, queue, lse)
    ctx.temperature = temperature


def _backward(ctx, grad_loss, _grad_lse):
    q, l_pos, queue, lse = ctx.saved_tensors
    grad_q, grad_l_pos = torch.ops.densecl.queue_infonce_recompute_backward(
        grad_loss, q, l_pos, queue, lse, ctx.temperature)
    return grad_q, grad_l_pos, None, None


_queue_infonce_op.register_autograd(_backward, setup_context=_setup_context)


def queue_infonce_recompute_triton(q: torch.Tensor, l_pos: torch.Tensor, queue: torch.Tensor,
                                   temperature: float) -> torch.Tensor:
    """Same value and gradients as kernels.reference.queue_infonce_ref (two-pass kernels)."""
    q, queue = cast_like_autocast(q, queue)
    loss, _ = torch.ops.densecl.queue_infonce_recompute(q, l_pos, queue, float(temperature))
    return loss


# The autotuned kernels, whose chosen config perf.bench_kernels reports.
AUTOTUNED_KERNELS = (_fwd_kernel, _bwd_kernel)
