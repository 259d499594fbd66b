"""Plain-PyTorch references of the two fused DenseCL loss pieces.

These are the ground truth: the Triton kernels beside this file are tested against them,
and the dispatcher falls back to them off the GPU.
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
