"""Fused InfoNCE against a queue of negatives (MoCo / DenseCL loss), Triton, in one pass.

    loss = mean_i [ logsumexp_j([l_pos_i, q_i . queue_j] / T) - l_pos_i / T ]

q: M x D (grad), l_pos: M (grad), queue: D x K (no grad). The dense DenseCL loss has
M = N * S^2 = 12,544 rows against K = 65,536 negatives: the M x K logits (and their softmax)
are 1.6 GB in bf16, which is what the eager loss spends its time and memory on. Like
flash-attention, the kernel streams the queue through SRAM in BLOCK_N-column tiles and keeps
only running statistics per row, so the M x K matrix never reaches HBM.

The gradient is a by-product of the forward. With p_ij the softmax over [l_pos_i, q_i . queue_j] / T
(j = 0 the positive):
    dL/dq_i     = 1/(T M) * sum_{j>=1} p_ij queue_j      (flash-attention's output, with the
                                                          queue as both keys and values)
    dL/dl_pos_i = 1/(T M) * (p_i0 - 1) = -1/(T M) * sum_{j>=1} p_ij
so the forward accumulates, next to the online log-sum-exp, O_i = sum_j 2^(s_ij - m_i) queue_j
(rescaled whenever the running max m_i grows), and the backward is a scale by the incoming
gradient. Against a backward that recomputes the logits (the earlier two-pass design, deleted
after it lost by 1.58x on an H200; perf/RESULTS.md):
two matmuls over the queue instead of three, one exponential per logit instead of two, one read
of the queue instead of two, and no second kernel over the queue.

_fwd_kernel      grid (row blocks, K splits). Per split: running max m (base 2), sum l of
                 2^(s - m), and O (BLOCK_M x D, fp32).
_combine_kernel  merges the splits' (m, l, O) with the positive logit into the row loss and
                 dL/dq, dL/dl_pos per unit of incoming gradient.
backward         grad_q = g * dq_unit, grad_l_pos = g * dlpos_unit (elementwise torch ops).

Precision: every exponential is of a difference against a running max, never of a large
log-sum-exp, and 1 - p_i0 is summed from the negatives rather than subtracted from 1, so
d l_pos keeps plain fp32 accuracy when the positive dominates with large logits. (The two-pass
design rounded lse ~ 1,800 to fp32 and exponentiated l_pos / T - lse: 1.7e-4 relative error.)
p_ij is rounded to the queue's dtype for the second tensor-core product, as flash-attention
does; p_ij <= 1, so bf16 keeps ~3 significant digits of each term, accumulated in fp32.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    LN2_C,
    arch_family,
    LOG2E,
    LOG2E_C,
    SUPPORTED_DTYPES,
    autotune_configs,
    can_run_on,
    cast,
    device_guard,
    device_index,
    dot_precision,
    grad_dot_precision,
    next_power_of_2,
    sm_count,
    tiles_to_try,
    upcast_for_interpreter,
    width_of,
)

# The accumulator of dL/dq is a BLOCK_M x D fp32 tile in registers: D = 128 (DenseCL's out_dim)
# fits beside the logit tile (199 registers at 128 x 128 on sm_90); at D = 256 the 128-row tiles
# no longer fit (seen on an H200: out of resources), so larger D goes to the reference.
MAX_D = 128

# Tiles per (GPU family, input width): BLOCK_M rows per program, and the (BLOCK_N, num_warps,
# num_stages) the autotuner may try. BLOCK_M is fixed, not autotuned, so that the host can plan
# the split count for full waves before launching (split_layout). Every entry compiles at
# D = 128 with no register spill and fits shared memory: the table perf/AOT_SM90.md, checked
# by tests/test_kernels_aot.py. Why these:
# - 16-bit: 128 rows feed the tensor cores best (sm_90 wgmma works on 64-row warpgroups); 8
#   warps hold the 128 x D fp32 accumulator and the 128 x BLOCK_N logits (199 registers at
#   BLOCK_N = 128 on sm_90). On sm_80, BLOCK_N = 128 with 2 stages spills and is left out.
# - fp32 (a reference mode: the trainer runs bf16 on GPUs): the logits use three-pass TF32
#   (tf32x3, ~fp32 accuracy), whose split operands need many registers. On sm_90 only 64 rows x
#   64 columns with 8 warps fit without spills (255 registers); on sm_80 only 16-row tiles do.
TILES = {
    ("sm90", "16bit"): (128, [(128, 8, 3), (64, 8, 3), (128, 8, 2), (64, 8, 4)]),
    ("sm90", "fp32"): (64, [(64, 8, 2), (64, 8, 3)]),
    ("sm80", "16bit"): (128, [(128, 8, 3), (64, 8, 3), (64, 8, 4)]),
    ("sm80", "fp32"): (16, [(16, 4, 2), (32, 4, 2)]),
}
BLOCK_M_INTERPRET = 16   # small, so that the CPU tests cross several row tiles and tails

# Every split covers a multiple of this many columns, so it is a multiple of any BLOCK_N
# above and every split but the last is made of whole tiles.
_SPLIT_ALIGN = 128
_MIN_COLS_PER_SPLIT = 512          # amortises the q-tile load and the epilogue of a program
# fp32 partial O of all splits together (M x D x 4 per split): keeps the op's own memory under
# 64 MiB (+31 MiB measured at the dense case on an H200, perf/RESULTS.md).
_MAX_PARTIAL_BYTES = 48 << 20
# Programs resident per SM when planning waves: one 128-row program (8 warps at 199 registers
# a thread on sm_90) fills more than half an SM's register file. With it the plan picks 4 splits
# for the dense case (12,544 x 65,536 on 132 SMs); the H200 sweep measured 0.88 ms at 4 splits
# against 1.15 ms at 1-3 (perf/RESULTS.md, 2026-12-04).
PROGRAMS_PER_SM = 1


def _configs():
    gpu = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
           for bn, w, s in sorted({c for _, cs in TILES.values() for c in cs})]
    # Interpreter: 32 columns so that the CPU tests' small queues still cross several tiles and a tail.
    return autotune_configs(gpu, triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1))


def _prune(configs, named_args, **kwargs):
    """Keep the configs listed for this GPU and q's dtype (see TILES)."""
    if INTERPRET:
        return configs
    q = named_args["q_ptr"]
    allowed = set(tiles_to_try(TILES[arch_family(device_index(q.device)), width_of(q.dtype)][1]))
    return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


_HEURISTICS = {"EVEN_K": lambda a: a["K"] % a["BLOCK_N"] == 0}


@triton.jit
def _load_q_tile(q_ptr, offs_m, offs_d, M, D, stride_qm, stride_qd, EVEN_D: tl.constexpr):
    ptrs = q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN_D:
        mask = offs_m[:, None] < M
    else:
        mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_queue_tile(queue_ptr, offs_d, offs_n, D, k_end, stride_kd, stride_kn,
                     EVEN_K: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = queue_ptr + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    if EVEN_K:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[:, None] < D, other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs, mask=offs_n[None, :] < k_end, other=0.0)
        else:
            t = tl.load(ptrs, mask=(offs_d[:, None] < D) & (offs_n[None, :] < k_end), other=0.0)
    return t


@triton.autotune(configs=_configs(), key=["M", "K", "D", "WITH_GRAD"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_HEURISTICS)
@triton.jit
def _fwd_kernel(
    q_ptr, queue_ptr, m_ptr, l_ptr, o_ptr,
    M, K, D, cols_per_split,
    stride_qm, stride_qd, stride_kd, stride_kn,
    qk_scale,  # log2(e) / T: logits in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    GRAD_DOT_PREC: tl.constexpr, INTERPRET: tl.constexpr, WITH_GRAD: tl.constexpr,
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
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(k_start, k_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        # queue_infonce_triton hands over the queue in q's dtype; the cast only matters for
        # direct callers of the op with mixed dtypes (reference: queue.to(q.dtype)).
        kt = cast(_load_queue_tile(queue_ptr, offs_d, offs_n, D, k_end, stride_kd, stride_kn, EVEN_K, EVEN_D),
                  q_ptr.dtype.element_ty, INTERPRET)
        kt_dot = kt
        if UPCAST:
            kt_dot = kt.to(tl.float32)
        s = tl.dot(q, kt_dot, input_precision=DOT_PREC) * qk_scale
        if not EVEN_K:
            s = tl.where((offs_n < k_end)[None, :], s, float("-inf"))
        # Every split has at least one real column, so m_new is finite from the first tile on
        # and alpha = 2^(-inf) = 0 clears the empty start state.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WITH_GRAD:
            pb = cast(p, kt.dtype, INTERPRET)
            if UPCAST:
                pb = pb.to(tl.float32)
            acc = tl.dot(pb, tl.trans(kt_dot), acc * alpha[:, None], input_precision=GRAD_DOT_PREC)
        m_i = m_new

    m_mask = offs_m < M
    tl.store(m_ptr + pid_s * M + offs_m, m_i, mask=m_mask)
    tl.store(l_ptr + pid_s * M + offs_m, l_i, mask=m_mask)
    if WITH_GRAD:
        rows = pid_s.to(tl.int64) * M + offs_m
        tl.store(o_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _combine_kernel(
    m_ptr, l_ptr, o_ptr, lpos_ptr, loss_ptr, dlpos_ptr, dq_ptr,
    M, D, n_split, stride_lpos, inv_t, scale,  # scale = 1 / (T M): the mean and the 1/T
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, WITH_GRAD: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    pos2 = tl.load(lpos_ptr + offs * stride_lpos, mask=mask, other=0.0).to(tl.float32) * (inv_t * LOG2E_C)
    m = pos2
    for s in range(n_split):
        m = tl.maximum(m, tl.load(m_ptr + s * M + offs, mask=mask, other=0.0))
    neg = tl.zeros([BLOCK], tl.float32)
    for s in range(n_split):
        w = tl.exp2(tl.load(m_ptr + s * M + offs, mask=mask, other=0.0) - m)
        neg += tl.load(l_ptr + s * M + offs, mask=mask, other=0.0) * w
    denom = tl.exp2(pos2 - m) + neg
    # lse - l_pos/T in base 2 is (m - pos2) + log2(denom): no large lse is formed and subtracted.
    tl.store(loss_ptr + offs, (m - pos2 + tl.log2(denom)) * LN2_C, mask=mask)
    tl.store(dlpos_ptr + offs, -(neg / denom) * scale, mask=mask)
    if WITH_GRAD:
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for s in range(n_split):
            w = tl.exp2(tl.load(m_ptr + s * M + offs, mask=mask, other=0.0) - m) / denom
            rows = s * M + offs.to(tl.int64)
            o = tl.load(o_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=mask[:, None], other=0.0)
            acc += o * w[:, None]
        tl.store(dq_ptr + offs[:, None] * D + offs_d[None, :], acc * scale,
                 mask=mask[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- host side


def supports(q: torch.Tensor, l_pos: torch.Tensor, queue: torch.Tensor, max_d: int = MAX_D) -> bool:
    """Shapes and dtypes the kernels handle; anything else goes to the reference."""
    return (
        q.dim() == 2 and l_pos.dim() == 1 and queue.dim() == 2
        and q.shape[1] == queue.shape[0] and l_pos.shape[0] == q.shape[0]
        and 1 <= q.shape[1] <= max_d and q.shape[0] >= 1 and queue.shape[1] >= 1
        and q.dtype in SUPPORTED_DTYPES and queue.dtype in SUPPORTED_DTYPES
        and l_pos.dtype in SUPPORTED_DTYPES
    )


def check_inputs(q, l_pos, queue, max_d: int = MAX_D):
    if not supports(q, l_pos, queue, max_d):
        raise ValueError(
            f"queue_infonce (triton): unsupported inputs q {tuple(q.shape)} {q.dtype}, l_pos "
            f"{tuple(l_pos.shape)} {l_pos.dtype}, queue {tuple(queue.shape)} {queue.dtype}; need q M x D, "
            f"l_pos M, queue D x K with D <= {max_d} and fp32/fp16/bf16")
    if not (q.device == l_pos.device == queue.device) or not can_run_on(q.device):
        raise RuntimeError(f"queue_infonce (triton): cannot launch on {q.device} "
                           "(CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)")


def block_m(dtype: torch.dtype, device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return BLOCK_M_INTERPRET
    return TILES[arch_family(device_index(device)), width_of(dtype)][0]



def _aligned_cols(K: int, n: int) -> int:
    return triton.cdiv(triton.cdiv(K, n), _SPLIT_ALIGN) * _SPLIT_ALIGN


_fixed_splits = None   # set only by fixed_splits(), for benchmarks and tests


@contextlib.contextmanager
def fixed_splits(n: int):
    """Cut the queue into `n` column ranges instead of the planned count, inside the block: for
    the split sweep of the benchmark (python -m perf.bench_kernels --sweep-splits) and the tests."""
    global _fixed_splits
    if n < 1:
        raise ValueError(f"split count must be >= 1, got {n}")
    saved, _fixed_splits = _fixed_splits, int(n)
    try:
        yield
    finally:
        _fixed_splits = saved


def _num_splits(M: int, K: int, D: int, rows_per_program: int, device: torch.device) -> int:
    """How many column ranges the queue is cut into: the count that minimises the modelled
    time, waves x columns per program, on this GPU's SMs (the last wave as full as possible),
    and the smallest such count (fewer partials to combine). E.g. M = 12,544 rows in 98 blocks
    on 132 SMs: 4 splits = 392 programs = 2.97 waves (99% full) beats 3 splits (2.23 waves);
    measured on an H200: 0.88 ms against 1.15 ms (perf/RESULTS.md)."""
    if _fixed_splits is not None:
        return _fixed_splits
    if device.type != "cuda":
        return 1
    return _planned_splits(M, K, D, rows_per_program, sm_count(device_index(device)) * PROGRAMS_PER_SM)


@functools.lru_cache(maxsize=256)
def _planned_splits(M: int, K: int, D: int, rows_per_program: int, slots: int) -> int:
    # Cached: the search costs ~1 ms of Python at M = 256 (128 candidates), which on an H200
    # made the global loss host-bound at 2.5 ms a call (perf/RESULTS.md, 2026-12-04).
    rows = triton.cdiv(M, rows_per_program)
    n_max = max(1, min(K // _MIN_COLS_PER_SPLIT, _MAX_PARTIAL_BYTES // (M * D * 4)))
    best_n, best_cost = 1, None
    for n in range(1, n_max + 1):
        cols = _aligned_cols(K, n)
        n_real = triton.cdiv(K, cols)
        cost = triton.cdiv(rows * n_real, slots) * cols
        if best_cost is None or cost < best_cost:
            best_n, best_cost = n_real, cost
    return best_n


def split_layout(M, K, D, dtype, device):
    """(splits, columns per split) the forward uses for q of M x D against a D x K queue."""
    n = _num_splits(M, K, D, block_m(dtype, device), device)
    cols = _aligned_cols(K, n)
    return triton.cdiv(K, cols), cols


def queue_infonce_forward(q, l_pos, queue, temperature, with_grad=True):
    """Returns (loss fp32 scalar, dq_unit fp32 M x D, dlpos_unit fp32 M): the loss and its
    gradients to q and l_pos per unit of incoming gradient. Without with_grad, dq_unit is an
    empty M x 0 tensor and the second product of the forward is skipped."""
    check_inputs(q, l_pos, queue)
    M, D = q.shape
    K = queue.shape[1]
    n_split, cols = split_layout(M, K, D, q.dtype, q.device)
    block_d = max(16, next_power_of_2(D))
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty((n_split, M), **f32)
    l_part = torch.empty((n_split, M), **f32)
    o_part = torch.empty((n_split, M, block_d) if with_grad else (1,), **f32)
    row_loss = torch.empty((M,), **f32)
    dlpos_unit = torch.empty((M,), **f32)
    dq_unit = torch.empty((M, D) if with_grad else (M, 0), **f32)
    bm = block_m(q.dtype, q.device)
    with device_guard(q.device):
        _fwd_kernel[(triton.cdiv(M, bm), n_split)](
            q, queue, m_part, l_part, o_part, M, K, D, cols,
            q.stride(0), q.stride(1), queue.stride(0), queue.stride(1),
            LOG2E / temperature,
            BLOCK_M=bm, BLOCK_D=block_d, EVEN_D=block_d == D, UPCAST=upcast_for_interpreter(q.dtype),
            DOT_PREC=dot_precision(q.dtype), GRAD_DOT_PREC=grad_dot_precision(q.dtype), INTERPRET=INTERPRET,
            WITH_GRAD=with_grad)
        block = 16 if INTERPRET else max(8, min(64, 8192 // block_d))
        _combine_kernel[(triton.cdiv(M, block),)](
            m_part, l_part, o_part, l_pos, row_loss, dlpos_unit, dq_unit,
            M, D, n_split, l_pos.stride(0), 1.0 / temperature, 1.0 / (temperature * M),
            BLOCK=block, BLOCK_D=block_d, WITH_GRAD=with_grad)
    return row_loss.mean(), dq_unit, dlpos_unit


# ----------------------------------------------------------------- torch.library registration
# A custom op makes torch.compile see one opaque node (no graph break, no tracing into Triton);
# the fake implementation gives it shapes, register_autograd the backward, which is two
# elementwise products that torch.compile fuses into the surrounding graph.


@torch.library.custom_op("densecl::queue_infonce", mutates_args=())
def _queue_infonce_op(q: torch.Tensor, l_pos: torch.Tensor, queue: torch.Tensor, temperature: float,
                      with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return queue_infonce_forward(q, l_pos, queue, temperature, with_grad)


@_queue_infonce_op.register_fake
def _(q, l_pos, queue, temperature, with_grad):
    M, D = q.shape
    f32 = dict(dtype=torch.float32)
    return q.new_empty((), **f32), q.new_empty((M, D if with_grad else 0), **f32), q.new_empty((M,), **f32)


def _setup_context(ctx, inputs, output):
    q, l_pos, _queue, _temperature, with_grad = inputs
    _, dq_unit, dlpos_unit = output
    ctx.mark_non_differentiable(dq_unit, dlpos_unit)
    # Only the two per-unit gradients are kept: the queue is not needed after the forward, so
    # updating it in place before backward (the model's enqueue) cannot change the gradient.
    ctx.save_for_backward(dq_unit, dlpos_unit)
    ctx.dtypes = (q.dtype, l_pos.dtype)
    ctx.with_grad = with_grad


def _backward(ctx, grad_loss, _grad_dq_unit, _grad_dlpos_unit):
    dq_unit, dlpos_unit = ctx.saved_tensors
    grad_q = grad_l_pos = None
    if ctx.needs_input_grad[0]:
        if not ctx.with_grad:
            raise RuntimeError("densecl::queue_infonce was called with with_grad=False, so it kept no "
                               "gradient for q; call it through kernels.queue_infonce")
        grad_q = (dq_unit * grad_loss).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        grad_l_pos = (dlpos_unit * grad_loss).to(ctx.dtypes[1])
    return grad_q, grad_l_pos, None, None, None


_queue_infonce_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtype(device: torch.device):
    """The dtype torch.autocast would run `q @ queue` in, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_like_autocast(q: torch.Tensor, queue: torch.Tensor):
    """(q, queue) as the reference's `q @ queue` would see them: in the autocast dtype under AMP,
    and the queue (no gradient) in q's dtype."""
    # Custom ops are invisible to autocast. In the reference, q @ queue is an autocast op, so
    # under AMP it runs on bf16/fp16 inputs; cast here the same way (q's gradient goes back
    # through the cast) so the fused path gets tensor-core inputs too instead of fp32.
    amp = _autocast_dtype(q.device)
    if amp is not None and q.dtype != amp:
        q = q.to(amp)
    queue = queue.detach()
    if queue.dtype != q.dtype:
        # One 8-16 MB copy per call, as the reference's queue.to(q.dtype) does. Casting tile by
        # tile instead would stage fp32 tiles in shared memory (twice the bytes per pipeline
        # stage) and stream twice the bytes from L2 once per row block.
        queue = queue.to(q.dtype)
    return q, queue


def queue_infonce_triton(q: torch.Tensor, l_pos: torch.Tensor, queue: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Fused queue InfoNCE: same value and gradients as kernels.reference.queue_infonce_ref."""
    q, queue = cast_like_autocast(q, queue)
    # The second product of the forward only serves q's gradient: skipped when none is wanted.
    with_grad = torch.is_grad_enabled() and q.requires_grad
    loss, _, _ = torch.ops.densecl.queue_infonce(q, l_pos, queue, float(temperature), with_grad)
    return loss


# The autotuned kernels, whose chosen config perf.bench_kernels reports.
AUTOTUNED_KERNELS = (_fwd_kernel,)
