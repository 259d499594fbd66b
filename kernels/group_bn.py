"""Grouped batch norm as one operator: `densecl::group_batch_norm` (and its backward op).

Statistics per group of `groups` consecutive slices of the batch (densecl_fast/bn.py says why),
normalisation, affine and an optional fused ReLU, in one op per layer instead of one
native_batch_norm per group and a concatenation. The op's implementation follows
kernels/dispatch.py's backend rules: the Triton kernels (kernels/group_bn_triton.py) on CUDA, or
on CPU tensors under TRITON_INTERPRET=1 with the triton backend; otherwise
reference.group_batch_norm_aten, ATen's batch norm per group written into one output (no
concatenation). Either way the profiler and torch.compile see one opaque op (fake implementation and
autograd registered here), so a compiled block has no graph break at its BN layers.
"""
import torch

from . import dispatch


@torch.library.custom_op("densecl::group_batch_norm", mutates_args=())
def _group_batch_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.group_batch_norm_forward(x, weight, bias, groups, eps, relu)


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_group_batch_norm_op.register_fake
def _(x, weight, bias, groups, eps, relu):
    from .reference import dense_memory_format
    C = x.shape[1]
    stats = x.new_empty((groups, C), dtype=_stat_dtype(x))
    running = x.new_empty((C,), dtype=_stat_dtype(x))
    return (torch.empty_like(x, memory_format=dense_memory_format(x)), stats, torch.empty_like(stats), running,
            torch.empty_like(running))


@torch.library.custom_op("densecl::group_batch_norm_backward", mutates_args=())
def _group_batch_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                                  invstd: torch.Tensor, weight: torch.Tensor, groups: int,
                                  relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.group_batch_norm_backward(dy, x, y, mean, invstd, weight, groups, relu)


@_group_batch_norm_backward_op.register_fake
def _(dy, x, y, mean, invstd, weight, groups, relu):
    from .reference import dense_memory_format
    return torch.empty_like(x, memory_format=dense_memory_format(x)), torch.empty_like(weight), \
        torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _, groups, _, relu = inputs
    y, mean, invstd, run_mean, run_var = output
    ctx.mark_non_differentiable(mean, invstd, run_mean, run_var)
    # With ReLU the output is the mask (y > 0); it is kept alive anyway as the next conv's input.
    ctx.save_for_backward(x, y if relu else None, mean, invstd, weight)
    ctx.groups, ctx.relu = groups, relu


def _backward(ctx, dy, *_unused):
    x, y, mean, invstd, weight = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.densecl.group_batch_norm_backward(
        dy, x, y if ctx.relu else x, mean, invstd, weight, ctx.groups, ctx.relu)
    return dx, dweight, dbias, None, None, None


_group_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def group_batch_norm(x, weight, bias, groups: int, eps: float, relu: bool = False):
    """Batch norm with statistics per group of `groups` consecutive slices of the batch
    (N x C x H x W, N a multiple of groups), + ReLU if `relu`. Returns (y, mean G x C,
    invstd G x C, running-mean target C, running-var target C), as reference.group_batch_norm_ref."""
    return torch.ops.densecl.group_batch_norm(x, weight, bias, int(groups), float(eps), bool(relu))
