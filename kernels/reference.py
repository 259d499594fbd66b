"""Plain-PyTorch references of the fused DenseCL pieces (the two loss pieces, grouped BN).

These are the ground truth: the Triton kernels beside this file are tested against them,
and the dispatcher falls back to them off the GPU (grouped BN: to group_batch_norm_aten, ATen's
batch norm per group written into one output; group_batch_norm_ref, with its concatenation, is the
ground truth).
"""
import torch
import torch.nn.functional as F


def dense_positive_logits_ref(q_b, k_b, q_grid, k_grid):
    """Dense positives of DenseCL.

    q_b, k_b: backbone C5 features, N x C x S^2 (normalised here, over C).
    q_grid, k_grid: L2-normalised dense projections, N x D x S^2.
    Returns (l_pos_dense N x S^2, index N x S^2): for each query position i the key position
    j* = argmax_j cos(q_b[:, :, i], k_b[:, :, j]) (first index on ties, like torch.max) and
    q_grid[:, :, i] . k_grid[:, :, j*]. Gradient flows to q_grid only.
    """
    # Autocast off: under AMP, bmm would otherwise run in bf16 and the argmax would compare
    # similarities rounded to ~3 significant digits, turning near-ties into ties that all go to
    # the lowest index. The comparison is meant to be in fp32 (hence the .float()).
    with torch.no_grad(), torch.autocast(q_b.device.type, enabled=False):
        qn = F.normalize(q_b.float(), dim=1)
        kn = F.normalize(k_b.float(), dim=1)
        sim = torch.bmm(qn.transpose(1, 2), kn)  # N x S^2(query) x S^2(key)
        index = sim.argmax(dim=2)
        k_match = torch.gather(k_grid.detach(), 2, index.unsqueeze(1).expand(-1, k_grid.size(1), -1))
    l_pos = (q_grid * k_match.to(q_grid.dtype)).sum(1)
    return l_pos, index


def queue_infonce_ref(q, l_pos, queue, temperature):
    """Mean over rows of logsumexp([l_pos, q @ queue] / T) - l_pos / T.

    q: M x D, l_pos: M, queue: D x K (no gradient). Cross-entropy with the positive at index 0.
    """
    l_neg = q @ queue.detach().to(q.dtype)
    logits = torch.cat([l_pos.unsqueeze(1).to(l_neg.dtype), l_neg], dim=1).float() / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def group_batch_norm_ref(x, weight, bias, groups, eps, relu=False):
    """Batch norm over groups of `groups` consecutive slices of the batch, the way GroupBatchNorm2d
    ran before the fused op: one native_batch_norm per group, then a concatenation (8 launches and
    a copy of the activation per layer). The ground truth of the grouped-BN tests.

    Returns (y, mean G x C, invstd G x C, running-mean target C, running-var target C): the targets
    are the mean over groups of the group means and of the unbiased group variances, which the
    module lerps its running statistics towards."""
    outs, means, invstds = [], [], []
    for xg in x.chunk(groups):
        y, mean, invstd = torch.native_batch_norm(xg, weight, bias, None, None, True, 0.0, eps)
        outs.append(y)
        means.append(mean)
        invstds.append(invstd)
    mean, invstd = torch.stack(means), torch.stack(invstds)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        var = invstd.to(acc).pow(-2) - eps  # biased variance of each group
        m = x.numel() // (groups * x.shape[1])
        run_mean, run_var = mean.to(acc).mean(0), var.mean(0) * (m / max(m - 1, 1))
    y = torch.cat(outs)
    return (F.relu(y) if relu else y), mean, invstd, run_mean, run_var


def group_batch_norm_backward_ref(dy, x, y, mean, invstd, weight, groups, relu=False):
    """(dx, dweight, dbias) of group_batch_norm_ref: native_batch_norm_backward per group."""
    if relu:
        dy = dy.masked_fill(y <= 0, 0)
    dxs, dws, dbs = [], [], []
    for i, (dyg, xg) in enumerate(zip(dy.chunk(groups), x.chunk(groups))):
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dyg, xg, weight, None, None, mean[i], invstd[i], True, 0.0, [True, True, True])
        dxs.append(dx)
        dws.append(dw)
        dbs.append(db)
    return torch.cat(dxs), torch.stack(dws).sum(0), torch.stack(dbs).sum(0)


def dense_memory_format(x):
    """The dense layout grouped BN runs x in: channels_last when x is channels-last and not also
    contiguous, else contiguous (x is copied there first when it is neither)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_batch_norm_aten(x, weight, bias, groups, eps, relu=False):
    """The grouped batch norm where Triton does not run (the CPU): ATen's batch norm on each group's
    slice, written straight into one output (the `out=` overload: no concatenation, no copy), then
    the ReLU in place. On the CPU the per-group calls are loop iterations, not kernel launches; a
    formulation over a G x n x C x H x W view made the CPU step 2-5x slower per BN layer
    (elementwise passes over strided 5-D views, fp64 statistics). Each group goes through exactly
    the function it would on a rank of its own, so the recipe's shuffle-BN on several processes
    computes what grouped BN does in one. Same outputs as group_batch_norm_ref; y keeps x's memory
    format."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.contiguous(memory_format=dense_memory_format(x))
    y = torch.empty_like(x)
    C = x.shape[1]
    mean, invstd = x.new_empty((groups, C), dtype=acc), x.new_empty((groups, C), dtype=acc)
    for g, (xg, yg) in enumerate(zip(x.chunk(groups), y.chunk(groups))):
        torch.ops.aten.native_batch_norm.out(xg, weight, bias, None, None, True, 0.0, eps,
                                             out=yg, save_mean=mean[g], save_invstd=invstd[g])
    if relu:
        y.relu_()
    m = x.numel() // (groups * C)
    var = invstd.pow(-2) - eps  # biased variance of each group
    return y, mean, invstd, mean.mean(0), var.mean(0) * (m / max(m - 1, 1))


def group_batch_norm_backward_aten(dy, x, y, mean, invstd, weight, groups, relu=False):
    """(dx, dweight, dbias) of group_batch_norm_aten for the output gradient dy: ATen's batch-norm
    backward per group, dx written into one tensor; y (the forward's output) gives the ReLU mask."""
    fmt = dense_memory_format(x)
    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    if relu:  # ReLU's own backward kernel (masked_fill with a boolean mask was 3x slower here)
        dy = torch.ops.aten.threshold_backward(dy, y, 0)
    dx = torch.empty_like(x)
    dws, db = weight.new_empty((groups,) + weight.shape), weight.new_empty(weight.shape)
    for g, (dyg, xg, dxg) in enumerate(zip(dy.chunk(groups), x.chunk(groups), dx.chunk(groups))):
        torch.ops.aten.native_batch_norm_backward.out(dyg, xg, weight, None, None, mean[g], invstd[g], True, 0.0,
                                                      [True, True, True], out0=dxg, out1=dws[g], out2=db)
    # dbias is the sum of dy, taken here in the weight's dtype: ATen's CPU kernel (its out2, discarded)
    # rounds it to dy's dtype for bf16 inputs (seen: 18.0 for 17.99).
    return dx, dws.sum(0), dy.sum(dim=(0, 2, 3), dtype=db.dtype)
