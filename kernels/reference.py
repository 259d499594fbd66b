"""Plain-PyTorch references of the fused DenseCL pieces (the two loss pieces, grouped BN).

These are the ground truth: the Triton kernels beside this file are tested against them,
and the dispatcher falls back to them off the GPU (grouped BN: to group_batch_norm_torch, one
formulation without per-group calls; group_batch_norm_ref is the per-group ground truth).
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


def _grouped_view(x, groups):
    """N x C x H x W -> G x n x C x H x W without a copy in either dense memory format."""
    N, C, H, W = x.shape
    return x.view(groups, N // groups, C, H, W)


def group_batch_norm_torch(x, weight, bias, groups, eps, relu=False):
    """The grouped batch norm as one formulation over the G x n x C x H x W view (no per-group
    calls, no concatenation): what the fused op runs where Triton does not (CPU, fp64 on auto).
    Same outputs as group_batch_norm_ref; statistics in fp32 (fp64 for fp64 inputs); y keeps
    x's memory format."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    fmt = dense_memory_format(x)
    x = x.contiguous(memory_format=fmt)
    x5 = _grouped_view(x, groups)
    G, C = groups, x.shape[1]
    stat = (G, 1, C, 1, 1)
    # Statistics in fp64, rounded once: they do not depend on the summation order or on which
    # elements take the vectorised path, which the CPU kernels pick by the tensor's size, so a
    # group gets the same statistics alone (one rank of the recipe's shuffle-BN) as inside a
    # larger batch (one process).
    var64, mean64 = torch.var_mean(x5.double(), dim=(1, 3, 4), correction=0)   # G x C
    var, mean, invstd = var64.to(acc), mean64.to(acc), torch.rsqrt(var64 + eps).to(acc)
    scale = invstd.view(stat) * weight.to(acc).view(1, 1, C, 1, 1)
    # Outputs are fresh tensors, not views of temporaries: an op's output may be modified in
    # place (the residual `out += identity`), which autograd forbids on a view.
    y = torch.empty_like(x, memory_format=fmt)
    y5 = (x5 - mean.view(stat)) * scale + bias.to(acc).view(1, 1, C, 1, 1)
    _grouped_view(y, groups).copy_(y5.relu_() if relu else y5)
    m = x5[0, :, 0].numel()
    return y, mean, invstd, mean.mean(0), (var * (m / max(m - 1, 1))).mean(0)


def group_batch_norm_backward_torch(dy, x, y, mean, invstd, weight, groups, relu=False):
    """(dx, dweight, dbias) of group_batch_norm_torch for the output gradient dy; y (the forward's
    output) gives the ReLU mask."""
    acc = mean.dtype
    G, C = mean.shape
    stat = (G, 1, C, 1, 1)
    fmt = dense_memory_format(x)
    x, dy, y = (t.contiguous(memory_format=fmt) for t in (x, dy, y))
    dy5 = _grouped_view(dy, groups).to(acc)
    if relu:
        dy5 = dy5.masked_fill(_grouped_view(y, groups) <= 0, 0)
    xhat = (_grouped_view(x, groups) - mean.view(stat)) * invstd.view(stat)
    dims = (1, 3, 4)
    # fp64 sums, rounded once (see group_batch_norm_torch: independent of the batch around a group).
    sdy = dy5.sum(dims, keepdim=True, dtype=torch.float64).to(acc)
    sdyx = (dy5 * xhat).sum(dims, keepdim=True, dtype=torch.float64).to(acc)
    m = xhat[0, :, 0].numel()
    dx = torch.empty_like(x, memory_format=fmt)
    _grouped_view(dx, groups).copy_((weight.to(acc).view(1, 1, C, 1, 1) * invstd.view(stat))
                                    * (dy5 - sdy / m - xhat * (sdyx / m)))
    return dx, sdyx.view(G, C).sum(0).to(weight.dtype), sdy.view(G, C).sum(0).to(weight.dtype)
